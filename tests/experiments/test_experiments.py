"""The experiment runner and report end to end on a tiny synthetic grid: runs, skip of finished runs,
resume of an unfinished one, report tables, results.json and PNG plots; and the runner's bad input."""
import json

import pytest

from pgl_fast import experiments
from pgl_fast.experiments import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# dgl (two seeds at J=4 in the tiny protocol) and PGL (Aux-Adapt): three runs
SELECT = ["table1", "--protocol", "tiny", "--device", "cpu", "--only", "J=4,variant=dgl|pgl-adapt"]
NAMES = {"resnet8-dgl-J4-s0", "resnet8-dgl-J4-s1", "resnet8-pgl-adapt-J4-P1Q1-s0"}


def _checkpoints(run_dir):
    ck = run_dir / "checkpoints"
    return sorted(p for p in ck.iterdir() if p.suffix == ".pt") if ck.is_dir() else []


def test_tiny_grid_runs_skips_resumes_and_reports(tmp_path):
    pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (pip install -e '.[report]')")
    out = tmp_path / "exp"
    grid = out / "table1"

    # 1. the grid runs (two subprocesses at a time), each run in its own directory
    res = experiments.execute(SELECT + ["--out", str(out), "--workers", "2"])
    assert res.exit_code == 0 and not res.failed, res
    assert set(res.executed) == NAMES and set(res.finished) == NAMES
    for name in NAMES:
        d = grid / name
        for f in ("summary.json", "metrics.jsonl", "config.json", "header.json", "command.txt", "train.log"):
            assert (d / f).is_file(), (name, f)
        cmd = (d / "command.txt").read_text()
        assert "-m pgl_fast.train" in cmd and f"-o {d}" in cmd and "--resume" not in cmd
    manifest = json.loads((grid / "grid.json").read_text())
    assert manifest["grid"] == "table1" and manifest["protocol"]["name"] == "tiny"
    assert set(manifest["runs"]) == NAMES and all(r["status"] == "finished" for r in manifest["runs"].values())
    assert (grid / "commands.txt").read_text().count("-m pgl_fast.train") == 3
    summaries = {n: (grid / n / "summary.json").stat().st_mtime_ns for n in NAMES}

    # 2. a second invocation trains nothing
    res = experiments.execute(SELECT + ["--out", str(out), "--no-report"])
    assert res.executed == [] and set(res.skipped) == NAMES and res.exit_code == 0
    assert {n: (grid / n / "summary.json").stat().st_mtime_ns for n in NAMES} == summaries

    # 3. an unfinished run (no summary, newest checkpoint gone: stopped inside epoch 2) is resumed
    victim = grid / "resnet8-pgl-adapt-J4-P1Q1-s0"
    (victim / "summary.json").unlink()
    ckpts = _checkpoints(victim)
    assert len(ckpts) == 2
    ckpts[-1].unlink()  # keep the mid-epoch-2 checkpoint (--save-every 1)
    res = experiments.execute(SELECT + ["--out", str(out)])
    assert res.executed == [victim.name] and res.resumed == [victim.name] and res.exit_code == 0
    assert set(res.skipped) == NAMES - {victim.name}
    assert (victim / "summary.json").is_file()
    assert (victim / "command.txt").read_text().strip().splitlines()[-1].endswith("--resume auto")
    assert "resumed from" in (victim / "train.log").read_text()
    epochs = [json.loads(line)["epoch"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    phases = [json.loads(line)["phase"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["local", "global"]  # P=1, Q=1
    for n in NAMES - {victim.name}:
        assert (grid / n / "summary.json").stat().st_mtime_ns == summaries[n]

    # 4. the report (written by the runner at the end; and again through the report CLI)
    assert report.main([str(grid)]) == 0
    md = (grid / "report.md").read_text()
    assert "| Method | J=4 |" in md
    for label in ("DGL", "PGL (Aux-Adapt)"):
        assert f"| {label} |" in md
    assert "±" in md and "(2)" in md and "(1)" in md  # dgl: 2 seeds, pgl: 1
    assert "synthetic" in md and "Test set" in md and "tiny" in md
    assert "88.85" in md and "83.63" in md  # the paper's Table 1 (resnet32) is quoted
    assert "PGL (Aux-Adapt) − DGL" in md and "paper (resnet32) +2.34" in md  # J=4: 90.86 - 88.52
    results = json.loads((grid / "results.json").read_text())
    assert sorted(r["name"] for r in results) == sorted(NAMES)
    for r in results:
        for k in ("method", "J", "aux", "P", "Q", "seed", "final_test_acc", "best_test_acc",
                  "parameters_with_aux", "peak_mem_mib_by_phase", "wall_seconds"):
            assert k in r, k
        # read from summary.json's parameters dict (its only form of the counts)
        assert r["parameters_with_aux"] > r["parameters_without_aux"] > 0
    assert {r["method"] for r in results} == {"dgl", "pgl"}
    for png in ("acc_per_epoch_J4.png", "memory_vs_J.png"):
        data = (grid / png).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, png

    # the other layouts from the same runs
    for layout, expect in (("table2", "J=4 params"), ("table3", "| Q=1 |")):
        dest = tmp_path / layout
        assert report.main([str(grid), "--layout", layout, "--out", str(dest)]) == 0
        assert expect in (dest / "report.md").read_text()
        assert (dest / "memory_vs_J.png").read_bytes()[:8] == PNG_SIGNATURE


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "exp"
    assert experiments.main(["table1", "--protocol", "cpu", "--out", str(out), "--dry-run", "--data-dir", "/nowhere",
                             "--only", "J=16", "--only", "variant=bp", "--only", "variant=dgl|pgl-adapt,J=4"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "pgl_fast.train" in ln]
    assert len(lines) == 10  # 6 methods at J=16 (+1 seed for dgl and pgl-adapt) + dgl, pgl-adapt at J=4
    assert all("--epochs 18" in ln and "--train-subset 4000" in ln and "-b 64" in ln for ln in lines)
    assert sum("-P 5 -Q 1" in ln for ln in lines) == 5
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["table9"], "unknown grid"),
    (["table1", "--protocol", "fast"], "--protocol"),
    (["table1", "--only", "J=3"], "selects no run"),
    (["table1", "--only", "colour=red"], "unknown key"),
    (["table1", "--only", "J=x"], "integers"),
    (["table1", "--only", "variant=sgd"], "unknown variant"),
    (["table1", "--seeds", "a,b"], "--seeds"),
    (["table1", "--workers", "0"], "--workers"),
    (["table1", "--protocol", "tiny", "--dataset", "cifar10"], "synthetic"),
    (["table1", "--no-such-flag"], "unrecognized"),
])
def test_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path):
    assert experiments.main(argv + ["--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err


def test_protocols_keep_the_papers_global_share():
    paper, cpu = experiments.PROTOCOLS["paper"], experiments.PROTOCOLS["cpu"]
    assert (paper.epochs, paper.batch_size, paper.lr, paper.P, paper.Q) == (160, 1024, 0.8, 10, 2)
    assert cpu.Q / (cpu.P + cpu.Q) == paper.Q / (paper.P + paper.Q)
    assert cpu.epochs % (cpu.P + cpu.Q) == 0  # whole cycles


def test_report_of_missing_or_empty_folder_is_exit_2(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert report.main([str(tmp_path)]) == 2
    assert report.main([str(tmp_path), "--layout", "table7"]) == 2


def _rec(variant, seed, best, J=16, n_test=10000):
    return {"variant": variant, "J": J, "seed": seed, "best_test_acc": best, "final_test_acc": best,
            "test_images": n_test}


def test_gap_lines_pair_seeds_and_state_the_test_set_noise():
    runs = [_rec("dgl", 0, 0.50), _rec("dgl", 1, 0.52), _rec("dgl", 2, 0.40),
            _rec("pgl-adapt", 0, 0.53), _rec("pgl-adapt", 1, 0.5150)]
    (line,) = report._gap_lines(runs, "resnet32", [16])
    # means: pgl-adapt 52.25, dgl (50+52+40)/3 = 47.33; the unpaired seed 2 of dgl is left out of the pairs
    assert "ours +4.92 (best)" in line and "paper +5.22" in line
    assert "per seed (best): seed 0 +3.00, seed 1 -0.50" in line
    # sqrt(0.5 * 0.5 / 10000) = 0.5 points; times sqrt(2) for a difference
    assert "one accuracy ≈ ±0.50" in line and "of a difference ≈ ±0.71" in line
    (single,) = report._gap_lines(runs[:1] + runs[3:4], "resnet32", [16])
    assert "per seed" not in single


def test_the_packages_dependencies_point_one_way():
    # grids <- report <- runner: the report never reaches back into the runner, nor the grids into
    # either, and only the package's entry points import the runner
    import ast
    import os

    import pgl_fast.experiments as pkg

    folder = os.path.dirname(pkg.__file__)
    deps = {}
    for name in ("grids", "report", "runner"):
        tree = ast.parse(open(os.path.join(folder, name + ".py")).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgl_fast.experiments"):
                found.add(node.module.rsplit(".", 1)[-1])
        deps[name] = found
    assert deps == {"grids": set(), "report": {"grids"}, "runner": {"report", "grids"}}
    top = ast.parse(open(os.path.join(os.path.dirname(folder), "report.py")).read())
    assert {n.module for n in ast.walk(top) if isinstance(n, ast.ImportFrom)} == {"experiments.report"}


def _fake_training(monkeypatch, code: str):
    """Every run's training replaced by ``python -c code``: the runner's bookkeeping around a
    subprocess is what these tests check, not training."""
    from pgl_fast.experiments import runner
    import sys

    monkeypatch.setattr(runner, "command", lambda r, st, resume: [sys.executable, "-c", code])


def test_a_failing_run_is_reported_failed_with_its_exit_code(tmp_path, monkeypatch):
    _fake_training(monkeypatch, "import sys; print('boom'); sys.exit(3)")
    res = experiments.execute(["table1", "--protocol", "tiny", "--device", "cpu", "--only", "J=4,variant=dgl",
                               "--seeds", "0", "--out", str(tmp_path), "--no-report"])
    assert res.failed == [("resnet8-dgl-J4-s0", 3)] and res.exit_code == 1 and res.finished == []
    manifest = json.loads((tmp_path / "table1" / "grid.json").read_text())
    assert manifest["runs"]["resnet8-dgl-J4-s0"]["status"] == "failed (exit 3)"
    assert "boom" in (tmp_path / "table1" / "resnet8-dgl-J4-s0" / "train.log").read_text()


def test_sigterm_stops_the_running_trainings_and_leaves_the_rest_pending(tmp_path, monkeypatch):
    import os
    import signal
    import threading
    import time

    _fake_training(monkeypatch, "import time; time.sleep(120)")
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.time()
    res = experiments.execute(SELECT + ["--out", str(tmp_path), "--no-report"])  # 3 runs, 1 worker
    assert time.time() - t0 < 60  # the 120 s child was terminated, not waited for
    assert res.interrupted and res.exit_code == 130 and res.finished == [] and res.failed == []
    assert len(res.executed) == 1 and sorted(res.pending) == sorted(NAMES)
    manifest = json.loads((tmp_path / "table1" / "grid.json").read_text())
    assert all(r["status"] != "running" for r in manifest["runs"].values())
