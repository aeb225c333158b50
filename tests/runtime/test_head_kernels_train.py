"""`--head-kernels triton` trains end to end (under the Triton interpreter on the CPU) and gives
the same losses and accuracies as the eager heads."""
import json

import pytest

from pgl_fast.train import main

from helpers import tiny_cli_args

ARGS = (tiny_cli_args(train=16, test=8, J=2, split="even", batch=8, progress=None)
        + ["--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "--deterministic"])


def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("aux", ["1c2f", "2c2f"])
def test_triton_heads_match_eager_training(tmp_path, aux):
    pytest.importorskip("triton")
    out = {}
    for kind in ("eager", "triton"):
        assert main(ARGS + ["--aux", aux, "--head-kernels", kind, "-o", str(tmp_path / kind)]) == 0
        out[kind] = _rows(tmp_path / kind / "metrics.jsonl")
        header = json.loads((tmp_path / kind / "header.json").read_text())
        assert header["head_kernels"] == kind
    for e, t in zip(out["eager"], out["triton"]):
        assert e["phase"] == t["phase"]
        # fp32 kernels differ from cuDNN/oneDNN only in summation order
        assert t["module_losses"] == pytest.approx(e["module_losses"], rel=1e-4, abs=1e-5)
        assert t["test_acc"] == pytest.approx(e["test_acc"], abs=1e-9)
