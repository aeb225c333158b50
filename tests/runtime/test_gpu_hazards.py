"""What would stop a first GPU run, checked on the CPU.

- CUDA autocast refuses ``F.binary_cross_entropy`` whatever its input dtype (the CPU autocast
  allows it): the InfoPro reconstruction loss must never call it while autocast is on.
- ``torch.use_deterministic_algorithms(True)`` raises on CUDA for the backward of adaptive average
  pooling and of bilinear interpolation: under ``--deterministic`` no training step may dispatch
  those backward ops.
- SupCon's similarity matrix is computed in fp32 even under bf16 autocast.
- The non-finite gradient check is one multi-tensor norm per module, not one norm per parameter.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pgl_fast.core.methods import PGL, InfoPro
from pgl_fast.models.heads import MLPSRHead, adaptive_avg_pool, reconstruction_loss, supcon_loss, upsample_bilinear

# Backward ops that CUDA implements only with atomics and refuses in deterministic mode.
CUDA_NONDETERMINISTIC = ("_adaptive_avg_pool2d_backward", "upsample_bilinear2d_backward")


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:  # the setting is process-global
        torch.use_deterministic_algorithms(before)


def _infopro():
    return InfoPro(contrast=False, lambdas=((1.0, 0.5), (0.5, 1.0)))


@pytest.mark.parametrize("case", ["infopro-local", "mlpsr-local", "mlpsr-global"])
def test_deterministic_steps_avoid_cuda_nondeterministic_backwards(case, tiny_model, tiny_learner):
    infopro = case.startswith("infopro")
    net = tiny_model(3, image_size=16, split="auto", aux="1c2f" if infopro else "mlpsr", decoders=infopro)
    learner = tiny_learner(net, _infopro() if infopro else PGL(1, 1), lr=0.05)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    rec = OpRecorder()
    with deterministic(), rec:
        if case.endswith("global"):
            learner.global_step(x, y)
        else:
            learner.local_step(x, y, torch.rand(4, 3, 16, 16))
    assert any(op.endswith("_backward") for op in rec.ops)  # the recorder does see the backward
    assert not [op for op in rec.ops if op in CUDA_NONDETERMINISTIC]


def test_infopro_amp_never_calls_plain_bce_under_autocast(monkeypatch, tiny_model, tiny_learner):
    """Mimics CUDA autocast's refusal on the CPU: plain BCE while autocast is on raises."""
    real = F.binary_cross_entropy

    def refused(*a, **k):
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            raise RuntimeError("binary_cross_entropy is unsafe to autocast")
        return real(*a, **k)

    monkeypatch.setattr(F, "binary_cross_entropy", refused)
    net = tiny_model(3, image_size=16, split="auto", decoders=True)
    learner = tiny_learner(net, _infopro(), lr=0.05, amp=torch.bfloat16)
    learner.local_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), torch.rand(4, 3, 16, 16))
    assert all(torch.isfinite(torch.tensor(learner.stats.read()["losses"])))


def test_reconstruction_loss_is_bce_of_the_sigmoid():
    torch.manual_seed(0)
    z = torch.randn(3, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    img = torch.rand(3, 3, 5, 5, dtype=torch.float64)
    p = torch.sigmoid(z)
    ref = -(img * torch.log(p) + (1 - img) * torch.log(1 - p)).mean()
    got = reconstruction_loss(z, img)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(ref, z)[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("size_in,size_out", [(32, 8), (16, 4), (8, 2), (2, 2), (7, 3), (10, 4), (5, 2)])
def test_adaptive_avg_pool_equals_torch(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in, dtype=torch.float64, requires_grad=True)
    ref = F.adaptive_avg_pool2d(x, size_out)
    got = adaptive_avg_pool(x, size_out)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("size_in,size_out", [(8, 32), (16, 32), (32, 32), (1, 4), (24, 96), (5, 7)])
def test_deterministic_bilinear_equals_interpolate(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in, dtype=torch.float64, requires_grad=True)
    ref = F.interpolate(x, size=[size_out, size_out], mode="bilinear", align_corners=True)
    with deterministic():
        got = upsample_bilinear(x, size_out)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-12, atol=1e-12)


def test_mlpsr_head_equals_adaptive_pooling_definition():
    torch.manual_seed(0)
    head = MLPSRHead(16, 32, 10).double()
    x = torch.randn(3, 16, 32, 32, dtype=torch.float64)
    ref = head.mlp(torch.flatten(F.adaptive_avg_pool2d(head.convs(F.adaptive_avg_pool2d(x, 8)), 2), 1))
    torch.testing.assert_close(head(x), ref, rtol=1e-12, atol=1e-12)


def test_supcon_similarity_in_fp32_under_autocast():
    torch.manual_seed(0)
    feats = torch.randn(256, 128)
    y = torch.randint(0, 10, (256,))
    ref = supcon_loss(feats.double(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = supcon_loss(feats, y)
    assert got.dtype == torch.float32
    # bf16 similarities give ~1e-3 relative error at this size; fp32 about 1e-7
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=0)


def test_gradient_check_is_one_multi_tensor_norm_per_module(tiny_model, tiny_learner):
    net = tiny_model(3, image_size=16, split="auto")
    learner = tiny_learner(net, PGL(1, 1), lr=0.05)
    rec = OpRecorder()
    with rec:
        learner.local_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    assert rec.ops.count("_foreach_norm") == net.J
    assert rec.ops.count("linalg_vector_norm") == 0 and rec.ops.count("norm") == 0
