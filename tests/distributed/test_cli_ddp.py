"""``torchrun --nproc_per_node=2 -m pgl_fast.train ... --sync-bn`` against the same run in one process,
through a kill and ``--resume auto`` in the middle of an epoch: the same metrics and the same weights
(fp32 tolerance; PGL crossing its phase switch, a last batch that splits unevenly)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pgl_fast.train import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--dataset", "synthetic", "--synthetic-train", "36", "--synthetic-test", "20", "--arch", "resnet8", "-J", "3",
        "--split", "even", "--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
        "--device", "cpu", "--progress", "off", "--save-every", "2"]  # 36 = 4 x 8 + 4: the last batch splits 2 + 2


def torchrun(out, *extra, kill_at=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("PGL_FAST_KILL_AT", None)
    if kill_at:
        env["PGL_FAST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgl_fast.train",
           *ARGS, "--sync-bn", "-o", str(out), "--resume", "auto", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_torchrun_sync_bn_kill_resume_equals_one_process(tmp_path, one_thread):
    assert main([*ARGS, "-o", str(tmp_path / "one")]) == 0
    killed = torchrun(tmp_path / "two", kill_at="2:3")  # both ranks die in epoch 2 after step 3
    assert killed.returncode != 0
    resumed = torchrun(tmp_path / "two")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "ckpt-e0001-s000002.pt" in resumed.stdout
    assert resumed.stdout.count("done: final") == 1  # rank 0 alone prints
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["phase"] for r in two] == ["local", "global"]
    for a, b in zip(one, two):
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"] and a["head_acc"] == b["head_acc"]
        for k in ("train_loss", "test_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5)
    wa = torch.load(tmp_path / "one" / "checkpoints" / "ckpt-e0002-s000000.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "checkpoints" / "ckpt-e0002-s000000.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5, msg=k)
    header = json.load(open(tmp_path / "two" / "header.json"))
    assert header["world_size"] == 2 and header["sync_bn"] is True


def test_sync_bn_needs_torchrun(tmp_path, capsys):
    assert main([*ARGS, "--sync-bn", "-o", str(tmp_path / "x")]) == 2
    assert "--sync-bn synchronises batch norm across the ranks of a torchrun launch" in capsys.readouterr().err
