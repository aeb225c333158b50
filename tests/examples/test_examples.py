"""The three examples run as written (tiny subset of the offline CIFAR-10 copy, 2 epochs of PGL:
one local, one global)."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["custom_cnn", "torchvision_resnet18", "small_vit"])
def test_example_runs(name, offline_cifar, tmp_path):
    out = tmp_path / name
    summary = load_example(name).main(["--data", offline_cifar, "--train-subset", "64", "--test-subset", "32",
                                        "--epochs", "2", "-P", "1", "-Q", "1", "-b", "32", "-o", str(out)])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines] == ["local", "global"]
    assert summary["epochs"] == 2 and summary["method"] == "pgl"
    assert all(r["train_loss"] == r["train_loss"] for r in lines)  # finite, not NaN
    assert (out / "summary.json").exists() and (out / "header.json").exists()
