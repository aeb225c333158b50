"""Aux-head conv benchmarks: fused Triton conv->BN->ReLU(->GAP) vs the eager reference.

CUDA (skipped without a GPU): forward+backward of each InfoPro head stage at B=1024 in bf16 (the
AMP dtype), one benchmark per (shape, provider) with ``group`` = shape so pytest-benchmark puts
fused and eager side by side. ``extra_info`` holds CUDA-event timings (``triton.testing.do_bench``
p20/p50/p80), the peak memory of one step, the bytes saved for backward, and, for the fused
provider, the eager numbers and ratios measured in the same run.

CPU: a tiny run under the Triton interpreter comparing only the bytes saved for backward (the
interpreter's times mean nothing).

    pytest bench/test_bench_heads.py --benchmark-only --benchmark-json heads.json
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    # before pgl_fast.kernels is imported: @triton.jit picks the interpreter then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pgl_fast.kernels import conv_bn_relu, reference_conv_bn_relu, triton_available  # noqa: E402
from pgl_fast.kernels.conv_bn_relu import _interpreting  # noqa: E402
from pgl_fast.kernels.reference import TOLERANCES, saved_tensor_bytes  # noqa: E402

BATCH = 1024
# (name, C_in, H=W, C_out, stride, pool): the aux heads' first conv at each of the CIFAR ResNet's
# three stages (16, 32, 64 channels at 32, 16, 8 pixels), and the second conv of the 2c2f head
SHAPES = [
    ("stage1_16x32_s2_32", 16, 32, 32, 2, True),
    ("stage2_32x16_s2_64", 32, 16, 64, 2, True),
    ("stage3_64x8_s1_64", 64, 8, 64, 1, True),
    ("2c2f_conv2_32x16_s1_32_full", 32, 16, 32, 1, False),
]
PROVIDERS = {"fused": conv_bn_relu, "eager": reference_conv_bn_relu}

_CUDA_OK = torch.cuda.is_available() and not _interpreting() and triton_available("cuda")[0]
needs_cuda = pytest.mark.skipif(
    not _CUDA_OK, reason="CUDA head benchmarks need a GPU and compiled Triton (TRITON_INTERPRET unset)"
)


def _setup(c_in, hw, c_out, batch, device, dtype):
    """Head input and parameters as in training: bf16 activations, fp32 parameters and buffers."""
    x = torch.randn(batch, c_in, hw, hw, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) / (3 * c_in**0.5)).requires_grad_()
    bn_weight = torch.ones(c_out, device=device, requires_grad=True)
    bn_bias = torch.zeros(c_out, device=device, requires_grad=True)
    running = (torch.zeros(c_out, device=device), torch.ones(c_out, device=device))
    return x, weight, bn_weight, bn_bias, running


def _step_fn(provider, stride, pool, tensors):
    """One forward+backward of the head conv part; grads are dropped, not accumulated."""
    fn = PROVIDERS[provider]
    x, weight, bn_weight, bn_bias, (rm, rv) = tensors
    leaves = (x, weight, bn_weight, bn_bias)
    out = fn(*leaves, rm, rv, stride=stride, training=True, momentum=0.1, eps=1e-5, pool=pool)
    grad_out = torch.randn_like(out)

    def step():
        for t in leaves:
            t.grad = None
        y = fn(*leaves, rm, rv, stride=stride, training=True, momentum=0.1, eps=1e-5, pool=pool)
        y.backward(grad_out)

    return step


def _measure(provider, c_in, hw, c_out, stride, pool):
    """CUDA numbers for one provider: times (ms), peak step memory (MiB), saved bytes."""
    import triton.testing

    tensors = _setup(c_in, hw, c_out, BATCH, "cuda", torch.bfloat16)
    step = _step_fn(provider, stride, pool, tensors)
    step()  # compile / cuDNN heuristics
    torch.cuda.synchronize()
    p50, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    x, weight, bn_weight, bn_bias, (rm, rv) = tensors
    saved, _ = saved_tensor_bytes(
        lambda: PROVIDERS[provider](x, weight, bn_weight, bn_bias, rm, rv, stride=stride,
                                    training=True, momentum=0.1, eps=1e-5, pool=pool)
    )
    return dict(ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_step_mib=peak_mib, saved_bytes=saved), step


def _max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the device (the kernel tests' atol scale)."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()


def _check_fused_matches_reference(c_in, hw, c_out, stride, pool):
    """The timed fused head at the timed shape and dtype against the float64 eager reference:
    output, the four gradients and the running statistics, within the kernel tests' bf16 tolerance
    (relative to each tensor's largest reference value). A benchmark of a wrong kernel is worthless."""
    x, weight, bn_weight, bn_bias, (rm, rv) = _setup(c_in, hw, c_out, BATCH, "cuda", torch.bfloat16)
    # the fused conv runs on the bf16-rounded weight; give the reference exactly those values
    with torch.no_grad():
        weight.copy_(weight.to(torch.bfloat16).float())
    kw = dict(stride=stride, training=True, momentum=0.1, eps=1e-5, pool=pool)
    leaves = (x, weight, bn_weight, bn_bias)
    rm_f, rv_f = rm.clone(), rv.clone()
    out = conv_bn_relu(*leaves, rm_f, rv_f, **kw)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rm_r, rv_r = rm.double(), rv.double()
    ref = reference_conv_bn_relu(*ref_leaves, rm_r, rv_r, **kw)
    ref.backward(grad_out.double())
    atol, _ = TOLERANCES[torch.bfloat16]
    pairs = [("out", out, ref), ("running_mean", rm_f, rm_r), ("running_var", rv_f, rv_r)]
    pairs += [(f"d{n}", t.grad, r.grad) for n, t, r in zip(("x", "weight", "bn_weight", "bn_bias"), leaves, ref_leaves)]
    errors = {}
    for name, got, want in pairs:
        assert got is not None, f"fused head returned no {name}"
        assert torch.isfinite(got).all(), f"fused {name} has non-finite values"
        errors[name] = _max_rel_err(got, want)
    bad = {k: v for k, v in errors.items() if not v <= atol}
    assert not bad, f"fused vs float64 reference, max error / max |ref| over {atol}: {bad}"
    return errors


@needs_cuda
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_head_fwd_bwd_cuda(benchmark, shape, provider):
    name, c_in, hw, c_out, stride, pool = shape
    benchmark.group = f"head-{name}-B{BATCH}-bf16"
    stats, step = _measure(provider, c_in, hw, c_out, stride, pool)
    info = dict(provider=provider, shape=name, batch=BATCH, dtype="bf16", mode="fwd+bwd", **stats)
    if provider == "fused":
        info["max_rel_err_vs_fp64"] = _check_fused_matches_reference(c_in, hw, c_out, stride, pool)
        # the baseline measured in this same run (same GPU state), so ratios are like for like
        eager, _ = _measure("eager", c_in, hw, c_out, stride, pool)
        info.update({f"eager_{k}": v for k, v in eager.items()})
        info["speedup_vs_eager"] = eager["ms_p50"] / stats["ms_p50"]
        info["peak_mem_ratio_vs_eager"] = stats["peak_step_mib"] / max(eager["peak_step_mib"], 1e-9)
        info["saved_bytes_ratio_vs_eager"] = stats["saved_bytes"] / max(eager["saved_bytes"], 1)
        # structural, not a speed claim: the fused head saves only its input and per-channel vectors
        assert info["saved_bytes_ratio_vs_eager"] < 1, info
    for key in ("ms_p20", "ms_p50", "ms_p80", "saved_bytes"):
        assert math.isfinite(info[key]) and info[key] > 0, f"{key} = {info[key]!r}"
    assert info["ms_p20"] <= info["ms_p50"] <= info["ms_p80"], info
    assert math.isfinite(info["peak_step_mib"]) and info["peak_step_mib"] >= 0, info
    for key in ("speedup_vs_eager", "peak_mem_ratio_vs_eager", "saved_bytes_ratio_vs_eager"):
        if provider == "fused":
            assert math.isfinite(info[key]) and info[key] > 0, f"{key} = {info[key]!r}"
    benchmark.extra_info.update(info)

    def timed():
        step()
        # pytest-benchmark uses a host clock: wait for the GPU inside the timed call
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.skipif(not triton_available("cpu")[0], reason=triton_available("cpu")[1])
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "full"])
def test_head_saved_bytes_cpu(benchmark, pool):
    # stage-1 head shape at a tiny batch; only the memory numbers are meaningful here
    c_in, hw, c_out, stride = 16, 16, 32, 2
    tensors = _setup(c_in, hw, c_out, 4, "cpu", torch.float32)
    x, weight, bn_weight, bn_bias, (rm, rv) = tensors
    saved = {}
    for provider, fn in PROVIDERS.items():
        saved[provider], _ = saved_tensor_bytes(
            lambda fn=fn: fn(x, weight, bn_weight, bn_bias, rm, rv, stride=stride, training=True,
                             momentum=0.1, eps=1e-5, pool=pool)
        )
    assert saved["fused"] < saved["eager"]
    benchmark.group = "head-saved-bytes-cpu"
    benchmark.extra_info.update(
        provider="fused", shape=f"16x{hw}_s{stride}_{c_out}", batch=4, pool=pool,
        saved_bytes_fused=saved["fused"], saved_bytes_eager=saved["eager"],
        saved_bytes_ratio_vs_eager=saved["fused"] / saved["eager"],
    )
    step = _step_fn("fused", stride, pool, tensors)
    benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
