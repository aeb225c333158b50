"""`--head-kernels triton` trains end to end (under the Triton interpreter on the CPU) and gives
the same losses and accuracies as the eager heads."""
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = dict(train=16, test=8, J=2, split="even", batch=8, progress=None)
ARGS = ["--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "--deterministic"]


@pytest.mark.parametrize("aux", ["1c2f", "2c2f"])
def test_triton_heads_match_eager_training(cli, aux):
    pytest.importorskip("triton")
    out = {}
    for kind in ("eager", "triton"):
        run = cli(*ARGS, "--aux", aux, "--head-kernels", kind, name=kind, **SIZES)
        out[kind] = run.rows
        assert run.header["head_kernels"] == kind
    for e, t in zip(out["eager"], out["triton"]):
        assert e["phase"] == t["phase"]
        # fp32 kernels differ from cuDNN/oneDNN only in summation order
        assert t["module_losses"] == pytest.approx(e["module_losses"], rel=1e-4, abs=1e-5)
        assert t["test_acc"] == pytest.approx(e["test_acc"], abs=1e-9)
