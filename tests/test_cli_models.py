"""The CLI on models other than the CIFAR ResNets: torchvision's (``--arch torchvision:<name>``,
``--cifar-stem``, ``--cuts``) and a user's factory (``--model package.module:factory``)."""
import json
import os
import subprocess
import sys

import pytest

from pgl_fast.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16", "-b", "16", "--lr", "0.05",
        "--progress", "off", "--heartbeat", "0"]


def test_torchvision_resnet18_with_cifar_stem_trains_pgl(tmp_path):
    out = tmp_path / "tv"
    assert main(["--arch", "torchvision:resnet18", "--cifar-stem", "--cuts", "layer1,layer2,layer3", "--method",
                 "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "-o", str(out), *TINY]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["local", "global"]
    header = json.loads((out / "header.json").read_text())
    assert len(header["split_ranges"]) == 4  # J = cuts + 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["modules"] == 4 and cfg["cuts"] == "layer1,layer2,layer3"


def test_user_factory_with_cuts(tmp_path):
    out = tmp_path / "factory"
    code = subprocess.run([sys.executable, "-m", "pgl_fast.train", "--model", "examples.custom_cnn:build_network",
                           "--cuts", "0,1,2", "--method", "dgl", "--epochs", "1", "-o", str(out), *TINY],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert code.returncode == 0, code.stderr
    assert "examples.custom_cnn:build_network split into J=4 modules (--cuts 0,1,2)" in code.stdout


@pytest.mark.parametrize("argv,match", [
    (["--arch", "torchvision:resnet18"], "--cuts: is required"),
    (["--arch", "torchvision:resnet18", "--cuts", "layer9"], "no such top-level child"),
    (["--arch", "torchvision:notamodel", "--cuts", "a"], "torchvision has no classification model"),
    (["--cifar-stem"], "--cifar-stem"),
    (["--cuts", "layer1"], "--cuts: applies to"),
    (["--model", "nosuchpkg.mod:f", "--cuts", "0"], "cannot import nosuchpkg.mod"),
    (["--arch", "torchvision:resnet18", "--cuts", "layer1", "-J", "3"], "-J 3 disagrees"),
])
def test_bad_model_flags_are_one_line_errors(argv, match, capsys, tmp_path):
    assert main([*argv, *TINY, "--epochs", "1", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
