"""A short CPU training on the offline CIFAR-10 subset learns well above chance (10%) with every
method."""
import json

import pytest

from pgl_fast.train import main


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bp", "dgl", "infopro", "pgl"])
def test_learns_above_chance_on_offline_cifar(offline_cifar, tmp_path, method):
    args = ["--dataset", "imagefolder", "--data-dir", offline_cifar, "--arch", "resnet8", "-J", "4",
            "--split", "layerwise", "--method", method, "--aux", "1c2f", "-P", "2", "-Q", "1",
            "--epochs", "4", "--train-subset", "2048", "--test-subset", "1000", "-b", "64", "--lr", "0.1",
            "--no-head-eval", "-o", str(tmp_path / method)]
    if method == "infopro":
        args += ["--infopro-loss", "softmax", "--ixx-1", "1", "--ixy-1", "1", "--ixx-2", "0.2", "--ixy-2", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["best_test_acc"] > 0.30, summary
