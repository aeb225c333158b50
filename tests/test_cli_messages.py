"""What the CLI says about itself: warnings for flags that do nothing in a combination, no prefix
matching, elapsed time and ETA per epoch, heartbeat lines without a terminal, the decode
announcement, the fields of metrics.jsonl and summary.json, and the one report command."""
import json
import os

import pytest

from pgl_fast import experiments, report
from pgl_fast.config import TrainConfig, config_from_args, config_from_dict, explicit_fields
from pgl_fast.data import load_dataset
from pgl_fast.train import main
from pgl_fast.training.progress import Heartbeat, format_duration, run_eta

from helpers import tiny_cli_args
from helpers import make_tree

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(train=96, test=64, batch=32)
TINY = tiny_cli_args(**SIZES)


def warnings_of(argv):
    return config_from_args(argv).no_effect_warnings(explicit_fields(argv))


# ------------------------------------------------------------------------------------------------
# warnings for flags without effect
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--method", "bp", "--aux", "adapt"], ["warning: --aux has no effect with --method bp (it has no aux heads)"]),
    (["--method", "dgl", "-P", "5", "-Q", "1"],
     ["warning: -P/--period has no effect with --method dgl (only pgl alternates local and global epochs)",
      "warning: -Q/--duration has no effect with --method dgl (only pgl alternates local and global epochs)"]),
    # explicitly given, even at its default value, is still a flag the user thinks matters
    (["--method", "infopro", "-J", "4", "--period", "10"],
     ["warning: -P/--period has no effect with --method infopro (only pgl alternates local and global epochs)"]),
    (["--method", "pgl", "--infopro-loss", "softmax", "--ixx-1", "2"],
     ["warning: --infopro-loss has no effect with --method pgl (InfoPro's loss only)",
      "warning: --ixx-1 has no effect with --method pgl (InfoPro's loss only)"]),
    (["--method", "dgl", "--checkpoint-global"],
     ["warning: --checkpoint-global has no effect with --method dgl (it has no global epochs)"]),
    (["--method", "infopro", "--global-memory", "modules", "--ixx-1", "1", "--ixy-1", "1", "--ixx-2", "0", "--ixy-2", "1"],
     ["warning: --global-memory has no effect with --method infopro (it has no global epochs)"]),
    (["--global-memory", "units", "--global-memory-factor", "2"],
     ["warning: --global-memory-factor has no effect with --global-memory units (the factor only guides auto)"]),
    (["--method", "pgl", "-Q", "0", "--checkpoint-global"],
     ["warning: --checkpoint-global has no effect with -Q 0 (no global epochs)"]),
    (["--global-segments", "units"], ["warning: --global-segments has no effect without --checkpoint-global"]),
    (["--amp-dtype", "fp16"], ["warning: --amp-dtype has no effect without --amp"]),
    (["--warmup-lr", "0.1"], ["warning: --warmup-lr has no effect without --warmup-epochs"]),
    (["--sched", "step", "--warmup-epochs", "2"],
     ["warning: --warmup-epochs has no effect with --sched step (warm-up blends into a cosine schedule only)"]),
    (["--recipe", "svhn"], ["warning: --recipe has no effect with --dataset cifar10 (only imagefolder and synthetic take a recipe)"]),
    (["--synthetic-train", "64"], ["warning: --synthetic-train has no effect with --dataset cifar10"]),
    (["--dataset", "synthetic", "--data-dir", "/x"],
     ["warning: --data-dir has no effect with --dataset synthetic (generated in memory)"]),
    (["--dataset", "imagefolder", "--no-download"],
     ["warning: --no-download has no effect with --dataset imagefolder (nothing is downloaded)"]),
    (["--method", "bp", "-J", "8"],
     ["warning: -J/--modules has no effect with --method bp without --checkpoint-global "
      "(end-to-end training is the same for every split)"]),
    (["--aux", "mlpsr", "--aux-widen", "2"],
     ["warning: --aux-widen has no effect with --aux mlpsr (DGL's head has a fixed width)"]),
    (["--momentum", "0", "--no-nesterov"], ["warning: --no-nesterov has no effect with --momentum 0"]),
    (["--progress", "on", "--heartbeat", "5"],
     ["warning: --heartbeat has no effect with --progress on (the progress bar shows the same)"]),
    (["--method", "bp", "--cuda-graphs"], ["warning: --cuda-graphs has no effect with --method bp (only local steps are captured)"]),
])
def test_flags_without_effect_warn(argv, expected):
    assert warnings_of(argv) == expected


@pytest.mark.parametrize("argv", [
    [],  # every default: the table's flags are not given, so nothing warns
    ["--method", "bp"],  # --aux and -P/-Q keep their defaults: silent
    ["--method", "bp", "-J", "1"],
    ["--method", "bp", "-J", "4", "--checkpoint-global"],
    ["--method", "pgl", "--aux", "adapt", "-P", "10", "-Q", "2", "--checkpoint-global", "--global-segments", "units"],
    ["--method", "infopro", "-J", "4", "--infopro-loss", "softmax", "--ixx-1", "1", "--ixy-1", "1",
     "--ixx-2", "1", "--ixy-2", "1"],
    ["--amp", "--amp-dtype", "bf16", "--warmup-epochs", "2", "--warmup-lr", "0.1"],
    ["--dataset", "imagefolder", "--recipe", "svhn"],
    ["--dataset", "synthetic", "--synthetic-train", "64"],
])
def test_flags_with_effect_are_silent(argv):
    assert warnings_of(argv) == []


def test_warnings_from_python_compare_with_defaults():
    # no argv: a config built in Python counts every non-default field as set
    cfg = config_from_dict({"method": "dgl", "duration": 3, "aux": "adapt"})
    assert cfg.no_effect_warnings() == [
        "warning: -Q/--duration has no effect with --method dgl (only pgl alternates local and global epochs)"]
    assert TrainConfig(method="bp").no_effect_warnings() == []


def test_warnings_printed_on_stderr_and_kept_in_header(cli, capsys):
    run = cli("--method", "bp", "--aux", "adapt", "-P", "3", "--epochs", "1", "--heartbeat", "0", "--no-head-eval",
              name="bp", **{**SIZES, "train": 64, "test": 32})
    captured = capsys.readouterr()
    assert "epoch ETA" not in captured.out  # --heartbeat 0: no heartbeat lines
    err = captured.err
    split = "has no effect with --method bp without --checkpoint-global (end-to-end training is the same for every split)"
    expected = ["warning: --aux has no effect with --method bp (it has no aux heads)",
                "warning: --no-head-eval has no effect with --method bp (it has no aux heads)",
                f"warning: -J/--modules {split}", f"warning: --split {split}",
                "warning: -P/--period has no effect with --method bp (only pgl alternates local and global epochs)"]
    assert [ln for ln in err.splitlines() if ln.startswith("warning:")] == expected
    assert run.header["warnings"] == expected
    (row,) = run.rows
    # bp has no aux heads: no local losses to report (never a 0.0 that reads as a perfect fit)
    assert row["module_losses"][:3] == [None, None, None] and row["module_losses"][3] == row["train_loss"] > 0
    assert row["head_acc"] is None


def test_bad_input_stays_one_line_without_the_warnings(tmp_path, capsys):
    assert main(TINY + ["--method", "dgl", "-P", "3", "-o", str(tmp_path / "r"),
                        "--resume", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_no_prefix_matching():
    with pytest.raises(SystemExit) as e:
        config_from_args(["--epoch", "2"])
    assert e.value.code == 2


def test_prefix_is_a_one_line_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--epoch", "2", "--describe"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("error: unrecognized arguments: --epoch 2")


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_heartbeat_is_a_config_error(value, capsys):
    assert main(TINY + ["--heartbeat", value, "--describe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --heartbeat:") and "\n" not in err


# ------------------------------------------------------------------------------------------------
# elapsed time, ETA and heartbeat
# ------------------------------------------------------------------------------------------------

def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 725, 3600, 11400, 86400 + 4 * 3600 + 59)] == \
        ["0s", "45s", "1m00s", "12m05s", "1h00m", "3h10m", "1d04h"]


def test_run_eta_per_phase_by_hand():
    phases = ["local", "local", "global"] * 3  # PGL P=2, Q=1, 9 epochs
    assert run_eta(phases, [], 0) is None
    # after epoch 1 (local, 10 s): every remaining epoch is priced at the only mean there is, 10 s
    assert run_eta(phases, [("local", 10.0)], 1) == pytest.approx(8 * 10.0)
    # after 3 epochs (local 10, local 14, global 30): 4 local epochs at 12 s + 2 global at 30 s
    done = [("local", 10.0), ("local", 14.0), ("global", 30.0)]
    assert run_eta(phases, done, 3) == pytest.approx(4 * 12.0 + 2 * 30.0)
    # after 5: locals 10, 14, 11, 13 (mean 12), global 30: remaining [global, local, local, global]
    done += [("local", 11.0), ("local", 13.0)]
    assert run_eta(phases, done, 5) == pytest.approx(2 * 12.0 + 2 * 30.0)
    assert run_eta(phases, done, 9) == 0


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_heartbeat_with_fake_clock(capsys):
    clock = FakeClock()
    beat = Heartbeat(60, epoch=2, epochs=160, steps=49, batch=32, clock=clock)
    clock.t += 59.9
    assert beat.step(10) is None  # under a minute since the start: quiet
    clock.t += 0.1
    # 20 steps in 60 s: 3 s a step, 640 images / 60 s, 29 steps left = 87 s
    line = beat.step(20)
    assert line == "epoch 3/160 step 20/49, 10.7 img/s, epoch ETA 1m27s"
    clock.t += 30
    assert beat.step(30) is None  # 30 s since the last line
    clock.t += 30
    assert beat.step(40) == "epoch 3/160 step 40/49, 10.7 img/s, epoch ETA 27s"
    assert capsys.readouterr().out.splitlines() == [line, "epoch 3/160 step 40/49, 10.7 img/s, epoch ETA 27s"]


def test_heartbeat_counts_from_the_resumed_step():
    clock = FakeClock()
    beat = Heartbeat(1, epoch=0, epochs=2, steps=100, batch=10, clock=clock, first_step=50, out=open(os.devnull, "w"))
    clock.t += 10
    # 10 steps run in this process in 10 s (steps 51..60): 1 s a step, 40 left
    assert beat.step(60) == "epoch 1/2 step 60/100, 10.0 img/s, epoch ETA 40s"


# ------------------------------------------------------------------------------------------------
# decode announcement
# ------------------------------------------------------------------------------------------------

def test_decode_and_cache_load_are_announced(tmp_path, capsys):
    root = tmp_path / "jpg"
    make_tree(root, classes=("a", "b"), n_train=3, n_test=2, size=(8, 8), fmt="JPEG")
    cache = tmp_path / "cache"
    load_dataset("imagefolder", root, cache_dir=cache)
    lines = capsys.readouterr().out.splitlines()
    train_cache = next(p for p in cache.iterdir() if p.name.startswith("imagefolder-train-"))
    assert lines[0] == f"decoding 6 JPEG images from {root / 'train'} (once; cached in {train_cache})..."
    assert lines[1].startswith("decoded 6 images in ") and lines[1].endswith(" s")
    assert lines[2].startswith(f"decoding 4 JPEG images from {root / 'test'} (once; cached in ")
    assert len(lines) == 4
    load_dataset("imagefolder", root, cache_dir=cache)
    again = capsys.readouterr().out.splitlines()
    assert len(again) == 2 and again[0].startswith(f"loaded 6 train images of {root / 'train'} from the cache ")
    assert again[1].startswith("loaded 4 test images")


# ------------------------------------------------------------------------------------------------
# metrics.jsonl and summary.json fields
# ------------------------------------------------------------------------------------------------

def test_run_heartbeat_eta_metrics_and_summary_fields(tmp_path, cli, capsys):
    run = cli("--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "--heartbeat", "1e-9", name="pgl", **SIZES)
    out = run.out
    lines = capsys.readouterr().out.splitlines()
    beats = [ln for ln in lines if " step " in ln and "epoch ETA" in ln]
    # 96 images at batch 32: 3 steps per epoch, a line after each with a heartbeat this short
    assert [ln.split(",")[0] for ln in beats] == [f"epoch {e}/2 step {s}/3" for e in (1, 2) for s in (1, 2, 3)]
    ends = [ln for ln in lines if ln.startswith("epoch ") and " elapsed " in ln]
    assert len(ends) == 2 and all(" ETA " in ln for ln in ends)
    assert ends[-1].endswith("ETA 0s")
    rows = run.rows
    assert [r["phase"] for r in rows] == ["local", "global"]
    for r in rows:
        assert len(r["module_losses"]) == 4 and len(r["head_acc"]) == 3  # J modules, J-1 aux heads
        assert r["train_loss"] == r["module_losses"][-1]
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0  # fractions, not percent
        assert all(0.0 <= a <= 1.0 for a in r["head_acc"])
    summary = run.summary
    counts = summary["parameters"]
    assert counts["total"] == counts["backbone"] + counts["aux"]
    # each fact once: no flat copies of the parameter counts
    assert "parameters_with_aux" not in summary and "parameters_without_aux" not in summary
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    # the report reads the new form
    (r,) = report.collect_runs(str(tmp_path))
    assert (r["parameters_with_aux"], r["parameters_without_aux"]) == (counts["total"], counts["backbone"])


def test_report_reads_committed_summaries_with_the_old_fields():
    grid = os.path.join(REPO, "docs", "results", "experiments", "table1")
    if not os.path.isdir(grid):
        pytest.skip("no committed table1 runs")
    runs = report.collect_runs(grid)
    assert runs
    for r in runs:
        with open(os.path.join(grid, r["name"], "summary.json")) as f:
            s = json.load(f)
        assert r["parameters_with_aux"] == s["parameters"]["total"]
        assert r["parameters_without_aux"] == s["parameters"]["backbone"]


def test_report_reads_summaries_with_only_the_flat_fields(tmp_path):
    d = tmp_path / "old-run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({
        "method": "dgl", "aux": "1c2f", "arch": "resnet8", "J": 4, "seed": 0, "final_test_acc": 0.5,
        "best_test_acc": 0.6, "best_epoch": 1, "parameters_with_aux": 1234, "parameters_without_aux": 1000,
        "peak_mem_mib_by_phase": {"local": 10.0}, "wall_seconds": 1.0}))
    (r,) = report.collect_runs(str(tmp_path))
    assert (r["parameters_with_aux"], r["parameters_without_aux"]) == (1234, 1000)


# ------------------------------------------------------------------------------------------------
# one report command
# ------------------------------------------------------------------------------------------------

def test_experiments_report_points_to_the_report_command(tmp_path, capsys):
    assert experiments.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and f"python -m pgl_fast.report {tmp_path}" in err
    assert not (tmp_path / "report.md").exists()


def test_setup_entry_points_exist():
    import ast
    import importlib

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    scripts = [el.value for node in ast.walk(tree) if isinstance(node, ast.Dict)
               for k, v in zip(node.keys, node.values)
               if isinstance(k, ast.Constant) and k.value == "console_scripts" for el in v.elts]
    assert scripts
    for entry in scripts:
        name, target = entry.split("=")
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), entry
    assert sorted(e.split("=")[0] for e in scripts) == ["pgl-experiments", "pgl-report", "pgl-train"]


def test_runner_and_report_have_no_prefix_matching(tmp_path, capsys):
    # --seed would be taken as --seeds, --lay as --layout
    assert experiments.main(["table1", "--seed", "1", "--out", str(tmp_path), "--dry-run"]) == 2
    assert "unrecognized arguments: --seed 1" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--lay", "table2"]) == 2
    assert "unrecognized arguments: --lay table2" in capsys.readouterr().err
