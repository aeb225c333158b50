"""``--head-kernels auto``: fused Triton head convs or eager PyTorch, chosen per head by measurement.

The fused conv -> BN -> ReLU (-> pool) kernels are only worth running where they are both correct
and faster than cuDNN on this device, for this head shape and dtype. So on CUDA, ``auto`` takes
every distinct aux head (its config, input shape [C, H, W], batch, dtype, memory format) once:

1. **Check.** One batch of non-negative (post-ReLU-like) inputs goes through the head's conv stack
   with the fused kernels, and through a float64 eager copy of the same stack (weights rounded
   through the run's dtype first, so both see the same values). The pooled output, the gradient
   of the input and the gradients of every conv and BN parameter must agree within ``TOLERANCES``
   (the tolerances of the kernel tests; TF32 is off during the check, as in those tests). The head
   is a copy: the model's parameters, running statistics and the global RNG are untouched.
2. **Time.** Forward + backward of the conv stack, fused and eager, in the run's dtype and with
   the run's TF32 settings (CUDA events after warm-up).
3. **Choose.** Fused if it passed the check and was faster, eager otherwise. A failed check (or a
   fused path that raises) is a loud ``UserWarning`` naming the head shape, never a silent switch.

Every choice, with both timings and the check's worst errors, goes into ``header.json``. Choices
are cached per process, keyed by device and shape, so a grid of runs measures each shape once.

Once made, a run's choice stays fixed: under data parallel or a pipeline rank 0 measures and every
rank takes its choice, every checkpoint records it and a resumed run reuses it, and with
``--deterministic`` nothing is timed at all (every head eager, see ``configure_head_kernels``).

On the CPU ``auto`` stays eager without measuring: Triton runs there only under its interpreter.
``--head-kernels triton`` forces the fused kernels and ``eager`` forces eager, on every head.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .device import device_context
# (atol, rtol) per dtype of the head input, against a float64 eager reference: the kernel tests' table.
from ..kernels.reference import TOLERANCES  # noqa: E402

CHECK_SEED = 20240817  # the check's private generator: the global RNG stream is never touched

# fn(head, x) -> the conv stack's output (pooled features); see ``conv_stack``
StackFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# timer(step, device) -> seconds per call of step()
Timer = Callable[[Callable[[], None], torch.device], float]

_CACHE: dict[tuple, dict] = {}


def has_fused_convs(head: nn.Module) -> bool:
    """Heads whose conv part the fused kernels replace: InfoPro-style heads with at least one conv."""
    return isinstance(getattr(head, "convs", None), nn.ModuleList) and len(head.convs) > 0


def conv_stack(head: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The part of an ``AuxClassifier`` that the kernels replace: its ConvBN list, the last pooled."""
    h = x
    last = len(head.convs) - 1
    for i, layer in enumerate(head.convs):
        h = layer(h, pool=getattr(head.convs, "pool", True) if i == last else False, use_kernels=fused)
    return h


def fused_stack(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv_stack(head, x, True)


def eager_stack(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv_stack(head, x, False)


def max_errors(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> tuple[bool, float]:
    """(within tolerance, worst |error| / max |expected|), in float64 on the CPU; NaN/inf fail."""
    if actual.shape != expected.shape:
        return False, float("inf")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    scale = max(e.abs().max().item(), 1e-12) if e.numel() else 1.0
    if not torch.isfinite(a).all():
        return False, float("inf")
    err = (a - e).abs()
    ok = bool((err <= atol * scale + rtol * e.abs()).all())
    return ok, (err.max().item() / scale) if err.numel() else 0.0


def default_timer(step: Callable[[], None], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Seconds per call: CUDA events after warm-up on a GPU, ``time.perf_counter`` elsewhere."""
    with device_context(device):  # the events time the current stream: it must be ``device``'s
        return _time_calls(step, device, warmup, iters)


def _time_calls(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


@contextlib.contextmanager
def _no_tf32():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _sample_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, channels_last: bool,
                  gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen).relu_().to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _working_copy(head: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A training-mode copy whose conv weights are rounded through ``dtype`` (what the fused conv
    computes with), so the float64 reference sees the same values."""
    h = copy.deepcopy(head).train()
    with torch.no_grad():
        for layer in h.convs:
            layer.conv.weight.copy_(layer.conv.weight.to(dtype).float())
    return h


def check_fused(head: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
                channels_last: bool = False, fused_fn: StackFn = fused_stack) -> dict:
    """Fused conv stack of ``head`` against a float64 eager copy on one batch of ``shape``, layer by
    layer as the kernel tests check one fused layer: each ConvBN gets the fused path's own input
    (for the first, the sample batch; after that, the previous fused output), the reference the
    same values in float64, and both a random upstream gradient. Returns ``{"ok", "errors":
    {tensor: worst error / max |ref|}, "tolerance": [atol, rtol], "error"}``."""
    atol, rtol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(CHECK_SEED)
    h = _sample_input(shape, dtype, device, channels_last, gen)
    work = _working_copy(head, dtype)
    ref_head = copy.deepcopy(work).double()
    result: dict = {"ok": False, "errors": {}, "tolerance": [atol, rtol], "error": None}
    n = len(work.convs)
    pairs = []
    try:
        with _no_tf32():
            for i in range(n):
                one, one_ref = _Single(work, i), _Single(ref_head, i)
                xf = h.detach().clone().requires_grad_()
                with _autocast(device, dtype):
                    out = fused_fn(one, xf)
                grad_out = torch.randn(tuple(out.shape), generator=gen).to(device=device, dtype=out.dtype)
                out.backward(grad_out)
                xr = h.detach().double().requires_grad_()
                ref = eager_stack(one_ref, xr)
                ref.backward(grad_out.double())
                lf, lr = work.convs[i], ref_head.convs[i]
                pairs += [(f"convs.{i}.out", out, ref), (f"convs.{i}.dx", xf.grad, xr.grad)]
                for name, a, b in (("conv.weight", lf.conv.weight, lr.conv.weight),
                                   ("bn.weight", lf.bn.weight, lr.bn.weight), ("bn.bias", lf.bn.bias, lr.bn.bias)):
                    pairs.append((f"convs.{i}.{name}.grad", a.grad, b.grad))
                h = out.detach()
    except Exception as e:  # a kernel that fails to compile or launch is a failed check, reported
        msg = str(e).strip()
        result["error"] = f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"
        return result
    ok_all = True
    for name, a, b in pairs:
        if a is None or b is None:
            ok, worst = False, float("inf")
        else:
            ok, worst = max_errors(a, b, atol, rtol)
        result["errors"][name] = worst
        ok_all = ok_all and ok
    result["ok"] = ok_all
    return result


class _Single(nn.Module):
    """Layer ``i`` of a head's conv stack, seen as a one-layer stack (pooled only if it is the
    head's last conv), so that ``fused_fn``/``eager_stack`` check one fused layer at a time."""

    def __init__(self, head: nn.Module, i: int):
        super().__init__()
        self.config = head.config
        self.convs = _Pooled(head.convs[i], i == len(head.convs) - 1)


class _Pooled(nn.ModuleList):
    def __init__(self, layer: nn.Module, pool: bool):
        super().__init__([layer])
        self.pool = pool


def time_stack(head: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fn: StackFn,
               *, channels_last: bool = False, timer: Timer = default_timer) -> float:
    """Seconds per forward + backward of ``fn`` on a copy of ``head`` at ``shape`` in ``dtype``."""
    gen = torch.Generator().manual_seed(CHECK_SEED + 1)
    x = _sample_input(shape, dtype, device, channels_last, gen)
    work = copy.deepcopy(head).train()
    grad_out = None

    def step() -> None:
        nonlocal grad_out
        for p in work.parameters():
            p.grad = None
        xi = x.detach().requires_grad_()
        with _autocast(device, dtype):
            out = fn(work, xi)
        if grad_out is None:
            grad_out = torch.randn(tuple(out.shape), generator=gen).to(device=device, dtype=out.dtype)
        out.backward(grad_out)

    return timer(step, device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def select_head(head: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
                channels_last: bool = False, fused_fn: StackFn = fused_stack, eager_fn: StackFn = eager_stack,
                timer: Timer = default_timer, warn: bool = True) -> dict:
    """Check and time one head at one input ``shape`` (batch, C, H, W); returns the record of the
    choice (``"choice"``: ``"triton"`` or ``"eager"``)."""
    with device_context(device):  # the fused kernels launch on the current device
        return _select_head(head, shape, dtype, device, channels_last=channels_last, fused_fn=fused_fn,
                            eager_fn=eager_fn, timer=timer, warn=warn)


def _select_head(head: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *,
                 channels_last: bool, fused_fn: StackFn, eager_fn: StackFn, timer: Timer, warn: bool) -> dict:
    where = (f"{head.config} head on input {shape[1]}x{shape[2]}x{shape[3]} (batch {shape[0]}, "
             f"{_dtype_name(dtype)}{', channels-last' if channels_last else ''}, {device})")
    check = check_fused(head, shape, dtype, device, channels_last=channels_last, fused_fn=fused_fn)
    eager_s = time_stack(head, shape, dtype, device, eager_fn, channels_last=channels_last, timer=timer)
    fused_s = None
    if check["error"] is None:
        try:
            fused_s = time_stack(head, shape, dtype, device, fused_fn, channels_last=channels_last, timer=timer)
        except Exception as e:  # failing only when timed is still a failure of the fused path
            msg = str(e).strip()
            check = dict(check, ok=False, error=f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}")
    if not check["ok"]:
        choice = "eager"
        if check["error"] is not None:
            reason = f"fused kernels failed: {check['error']}"
        else:
            atol = check["tolerance"][0]
            bad = {k: v for k, v in check["errors"].items() if not v <= atol}
            worst = max(bad or check["errors"], key=lambda k: (bad or check["errors"])[k])
            reason = (f"fused kernels disagree with eager float64: {worst} error {check['errors'][worst]:.3g} of max "
                      f"(tolerance {atol:g})")
        if warn:
            _warn_failed(where, reason)
    elif fused_s < eager_s:
        choice, reason = "triton", "passed the check and was faster"
    else:
        choice, reason = "eager", "fused passed the check but was not faster"
    return {
        "where": where,
        "config": head.config, "in_shape": list(shape[1:]), "batch": shape[0], "dtype": _dtype_name(dtype),
        "channels_last": channels_last, "device": str(device), "check": check,
        "fused_ms": None if fused_s is None else fused_s * 1e3, "eager_ms": eager_s * 1e3,
        "choice": choice, "reason": reason,
    }


def _warn_failed(where: str, reason: str) -> None:
    warnings.warn(f"--head-kernels auto: the {where} failed its check, so it runs eager: {reason}",
                  UserWarning, stacklevel=3)


def _head_key(head: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              channels_last: bool) -> tuple:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    weights = tuple(tuple(layer.conv.weight.shape) + tuple(layer.conv.stride) for layer in head.convs)
    return (str(device), name, head.config, weights, tuple(shape), str(dtype), channels_last)


def select_for_net(net, *, batch: int, dtype: torch.dtype, device: torch.device, channels_last: bool = False,
                   fused_fn: StackFn = fused_stack, eager_fn: StackFn = eager_stack, timer: Timer = default_timer,
                   cache: dict | None = None) -> list[dict]:
    """Choose for every aux head of a ``LocalModel`` (heads that share a config and input shape share
    one measurement) and set each head's ``use_kernels``. Returns one record per distinct head,
    with the indices of the heads it applies to."""
    cache = _CACHE if cache is None else cache
    records: dict[tuple, dict] = {}
    for j, head in enumerate(net.heads):
        if not has_fused_convs(head):
            head.use_kernels = False
            continue
        shape = (batch, *net.out_shape(j))
        key = _head_key(head, shape, dtype, device, channels_last)
        if key not in records:
            if key in cache:
                rec = dict(cache[key], cached=True)
                if not rec["check"]["ok"]:  # every run that falls back says so, measured or not
                    _warn_failed(rec["where"], rec["reason"])
            else:
                rec = select_head(head, shape, dtype, device, channels_last=channels_last, fused_fn=fused_fn,
                                  eager_fn=eager_fn, timer=timer)
                cache[key] = dict(rec)
                rec["cached"] = False
            rec["heads"] = []
            records[key] = rec
        records[key]["heads"].append(j)
        head.use_kernels = records[key]["choice"] == "triton"
    return list(records.values())


DETERMINISTIC_RULE = ("--deterministic: eager on every head, chosen without timing (a choice by timing can differ "
                      "between runs, a run and its resume, and ranks)")


def configure_head_kernels(net, mode: str, allowed: bool, *, batch: int, dtype: torch.dtype, device: torch.device,
                           channels_last: bool = False, deterministic: bool = False, ctx=None) -> dict:
    """Set every head's ``use_kernels`` for ``--head-kernels mode``; ``allowed`` is what
    ``build.resolve_head_kernels`` decided (False: eager everywhere). Returns the header record:
    ``mode``, ``resolved`` (``triton``, ``eager`` or ``mixed``), ``selection`` (the measured
    choices, for ``auto`` on CUDA) and, where ``auto`` chose without measuring, ``rule`` (how).

    ``auto`` on CUDA measures, which makes its choice a matter of timing noise. So the choice is
    made once per run and then fixed: under data parallel or a pipeline (``ctx``: the launch's
    :class:`~pgl_fast.distributed.DistContext`) rank 0 measures and every rank takes its choice;
    the choice goes into every checkpoint and a resumed run reuses it (:func:`reuse_choice`); and
    with ``deterministic`` nothing is timed: every head runs eager (torch's deterministic
    algorithms cover the eager heads; the fused kernels stay available with ``--head-kernels
    triton``, a choice that does not depend on the machine's speed either)."""
    selection, rule = None, None
    net.head_kernels_measured = False
    if not allowed:
        net.set_head_kernels(False)
    elif mode == "auto" and device.type == "cuda" and deterministic:
        net.set_head_kernels(False)
        rule = DETERMINISTIC_RULE
    elif mode == "auto" and device.type == "cuda":
        def measure() -> list[dict]:
            return select_for_net(net, batch=batch, dtype=dtype, device=device, channels_last=channels_last)

        selection = measure() if ctx is None or not ctx.distributed else ctx.on_main(measure)
        apply_selection(net, selection)
        net.head_kernels_measured = True
    else:
        net.set_head_kernels(True)
    record = {"mode": mode, "resolved": resolved(net), "selection": selection}
    if rule is not None:
        record["rule"] = rule
    return record


def resolved(net) -> str:
    """``triton`` (every head fused), ``eager`` (none) or ``mixed``."""
    fused = [has_fused_convs(h) and h.use_kernels for h in net.heads]
    return "triton" if fused and all(fused) else ("mixed" if any(fused) else "eager")


def apply_selection(net, selection: list[dict]) -> None:
    """Set the heads' ``use_kernels`` from the records of :func:`select_for_net` (possibly measured
    by another rank); heads without fused convs, which no record names, stay eager."""
    for head in net.heads:
        head.use_kernels = False
    for rec in selection:
        for j in rec["heads"]:
            net.heads[j].use_kernels = rec["choice"] == "triton"


def saved_choice(net) -> dict | None:
    """What a checkpoint keeps of a measured ``auto`` choice (None when nothing was measured: the
    other modes decide the same way on every start)."""
    if not getattr(net, "head_kernels_measured", False):
        return None
    return {"use_kernels": [bool(has_fused_convs(h) and h.use_kernels) for h in net.heads]}


def reuse_choice(net, saved: dict | None) -> bool:
    """On resume: the heads compute with the kernels the checkpoint's run chose, when both that
    run and this one chose by measuring (``auto`` on CUDA, not ``--deterministic``). Returns
    whether the saved choice was applied."""
    if saved is None or not getattr(net, "head_kernels_measured", False):
        return False
    flags = saved["use_kernels"]
    if len(flags) != len(net.heads):
        raise UserError(f"--resume: the checkpoint chose kernels for {len(flags)} aux heads, this network has "
                        f"{len(net.heads)}; resume with the original model flags")
    for head, on in zip(net.heads, flags):
        head.use_kernels = bool(on) and has_fused_convs(head)
    return True
