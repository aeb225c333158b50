"""Fused conv -> BN -> ReLU (-> GAP) kernels vs the shared eager reference, computed in float64.

On a machine without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1, set
below before anything imports the kernel module); shapes are kept tiny so the file stays fast.
With CUDA (and no TRITON_INTERPRET) the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    # must happen before pgl_fast.kernels is imported: @triton.jit picks the interpreter then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from pgl_fast.kernels import (  # noqa: E402
    conv_bn_relu,
    conv_bn_relu_module,
    reference_conv_bn_relu,
    triton_available,
)
from pgl_fast.kernels.conv_bn_relu import CONFIGS, _conv_bn_relu, _interpreting  # noqa: E402
from pgl_fast.kernels.reference import saved_tensor_bytes  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
_OK, _WHY = triton_available(DEVICE)
# Skip (with the reason) when the kernels cannot run here, e.g. the kernel module was imported
# before TRITON_INTERPRET=1 was set on a CPU-only machine.
needs_triton = pytest.mark.skipif(not _OK, reason=_WHY)

# (atol, rtol) per input dtype. atol is relative to the largest |reference| value of the compared
# tensor (outputs and gradients have very different magnitudes), rtol is per element.
TOLERANCES = {
    # fp32: operands are exact; only the fp32 accumulation/reduction order differs from float64
    # (observed <= 1e-6 of max); 1e-5 leaves room for bigger reductions on the GPU (TF32 is
    # switched off for these tests, see the fixture).
    torch.float32: (1e-5, 1e-5),
    # fp16: conv output, statistics and BN are fp32; the errors come from rounding the stored output
    # and the transient BN-input gradient to fp16 (2**-11 relative), the latter summed again by the
    # dgrad/wgrad convs (observed ~6e-4 of max); 4e-3 = 8 ulps.
    torch.float16: (4e-3, 4e-3),
    # bf16: same path with 2**-8 precision; the CPU interpreter even *truncates* fp32 -> bf16
    # stores (the GPU rounds to nearest), so a stored value can be off by one full bf16 ulp
    # (0.4%), and dgrad/wgrad sum those (observed ~5e-3 of max); 2e-2 = 5 ulps.
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(1234)
    # the fp32 kernels follow torch.backends.cudnn.allow_tf32; compare exact fp32 here
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = tf32
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str):
    """allclose in float64 with a readable failure: NaN/inf counts, max abs/rel error, first misses.

    ``atol`` is scaled by ``max |expected|`` (see TOLERANCES).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    scale = max(e.abs().max().item(), 1e-12) if e.numel() else 1.0
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    err = (a - e).abs()
    limit = atol * scale + rtol * e.abs()
    miss = (err > limit) | (bad_a != bad_e)
    if miss.any():
        idx = miss.nonzero()[:5].tolist()
        firsts = ", ".join(f"{tuple(i)}: got {a[tuple(i)].item():.6g} want {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(miss.sum())}/{miss.numel()} mismatched; max abs err {err.max().item():.3e} "
            f"(max |ref| {scale:.3e}, rel-to-max {err.max().item() / scale:.3e}); "
            f"non-finite: actual {int(bad_a.sum())}, expected {int(bad_e.sum())}; "
            f"atol={atol}*{scale:.3e} rtol={rtol}; first: {firsts}"
        )


def _make_inputs(B, c_in, c_out, h, w, dtype, device=DEVICE):
    """Random head inputs; the weight is rounded through ``dtype`` so the fused conv (which runs in
    ``x.dtype``) and the float64 reference see exactly the same values."""
    x = torch.randn(B, c_in, h, w, device=device).to(dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) / (3 * c_in**0.5)).to(dtype).float()
    bn_weight = torch.rand(c_out, device=device) + 0.5
    bn_bias = torch.randn(c_out, device=device) * 0.3
    running_mean = torch.randn(c_out, device=device) * 0.1
    running_var = torch.rand(c_out, device=device) + 0.5
    return x, weight, bn_weight, bn_bias, running_mean, running_var


def _check_case(B, c_in, c_out, hw, stride, pool, dtype, *, training=True, channels_last=False, config=None):
    h, w = (hw, hw) if isinstance(hw, int) else hw
    x, weight, g, b, rm, rv = _make_inputs(B, c_in, c_out, h, w, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    atol, rtol = TOLERANCES[dtype]
    kw = dict(stride=stride, training=training, momentum=0.1, eps=1e-5, pool=pool)

    # fused
    leaves = [t.clone().requires_grad_() for t in (x, weight, g, b)]
    rm_f, rv_f = rm.clone(), rv.clone()
    out = _conv_bn_relu(*leaves, rm_f, rv_f, config=config, **kw)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(grad_out)

    # float64 reference on the same values
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, g, b)]
    rm_r, rv_r = rm.double(), rv.double()
    ref = reference_conv_bn_relu(*ref_leaves, rm_r, rv_r, **kw)
    ref.backward(grad_out.double())

    tag = f"B{B} {c_in}->{c_out} {h}x{w} s{stride} pool={pool} {dtype} train={training}"
    assert_verbose_allclose(out, ref, atol=atol, rtol=rtol, name=f"out [{tag}]")
    # running statistics are fp32 and computed from the fp32 conv output: fp32 tolerance
    assert_verbose_allclose(rm_f, rm_r, atol=1e-5, rtol=1e-5, name=f"running_mean [{tag}]")
    assert_verbose_allclose(rv_f, rv_r, atol=1e-5, rtol=1e-5, name=f"running_var [{tag}]")
    for name, leaf, ref_leaf in zip(("dx", "dweight", "dbn_weight", "dbn_bias"), leaves, ref_leaves):
        assert leaf.grad is not None, f"{name} missing [{tag}]"
        assert leaf.grad.dtype == leaf.dtype
        assert_verbose_allclose(leaf.grad, ref_leaf.grad, atol=atol, rtol=rtol, name=f"{name} [{tag}]")


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (B, C_in, C_out, H[xW], stride, pool, dtype): the three InfoPro head stages, the 2c2f second conv
# (pool=False feeding another conv), odd batches, non-square/odd spatial sizes, C_out not a multiple
# of the channel block, and a 2x width (128) -- a covering subset, not the cross product.
CASES = [
    (1, 16, 32, 8, 2, True, F32),
    (3, 16, 32, 32, 2, True, F32),  # stage-1 head shape
    (5, 32, 64, 16, 2, False, F32),  # stage-2 head, full output
    (3, 64, 64, 8, 1, True, F32),  # stage-3 head
    (3, 32, 32, 16, 1, False, F32),  # 2c2f second conv
    (3, 16, 24, (11, 7), 2, True, F32),  # odd, non-square, C_out % 16 != 0
    (3, 16, 32, 32, 2, False, BF16),
    (5, 32, 64, 16, 2, True, BF16),
    (1, 64, 64, 8, 1, False, BF16),
    (3, 64, 128, 8, 1, True, BF16),  # widened head: two channel blocks
    (3, 16, 32, 16, 2, True, F16),
    (1, 32, 32, 16, 1, False, F16),
    (5, 64, 64, 8, 1, True, F16),
]


def _case_id(case):
    B, ci, co, hw, s, pool, dt = case
    hw_s = f"{hw}" if isinstance(hw, int) else f"{hw[0]}x{hw[1]}"
    return f"B{B}-{ci}to{co}-{hw_s}-s{s}-{'pool' if pool else 'full'}-{str(dt).split('.')[-1]}"


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case):
    _check_case(*case)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_reference_96px(stride):
    # STL-10 resolution; slow under the interpreter
    _check_case(2, 16, 32, 96, stride, True, F32)


@needs_triton
@pytest.mark.parametrize("pool,dtype", [(True, F32), (False, BF16)], ids=["pool-fp32", "full-bf16"])
def test_eval_mode_uses_running_stats(pool, dtype):
    # _check_case also checks that the running stats are left untouched (reference does the same)
    _check_case(3, 32, 64, 8, 2, pool, dtype, training=False)


@needs_triton
def test_channels_last_input():
    _check_case(3, 16, 32, 16, 2, False, F32, channels_last=True)


@needs_triton
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_listed_config(name):
    # P = 100 positions (several tiles at block_m 16/64), C_in 32 and C_out 24 cross the 16-wide
    # channel blocks of the smallest config
    _check_case(1, 32, 24, 10, 1, False, F32, config=CONFIGS[name])


@needs_triton
def test_upstream_grad_with_odd_strides():
    # e.g. a loss that uses only part of the features: an expanded (stride-0) upstream gradient
    x, weight, g, b, rm, rv = _make_inputs(3, 16, 32, 8, 8, F32)
    xs = x.clone().requires_grad_()
    out = conv_bn_relu(xs, weight, g, b, rm, rv, stride=1, pool=True)
    out.backward(torch.ones(1, 1, device=DEVICE).expand_as(out))
    xr = x.double().requires_grad_()
    ref = reference_conv_bn_relu(xr, weight.double(), g.double(), b.double(), None, None,
                                 stride=1, training=True, momentum=0.1, eps=1e-5, pool=True)
    ref.sum().backward()
    assert_verbose_allclose(xs.grad, xr.grad, atol=1e-5, rtol=1e-5, name="dx")


@needs_triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_wrapper_matches_modules(training):
    conv, bn = nn.Conv2d(16, 32, 3, 2, 1, bias=False).to(DEVICE), nn.BatchNorm2d(32).to(DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    conv_r, bn_r = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    for m in (bn, bn_r):
        m.train(training)
    x = torch.randn(3, 16, 16, 16, device=DEVICE)
    xs, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out = conv_bn_relu_module(xs, conv, bn, pool=True)
    ref = torch.relu(bn_r(conv_r(xr))).mean(dim=(2, 3))
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    tol = dict(atol=1e-5, rtol=1e-5)
    assert_verbose_allclose(out, ref, name="out", **tol)
    assert_verbose_allclose(xs.grad, xr.grad, name="dx", **tol)
    assert_verbose_allclose(conv.weight.grad, conv_r.weight.grad, name="dweight", **tol)
    assert_verbose_allclose(bn.weight.grad, bn_r.weight.grad, name="dbn_weight", **tol)
    assert_verbose_allclose(bn.bias.grad, bn_r.bias.grad, name="dbn_bias", **tol)
    assert_verbose_allclose(bn.running_mean, bn_r.running_mean, name="running_mean", **tol)
    assert_verbose_allclose(bn.running_var, bn_r.running_var, name="running_var", **tol)
    assert int(bn.num_batches_tracked) == int(bn_r.num_batches_tracked) == (1 if training else 0)


def test_module_wrapper_rejects_cumulative_momentum():
    conv, bn = nn.Conv2d(16, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32, momentum=None)
    with pytest.raises(ValueError, match="momentum=None"):
        conv_bn_relu_module(torch.randn(2, 16, 8, 8), conv, bn, pool=True)


@needs_triton
def test_autocast_runs_in_autocast_dtype():
    x, weight, g, b, rm, rv = _make_inputs(2, 16, 32, 8, 8, F32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = conv_bn_relu(x, weight, g, b, rm, rv, stride=2, pool=True)
    assert out.dtype == torch.bfloat16


@needs_triton
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "full"])
def test_saves_less_than_eager(pool):
    x, weight, g, b, rm, rv = _make_inputs(4, 16, 32, 16, 16, F32)
    leaves = [t.requires_grad_() for t in (x, weight, g, b)]
    kw = dict(stride=1, training=True, momentum=0.1, eps=1e-5, pool=pool)
    fused, _ = saved_tensor_bytes(lambda: conv_bn_relu(*leaves, rm.clone(), rv.clone(), **kw))
    eager, _ = saved_tensor_bytes(lambda: reference_conv_bn_relu(*leaves, rm.clone(), rv.clone(), **kw))
    # only x, the weights and four per-channel vectors: nothing at the output resolution
    budget = x.numel() * 4 + weight.numel() * 4 + 4 * 32 * 4
    assert fused <= budget, f"fused saves {fused} B, expected at most {budget} B"
    assert fused < eager, f"fused saves {fused} B, eager {eager} B"
    # eager keeps at least the conv output and the ReLU output on top of x (4*32*16*16*4 B each)
    assert eager - fused >= 2 * 4 * 32 * 16 * 16 * 4


def _good_args():
    x, weight, g, b, rm, rv = _make_inputs(2, 16, 32, 8, 8, F32)
    return dict(x=x, weight=weight, bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(16, 8, 8)), "x must be 4-D"),
        (dict(weight=torch.randn(32, 8, 3, 3)), "weight has C_in=8 but x has 16"),
        (dict(weight=torch.randn(32, 16, 5, 5)), r"weight must be \[C_out, C_in, 3, 3\]"),
        (dict(x=torch.randn(2, 16, 8, 8, dtype=torch.float64)), "x dtype must be"),
        (dict(x=torch.randint(0, 3, (2, 16, 8, 8))), "x dtype must be"),
        (dict(x=torch.randn(2, 16, 8, 16)[..., ::2]), "contiguous"),
        (dict(bn_weight=torch.ones(16)), r"bn_weight must have shape \[32\]"),
        (dict(running_var=torch.ones(31)), r"running_var must have shape \[32\]"),
        (dict(stride=3), "stride must be 1 or 2"),
        (dict(x=torch.randn(1, 16, 1, 1)), "more than 1 value per channel"),
        (dict(training=False, running_mean=None, running_var=None), "running_mean is required"),
    ],
    ids=["dims", "channels", "kernel-size", "float64", "int", "non-contiguous", "bn-shape",
         "running-shape", "stride", "single-value", "eval-without-stats"],
)
def test_clear_errors(change, match):
    args = _good_args()
    kwargs = dict(stride=1, training=True, pool=True)
    for k in ("stride", "training"):
        if k in change:
            kwargs[k] = change.pop(k)
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        conv_bn_relu(*args.values(), **kwargs)


def test_unsupported_device_raises_runtime_error():
    ok, reason = triton_available("meta")
    assert not ok and "--head-kernels eager" in reason
    args = _good_args()
    args = {k: v.to("meta") for k, v in args.items()}
    with pytest.raises(RuntimeError, match="head-kernels eager"):
        conv_bn_relu(*args.values(), stride=1, pool=True)
