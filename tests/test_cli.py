"""End-to-end CLI runs (in-process and as real subprocesses) and the bad-input table."""
import os
import subprocess
import sys

import pytest

from pgl_fast.train import main

from helpers import tiny_cli_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = dict(train=96, test=64, batch=32, progress=None)  # --progress at its default: the epoch lines are checked
TINY = tiny_cli_args(**SIZES)


@pytest.mark.parametrize("method", ["bp", "dgl", "infopro", "pgl"])
def test_each_method_runs_and_writes_outputs(cli, method, capsys):
    extra = ["--ixx-1", "1", "--ixy-1", "0.5", "--ixx-2", "0", "--ixy-2", "1"] if method == "infopro" else []
    run = cli("--method", method, "-P", "1", "-Q", "1", "--epochs", "2", *extra, name=method, **SIZES)
    out = run.out
    for name in ("config.json", "header.json", "metrics.jsonl", "summary.json"):
        assert (out / name).exists(), name
    rows = run.rows
    assert [r["epoch"] for r in rows] == [1, 2]
    expected = {"bp": ["bp", "bp"], "dgl": ["local", "local"], "infopro": ["local", "local"],
                "pgl": ["local", "global"]}[method]
    assert [r["phase"] for r in rows] == expected
    for key in ("lr", "train_loss", "train_acc", "test_acc", "images_per_s", "epoch_seconds", "peak_mem_mib",
                "module_losses", "head_acc"):
        assert key in rows[0], key
    if method in ("dgl", "pgl"):
        assert len(rows[0]["head_acc"]) == 3
    summary = run.summary
    assert summary["best_test_acc"] >= summary["final_test_acc"] - 1e-12
    assert summary["parameters"]["total"] >= summary["parameters"]["backbone"]
    cfg = run.config
    assert cfg["method"] == method and cfg["batch_size"] == 32
    header = run.header
    assert header["torch"] and header["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "phase=local" in printed or method == "bp"


def test_describe_prints_module_table(capsys):
    assert main(["--arch", "resnet32", "-J", "16", "--aux", "adapt", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "total 993,520" in out
    assert out.count("2c2f") == 6 and out.count("1c3f") == 5 and "classifier" in out


def run_cli(args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "pgl_fast.train"] + args, capture_output=True, text=True,
                          cwd=cwd, timeout=300)


BAD = [
    (["--method", "sgd"], "--method"),
    (["--arch", "resnet33"], "--arch"),
    (["--aux", "3c3f"], "--aux"),
    (["--dataset", "mnist"], "--dataset"),
    (["-J", "5"], "supported J: 1, 2, 3, 4, 8, 16"),
    (["-P", "0"], "-P/--period"),
    (["-Q", "-1"], "-Q/--duration"),
    (["-b", "0"], "-b/--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--split", "balanced", "-J", "8", "--arch", "resnet110"], "supported J: 1, 2, 3, 4"),
    (["--method", "dgl", "-J", "1"], "-J/--modules"),
    (["--method", "infopro", "--arch", "resnet56", "-J", "4"], "--ixx-1"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs"),
    (["--device", "cuda"], "--device"),
    (["--device", "tpu"], "--device"),
    (["--head-kernels", "triton", "--device", "cpu", "--aux", "mlpsr"], "--head-kernels"),
    (["--batch-size", "abc"], "--batch-size"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line(tmp_path, args, needle, capsys):
    if "--device" in args and "cuda" in args and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    try:
        rc = main(["--dataset", "synthetic", "--epochs", "1", "-o", str(tmp_path / "o")] + args)
    except SystemExit as e:  # argparse's own type/choice errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # validated before any work


@pytest.mark.parametrize("args", [["-J", "5"], ["--method", "sgd"]])
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, args):
    r = run_cli(["--dataset", "synthetic", "-o", str(tmp_path / "o")] + args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli(TINY + ["--epochs", "1", "-o", str(blocker / "sub")])
    assert r.returncode == 2 and "--output-dir" in r.stderr and "Traceback" not in r.stderr
