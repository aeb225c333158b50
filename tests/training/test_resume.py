"""Exact resume after a real SIGKILL, checkpoint fallback, and refused resumes.

A tiny deterministic PGL run (6 steps per epoch; epochs 1-2 local, 3 global, 4 local; a
checkpoint every 2 steps) is trained once without interruption. Runs killed with SIGKILL (through
the ``PGL_FAST_KILL_AT`` test hook) mid local epoch, at the local-to-global boundary and mid global
epoch, then resumed with ``--resume auto``, must end bit-identical to it: weights, optimizer state,
RNG states and every metric except timing and memory.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from pgl_fast.training.checkpoint import check_compatible
from pgl_fast.errors import UserError
from pgl_fast.train import main

from helpers import tiny_cli_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS, STEPS = 4, 6  # 96 images / batch 16
ARGS = (tiny_cli_args(train=96, test=32)
        + ["--method", "pgl", "-P", "2", "-Q", "1", "--epochs", str(EPOCHS), "--save-every", "2",
           "--keep-checkpoints", "2", "--deterministic"])
PHASES = ["local", "local", "global", "local"]
# fields that measure the machine, not the training
VOLATILE = {"images_per_s", "epoch_seconds", "peak_mem_mib", "peak_reserved_mib"}
FINAL = f"ckpt-e{EPOCHS:04d}-s000000.pt"


def train(out, *extra, kill=None):
    env = {k: v for k, v in os.environ.items() if k != "PGL_FAST_KILL_AT"}
    # every run, reference included, on one intra-op thread: as fast for these tiny batches on an
    # idle machine, far faster on a busy one (no OpenMP threads spinning against each other)
    env["OMP_NUM_THREADS"] = "1"
    if kill is not None:
        env["PGL_FAST_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "pgl_fast.train", *ARGS, "-o", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def ckpt_names(out):
    d = os.path.join(out, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_identical(a, b, where="state"):
    """Recursive exact equality of nested dicts/lists/tensors/numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def strip(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def assert_same_run(out, ref):
    """``out`` ended exactly where the uninterrupted reference ``ref`` did."""
    assert FINAL in ckpt_names(out)
    got, want = load(os.path.join(out, "checkpoints", FINAL)), load(os.path.join(ref, "checkpoints", FINAL))
    assert got["epoch"] == EPOCHS and got["step"] == 0
    # parameters and buffers (BN running statistics, num_batches_tracked)
    assert list(got["model"]) == list(want["model"])
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), f"model.{k} differs"
    # optimizer state: momentum buffers and param groups, per module
    assert len(got["optimizers"]) == len(want["optimizers"]) == 4
    for j, (g, w) in enumerate(zip(got["optimizers"], want["optimizers"])):
        assert w["state"], "reference optimizer has no momentum buffers"
        assert_identical(g["state"], w["state"], f"optimizers[{j}].state")
        assert_identical(g["param_groups"], w["param_groups"], f"optimizers[{j}].param_groups")
    # where the run would go on from: the same random streams
    assert_identical(got["rng"], want["rng"], "rng")
    assert torch.equal(got["data_generator"], want["data_generator"])
    assert_identical(strip(got["records"]), strip(want["records"]), "records")
    assert (got["best_acc"], got["best_epoch"]) == (want["best_acc"], want["best_epoch"])
    # metrics.jsonl: epochs 1..EPOCHS once each, every non-timing field equal
    rows, ref_rows = read_jsonl(os.path.join(out, "metrics.jsonl")), read_jsonl(os.path.join(ref, "metrics.jsonl"))
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert len(rows) == len(ref_rows)
    assert_identical(strip(rows), strip(ref_rows), "metrics.jsonl")
    for r in rows:
        assert VOLATILE <= set(r)
    s, ref_s = (json.load(open(os.path.join(d, "summary.json"))) for d in (out, ref))
    for k in ("final_test_acc", "best_test_acc", "best_epoch", "epochs"):
        assert s[k] == ref_s[k], k


def no_tmp_files(out):
    return [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    r = train(out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["phase"] for r in rows] == PHASES  # the kill points below mean what they say
    return str(out)


def test_reference_run_checkpoints(reference):
    # --keep-checkpoints 2: the two newest remain, no temporary file anywhere
    assert ckpt_names(reference) == ["ckpt-e0003-s000004.pt", FINAL]
    assert no_tmp_files(reference) == []
    final = load(os.path.join(reference, "checkpoints", FINAL))  # weights_only=True
    for key in ("model", "optimizers", "rng", "data_generator", "epoch", "step", "config", "format_version"):
        assert key in final, key
    assert final["config"]["method"] == "pgl" and final["config"]["modules"] == 4
    assert final["mid_epoch"] is None
    mid = load(os.path.join(reference, "checkpoints", "ckpt-e0003-s000004.pt"))
    assert (mid["epoch"], mid["step"]) == (3, 4)
    assert sorted(mid["mid_epoch"]["perm"].tolist()) == list(range(96))
    assert (mid["mid_epoch"]["stats"]["first_bad"] < 0).all()
    assert [r["epoch"] for r in mid["records"]] == [1, 2, 3]


# kill point -> (checkpoint the resume must start from, metrics lines left by the killed run)
KILLS = {
    "2:3": ("ckpt-e0001-s000002.pt", 1),    # mid local epoch, a step past its mid-epoch checkpoint
    "2:end": ("ckpt-e0002-s000000.pt", 2),  # local -> global boundary, after epoch 2 is recorded
    "3:5": ("ckpt-e0002-s000004.pt", 2),    # mid global epoch, a step past its mid-epoch checkpoint
}


@pytest.mark.parametrize("kill", list(KILLS), ids=["mid-local", "local-global-boundary", "mid-global"])
def test_sigkill_then_resume_is_exact(tmp_path, reference, kill):
    out = tmp_path / "run"
    start, lines = KILLS[kill]
    r = train(out, kill=kill)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert "done:" not in r.stdout and not (out / "summary.json").exists()
    assert ckpt_names(out)[-1] == start
    assert len(ckpt_names(out)) <= 2
    assert [row["epoch"] for row in read_jsonl(out / "metrics.jsonl")] == list(range(1, lines + 1))
    with open(out / "metrics.jsonl", "a") as f:  # a torn line: metrics.jsonl is rebuilt from the checkpoint
        f.write('{"event": "epoch", "epoch": 9')

    r = train(out, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {os.path.join(str(out), 'checkpoints', start)}" in r.stdout
    assert "warning" not in r.stdout
    header = json.loads((out / "header.json").read_text())
    assert header["resumed_from"].endswith(start)
    assert_same_run(str(out), reference)
    assert len(ckpt_names(out)) <= 2 and no_tmp_files(out) == []


def test_auto_resume_skips_truncated_newest(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    newest = out / "checkpoints" / FINAL
    data = newest.read_bytes()
    newest.write_bytes(data[:len(data) // 2])
    r = train(out, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stdout.splitlines() if ln.startswith("warning")]
    assert len(warnings) == 1 and FINAL in warnings[0], r.stdout
    assert "resumed from" in r.stdout and "ckpt-e0003-s000004.pt" in r.stdout
    # the last two steps of epoch 4 are redone deterministically: the same end point
    assert_same_run(str(out), reference)


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# The refusals below happen before any work, in-process (no --deterministic: that would switch the
# test process itself to deterministic algorithms; it is not a structural field).
FAST = [a for a in ARGS if a != "--deterministic"]


def test_explicit_truncated_checkpoint_is_an_error(tmp_path, reference, capsys):
    bad = tmp_path / FINAL
    data = open(os.path.join(reference, "checkpoints", FINAL), "rb").read()
    bad.write_bytes(data[:len(data) // 2])
    out = tmp_path / "run"
    assert main(FAST + ["-o", str(out), "--resume", str(bad)]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "corrupt" in line
    assert not (out / "metrics.jsonl").exists() and ckpt_names(out) == []


def test_explicit_missing_checkpoint_is_an_error(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(FAST + ["-o", str(tmp_path / "run"), "--resume", str(missing)]) == 2
    line = one_error_line(capsys)
    assert str(missing) in line


MISMATCH = [
    (["--method", "dgl"], "method"),
    (["--arch", "resnet14", "-J", "7"], "arch"),
    (["--split", "even", "-J", "2"], "modules"),
    (["--aux", "0c1f"], "aux"),
    (["--droprate", "0.1"], "droprate"),
]


@pytest.mark.parametrize("extra,field", MISMATCH, ids=[f for _, f in MISMATCH])
@pytest.mark.parametrize("how", ["explicit", "auto"])
def test_resume_of_a_different_config_is_refused(tmp_path, reference, capsys, extra, field, how):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p: (out / p).read_bytes() for p in ("config.json", "metrics.jsonl", "header.json")}
    target = str(out / "checkpoints" / FINAL) if how == "explicit" else "auto"
    assert main(FAST + extra + ["-o", str(out), "--resume", target]) == 2
    line = one_error_line(capsys)
    assert f"{field}: checkpoint" in line and FINAL in line, line
    # nothing in the run directory was touched
    assert {p: (out / p).read_bytes() for p in before} == before
    assert ckpt_names(out) == ckpt_names(reference)


def test_auto_resume_with_only_corrupt_checkpoints(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ckpt_names(out):
        (out / "checkpoints" / name).write_bytes(b"not a checkpoint")
    assert main(FAST + ["-o", str(out), "--resume", "auto"]) == 2
    printed = capsys.readouterr()
    lines = [ln for ln in printed.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "every checkpoint" in lines[0] and "corrupt" in lines[0], printed.err
    assert printed.out.count("warning") == 2  # one per skipped file


@pytest.mark.parametrize("extra,field", [(["-b", "8"], "batch_size"), (["--synthetic-train", "48"], "synthetic_train")],
                         ids=["batch_size", "synthetic_train"])
def test_mid_epoch_resume_with_another_batching_is_refused(tmp_path, reference, capsys, one_thread, extra, field):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    mid = out / "checkpoints" / "ckpt-e0003-s000004.pt"
    assert main(FAST + extra + ["-o", str(out), "--resume", str(mid)]) == 2
    line = one_error_line(capsys)
    assert field in line and mid.name in line


def test_rewind_keeps_the_checkpoint_just_written(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    base = FAST + ["--epochs", "2", "-o", str(out)]
    assert main(base + ["--save-every", "0"]) == 0
    assert ckpt_names(out) == ["ckpt-e0001-s000000.pt", "ckpt-e0002-s000000.pt"]
    import pgl_fast.training.checkpoint as ckpt

    saved, save = [], ckpt.save_checkpoint

    def recording_save(*a, **k):
        path = save(*a, **k)
        saved.append((os.path.basename(path), os.path.exists(path), ckpt_names(out)))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", recording_save)
    rewind = out / "checkpoints" / "ckpt-e0001-s000000.pt"
    assert main(base + ["--keep-checkpoints", "1", "--resume", str(rewind)]) == 0
    assert [name for name, _, _ in saved] == ["ckpt-e0001-s000002.pt", "ckpt-e0001-s000004.pt", "ckpt-e0002-s000000.pt"]
    for name, exists, left in saved:
        assert exists and left == [name], (name, left)


@pytest.mark.parametrize("field, saved, now", [
    ("recipe", "cifar10", "imagenet"), ("image_size", None, 160), ("skip_bad_images", False, True),
    ("data_pipeline", "resident", "stream")])
def test_a_resume_that_changes_what_each_sample_becomes_is_refused(field, saved, now):
    """The recipe, crop size, bad-file policy and pipeline decide every training sample: a resume
    that changes one would continue another run. A checkpoint written before the field existed
    counts as the old default."""
    with pytest.raises(UserError, match=rf"made by a different run \({field}: checkpoint {saved!r} vs now {now!r}\)"):
        check_compatible({"config": {field: saved}}, {field: now}, "ckpt.pt")
    check_compatible({"config": {}}, {"image_size": None, "skip_bad_images": False, "data_pipeline": "auto"},
                     "old.pt")
    check_compatible({"config": {field: now}}, {field: now, "workers": 7}, "ckpt.pt")  # workers may change
