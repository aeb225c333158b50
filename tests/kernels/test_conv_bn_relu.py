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
# (atol, rtol) per input dtype, shared with the benchmarks
from pgl_fast.kernels.reference import TF32_TOLERANCE, TOLERANCES, saved_tensor_bytes  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not _interpreting() else "cpu")
_OK, _WHY = triton_available(DEVICE)
# Skip (with the reason) when the kernels cannot run here, e.g. the kernel module was imported
# before TRITON_INTERPRET=1 was set on a CPU-only machine.
needs_triton = pytest.mark.skipif(not _OK, reason=_WHY)


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


def _good_args(device):
    x, weight, g, b, rm, rv = _make_inputs(2, 16, 32, 8, 8, F32, device=device)
    return dict(x=x, weight=weight, bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv)


# Each case builds its bad argument on the device under test: a strided view moved with .to(cuda)
# arrives contiguous, so building it on the host would test nothing there. The checks all run before
# any kernel launch, so the same cases also run on "meta" tensors, where .to() would densify a view
# just as .to(cuda) does, and the CPU suite catches a case built the wrong way.
@pytest.mark.parametrize("where", ["device", "meta"])
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: dict(x=torch.randn(16, 8, 8, device=d)), "x must be 4-D"),
        (lambda d: dict(weight=torch.randn(32, 8, 3, 3, device=d)), "weight has C_in=8 but x has 16"),
        (lambda d: dict(weight=torch.randn(32, 16, 5, 5, device=d)), r"weight must be \[C_out, C_in, 3, 3\]"),
        (lambda d: dict(x=torch.randn(2, 16, 8, 8, dtype=torch.float64, device=d)), "x dtype must be"),
        (lambda d: dict(x=torch.randint(0, 3, (2, 16, 8, 8), device=d)), "x dtype must be"),
        (lambda d: dict(x=torch.randn(2, 16, 8, 16, device=d)[..., ::2]), "contiguous"),
        (lambda d: dict(bn_weight=torch.ones(16, device=d)), r"bn_weight must have shape \[32\]"),
        (lambda d: dict(running_var=torch.ones(31, device=d)), r"running_var must have shape \[32\]"),
        (lambda d: dict(stride=3), "stride must be 1 or 2"),
        (lambda d: dict(x=torch.randn(1, 16, 1, 1, device=d)), "more than 1 value per channel"),
        (lambda d: dict(training=False, running_mean=None, running_var=None), "running_mean is required"),
    ],
    ids=["dims", "channels", "kernel-size", "float64", "int", "non-contiguous", "bn-shape",
         "running-shape", "stride", "single-value", "eval-without-stats"],
)
def test_clear_errors(change, match, where):
    device = DEVICE if where == "device" else torch.device("meta")
    args = _good_args(device)
    change = change(device)
    kwargs = dict(stride=1, training=True, pool=True)
    for k in ("stride", "training"):
        if k in change:
            kwargs[k] = change.pop(k)
    args.update(change)
    for k, v in args.items():
        assert v is None or v.device == device, f"{k} is on {v.device}, the case is for {device}"
    if match == "contiguous":
        x = args["x"]
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)), (
            f"the non-contiguous case got a dense x (strides {x.stride()}) on {device}"
        )
    with pytest.raises(ValueError, match=match):
        conv_bn_relu(*args.values(), **kwargs)


def test_unsupported_device_raises_runtime_error():
    ok, reason = triton_available("meta")
    assert not ok and "--head-kernels eager" in reason
    args = _good_args("meta")
    with pytest.raises(RuntimeError, match="head-kernels eager"):
        conv_bn_relu(*args.values(), stride=1, pool=True)


def _fused_and_reference(x, weight, g, b, rm, rv, *, stride, pool, training=True, grad_out=None):
    """Fused forward + backward and the float64 reference on the same values:
    ``(fused tensors, reference tensors)``, each ``[out, dx, dweight, dbn_weight, dbn_bias,
    running_mean, running_var]``."""
    kw = dict(stride=stride, training=training, momentum=0.1, eps=1e-5, pool=pool)
    leaves = [t.clone().requires_grad_() for t in (x, weight, g, b)]
    rm_f, rv_f = rm.clone(), rv.clone()
    out = conv_bn_relu(*leaves, rm_f, rv_f, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, device=out.device).to(out.dtype)
    out.backward(grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weight, g, b)]
    rm_r, rv_r = rm.double(), rv.double()
    ref = reference_conv_bn_relu(*ref_leaves, rm_r, rv_r, **kw)
    ref.backward(grad_out.double())
    return ([out] + [t.grad for t in leaves] + [rm_f, rv_f]), ([ref] + [t.grad for t in ref_leaves] + [rm_r, rv_r])


_NAMES = ("out", "dx", "dweight", "dbn_weight", "dbn_bias", "running_mean", "running_var")


@needs_triton
def test_deterministic_mode_is_allowed_and_repeatable():
    """Under torch.use_deterministic_algorithms(True) (what --deterministic sets) the fused path must
    not raise (its dgrad/wgrad is aten.convolution_backward, i.e. cuDNN on CUDA, which has
    deterministic algorithms) and must repeat bit for bit: the kernels use no atomics, the finalize
    reductions are torch's. That mode also fills torch.empty with NaN, so an output element the
    kernels failed to write would show up against the reference."""
    from torch.utils import deterministic as det

    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        inputs = _make_inputs(3, 16, 32, 16, 16, F32)
        grad_out = torch.randn(3, 32, 8, 8, device=DEVICE)
        runs = [_fused_and_reference(*inputs, stride=2, pool=False, grad_out=grad_out) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]
    (first, ref), (second, _) = runs
    for name, a, b, r in zip(_NAMES, first, second, ref):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
        assert_verbose_allclose(a, r, atol=1e-5, rtol=1e-5, name=name)


# ----------------------------------------------------------------------------------------------
# GPU-only checks: what the CPU interpreter cannot show (TF32 dots, 64-bit offsets at sizes the
# interpreter cannot reach, CUDA-graph capture, host synchronisation).
# ----------------------------------------------------------------------------------------------

on_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset)")


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with TF32's 10-bit mantissa (ties away from zero), computed on the
    bit pattern: clearing the 13 low mantissa bits after adding half of their range."""
    bits = t.detach().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "full"])
def test_tf32_dots_match_reference_cuda(pool):
    # fp32 without --amp runs INPUT_PRECISION="tf32" on CUDA (cudnn.allow_tf32 is on by default);
    # the other tests switch it off. On operands that TF32 represents exactly the fused conv must be
    # exact up to fp32 accumulation (so the forward is held to the fp32 tolerance: any further
    # rounding would be a bug); backward's cuDNN dgrad/wgrad round dy to TF32 (TF32_TOLERANCE).
    torch.backends.cudnn.allow_tf32 = True  # the autouse fixture restores it
    x, weight, g, b, rm, rv = _make_inputs(64, 32, 64, 16, 16, F32)
    x, weight = _round_to_tf32(x), _round_to_tf32(weight)
    fused, ref = _fused_and_reference(x, weight, g, b, rm, rv, stride=2, pool=pool)
    for name, a, r in zip(_NAMES, fused, ref):
        atol, rtol = TF32_TOLERANCE if name in ("dx", "dweight") else TOLERANCES[F32]
        assert_verbose_allclose(a, r, atol=atol, rtol=rtol, name=f"{name} [tf32 pool={pool}]")


@pytest.mark.cuda
@on_gpu
def test_offsets_past_int32_cuda():
    # x with more than 2**31 elements (a stage-3 head input at B = 2**19 + 8): per-sample offsets are
    # int64 in the kernels. Eval mode makes every sample independent, so the first and last samples
    # can be checked against the reference on those samples alone.
    B, c, hw = 2**19 + 8, 64, 8
    assert B * c * hw * hw > 2**31
    # x, the output, its gradient, dy and dx: five bf16 tensors of 4.3 GB each
    if torch.cuda.get_device_properties(DEVICE).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with at least 40 GiB for five 4.3 GB tensors")
    x = torch.randn(B, c, hw, hw, device=DEVICE, dtype=torch.bfloat16)
    _, weight, g, b, rm, rv = _make_inputs(1, c, c, hw, hw, torch.bfloat16)
    xs = x.requires_grad_()
    out = conv_bn_relu(xs, weight, g, b, rm, rv, stride=1, training=False, pool=False)
    grad_out = torch.randn(out.shape, device=DEVICE, dtype=torch.bfloat16)
    out.backward(grad_out)
    atol, rtol = TOLERANCES[torch.bfloat16]
    for sl in (slice(0, 4), slice(B - 4, B)):
        xr = x.detach()[sl].double().requires_grad_()
        ref = reference_conv_bn_relu(xr, weight.double(), g.double(), b.double(), rm.double(), rv.double(),
                                     stride=1, training=False, momentum=0.1, eps=1e-5, pool=False)
        ref.backward(grad_out[sl].double())
        assert_verbose_allclose(out[sl], ref, atol=atol, rtol=rtol, name=f"out[{sl}]")
        assert_verbose_allclose(xs.grad[sl], xr.grad, atol=atol, rtol=rtol, name=f"dx[{sl}]")


@pytest.mark.cuda
@on_gpu
def test_fwd_bwd_do_not_synchronize_cuda():
    # --cuda-graphs captures the heads, and an eager step should never wait for the GPU: no .item(),
    # no host copy, no data-dependent allocation in the launchers.
    x, weight, g, b, rm, rv = _make_inputs(8, 32, 64, 16, 16, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, weight, g, b)]
    conv_bn_relu(*leaves, rm, rv, stride=2, pool=True).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = conv_bn_relu(*leaves, rm, rv, stride=2, pool=True)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@on_gpu
def test_cuda_graph_replay_matches_eager_cuda():
    # the fused head (module wrapper: running stats and num_batches_tracked update in place)
    # captured once and replayed on new data gives what the eager fused call gives on that data
    conv, bn = nn.Conv2d(16, 32, 3, 2, 1, bias=False).to(DEVICE), nn.BatchNorm2d(32).to(DEVICE)
    conv_e, bn_e = copy.deepcopy(conv), copy.deepcopy(bn)
    static_x = torch.randn(16, 16, 32, 32, device=DEVICE, requires_grad=True)
    static_g = torch.randn(16, 32, device=DEVICE)

    def step(conv, bn, x, g):
        out = conv_bn_relu_module(x, conv, bn, pool=True)
        out.backward(g)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) on a side stream, as capture requires
        step(conv, bn, static_x, static_g)
    torch.cuda.current_stream().wait_stream(side)
    # start both copies from the same state
    conv_e.load_state_dict(conv.state_dict())
    bn_e.load_state_dict(bn.state_dict())
    for m in (conv, bn):
        for p in m.parameters():
            p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(conv, bn, static_x, static_g)
    for i in range(3):
        x_new, g_new = torch.randn_like(static_x), torch.randn_like(static_g)
        with torch.no_grad():
            static_x.copy_(x_new)
            static_g.copy_(g_new)
        for t in [static_x] + list(conv.parameters()) + list(bn.parameters()):
            if t.grad is not None:
                t.grad.zero_()  # the graph accumulates into the captured .grad tensors
        graph.replay()
        xe = x_new.clone().requires_grad_()
        for m in (conv_e, bn_e):
            for p in m.parameters():
                p.grad = None
        out_e = step(conv_e, bn_e, xe, g_new)
        torch.cuda.synchronize()
        tol = dict(atol=1e-5, rtol=1e-5)
        assert_verbose_allclose(static_out, out_e, name=f"out replay {i}", **tol)
        assert_verbose_allclose(static_x.grad, xe.grad, name=f"dx replay {i}", **tol)
        assert_verbose_allclose(conv.weight.grad, conv_e.weight.grad, name=f"dweight replay {i}", **tol)
        assert_verbose_allclose(bn.running_mean, bn_e.running_mean, name=f"running_mean replay {i}", **tol)
        assert_verbose_allclose(bn.running_var, bn_e.running_var, name=f"running_var replay {i}", **tol)
