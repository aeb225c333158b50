"""Peak memory of each training step kind, with the same numbers on the CPU and on a GPU.

    python -m pgl_fast.memory.profile --arch resnet32 -J 16 --aux 1c2f -b 256 --dtype fp32 --device cpu \\
        --json profile.json

Step kinds (each on a fresh network and :class:`~pgl_fast.core.learner.LocalLearner`, same seed):

- ``bp``: end-to-end backprop (``LocalLearner.global_step`` of a ``BP()`` learner, no aux heads);
- ``bp_ckpt``: the same with module-boundary checkpointing (``checkpoint_global=True``);
- ``local``: a PGL/DGL local step (``LocalLearner.local_step``), one module's graph alive at a time
  (two under ``pgl_local="hpff"``, whose loss at a cut reaches two modules);
- ``global`` / ``global_ckpt``: a PGL global step (``LocalLearner.global_step``), without / with
  module-boundary checkpointing.

Every kind runs one warm-up step first (so the SGD momentum buffers exist: they belong to the
steady state), then ``steps`` measured steps; the peak is the maximum over them.

How memory is measured:

- ``tracker`` (the default on the CPU; available on CUDA too): :class:`TensorMemoryTracker`, a
  ``TorchDispatchMode`` that sees every ATen op and counts the bytes of the live tensor storages
  (each storage once, freed when its last reference dies). Categories are assigned by identity,
  not by any knowledge of the engine: the network's parameters and buffers, the parameters'
  ``.grad`` (via post-accumulate-grad hooks), the optimizers' state (via the global optimizer step
  hooks), the input batch, and everything else: forward activations, backward temporaries
  (including checkpoint recomputation and activation gradients), optimizer-step temporaries, and
  pre-existing tensors first seen as an op input. The breakdown is taken at the moment of the
  peak, and its components sum exactly to the peak. Not counted: memory that no tensor owns
  (kernel workspaces such as oneDNN/cuDNN scratch, allocator slack and caching), and the data
  set.
- ``cuda`` (the default on CUDA): ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
  after ``reset_peak_memory_stats``, synchronised. The breakdown uses the exact sizes of the
  parameters and optimizer state, and for gradients the most gradient bytes alive at once during
  the steps (an upper bound at the moment of the peak); activations are the rest, so
  ``breakdown_exact`` is False there.

``profile_steps`` returns a dict (written as JSON by the CLI)::

    {"config": {...}, "device": "cpu", "device_name": ..., "versions": {...},
     "results": {kind: {"peak_bytes", "breakdown": {"params", "grads", "opt_state", "activations"},
                        "detail": {finer categories}, "persistent_bytes", "step_peaks_bytes",
                        "ratio_to_bp", "reserved_bytes", "allocator_peak_bytes", "source",
                        "breakdown_exact", "peak_op", "peak_in_backward", "step_seconds", ...}}}
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config.argparsing import DefaultsHelpFormatter, OneLineParser, add_field
from ..config.build import DTYPES as TORCH_DTYPES, StepFactory
from ..config import MethodConfig, ModelConfig, TrainConfig
from ..errors import UserError
from ..versions import device_name, versions

KINDS = ("bp", "bp_ckpt", "local", "global", "global_ckpt")
DEFAULT_KINDS = ("bp", "bp_ckpt", "local", "global_ckpt")
DTYPES = tuple(TORCH_DTYPES)  # the names of the dtypes a step can run in
MEASURES = ("auto", "tracker", "cuda")

# Fine categories of the tracker, and how they fold into the four-way breakdown.
CATEGORIES = ("params", "buffers", "grads", "opt_state", "inputs", "activations", "backward",
              "opt_temps", "other")
BREAKDOWN = {
    "params": ("params", "buffers"),
    "grads": ("grads",),
    "opt_state": ("opt_state",),
    "activations": ("inputs", "activations", "backward", "opt_temps", "other"),
}

MiB = 2 ** 20
# the TrainConfig fields of a local objective that build_step's ``local_options`` may set: what
# shapes its aux networks and losses (the rest of the step is build_step's own arguments)
LOCAL_OPTIONS = ("infopro_loss", "ixx_1", "ixy_1", "ixx_2", "ixy_2", "man_base", "man_momentum", "hpff_base",
                 "hpff_wx", "hpff_wy", "hpff_patches")
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (on this thread)."""
    return _graph_task_id() >= 0


# ----------------------------------------------------------------------------------------------
# the tensor-level tracker
# ----------------------------------------------------------------------------------------------
class TensorMemoryTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages, by category, and their peak.

    Every ATen op run inside the context is seen; each storage among its outputs (and, for
    tensors that existed before, its inputs) is counted once, from the first time it is seen until
    its last reference dies (a weakref callback on the storage). The peak is checked after every
    op, so it includes the op's inputs and outputs alive together.

    ``modules`` and ``optimizers`` name what is parameters, buffers, gradients and optimizer
    state; ``inputs`` is the batch. Their storages are counted from the moment the tracker is
    entered. ``device`` restricts counting to one device type (``None``: every device but meta).

    With ``track_ops=False`` no dispatch mode is pushed: only the named tensors (parameters,
    buffers, gradients, optimizer state, inputs) are followed, which is cheap; used on CUDA next
    to the allocator counters.

    The state survives ``__exit__``, so the tracker can be entered again; ``reset_peak()`` starts
    a new peak from the current live total.
    """

    def __init__(self, modules: Iterable[nn.Module] = (), optimizers: Iterable[torch.optim.Optimizer] = (),
                 inputs: Iterable[torch.Tensor] = (), device: str | torch.device | None = None,
                 track_ops: bool = True):
        super().__init__()
        self.modules = list(modules)
        self.optimizers = list(optimizers)
        self.inputs = list(inputs)
        self.device_type = None if device is None else torch.device(device).type
        self.track_ops = track_ops
        # id(storage) -> [nbytes, category, weakref(storage), op that created it, shape]
        self._live: dict[int, list] = {}
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak_total = 0
        self.peak_breakdown = dict(self.current)
        self.peak_op: str | None = None
        self.peak_in_backward = False
        self.category_peak = dict.fromkeys(CATEGORIES, 0)
        self._params: list[nn.Parameter] = []
        self._handles: list = []
        self._in_opt = 0
        self._depth = 0
        self._record_peak_live = False
        self.peak_live: list[tuple[int, str, str, tuple]] | None = None

    # -- bookkeeping ----------------------------------------------------------------------------
    def _storage(self, t: torch.Tensor):
        if t.device.type == "meta" or (self.device_type is not None and t.device.type != self.device_type):
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, storage-less subclasses
            return None

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[0]
            self.total -= entry[0]

    def _see(self, t: torch.Tensor, category: str, origin=None, force: bool = False) -> None:
        st = self._storage(t)
        if st is None:
            return
        key = id(st)
        entry = self._live.get(key)
        if entry is None:
            nbytes = st.nbytes()
            ref = weakref.ref(st, lambda _r, key=key, me=weakref.ref(self): me() and me()._free(key))
            self._live[key] = [nbytes, category, ref, origin, tuple(t.shape)]
            self.current[category] += nbytes
            self.total += nbytes
        else:
            nbytes = st.nbytes()
            if nbytes != entry[0]:  # resized in place
                self.current[entry[1]] += nbytes - entry[0]
                self.total += nbytes - entry[0]
                entry[0] = nbytes
            if force and entry[1] != category:
                self.current[entry[1]] -= nbytes
                self.current[category] += nbytes
                entry[1] = category
        if self.current[category] > self.category_peak[category]:
            self.category_peak[category] = self.current[category]

    def mark(self, t: torch.Tensor | None, category: str) -> None:
        """Count ``t``'s storage under ``category`` from now on (re-categorising it if known)."""
        if isinstance(t, torch.Tensor):
            self._see(t, category, force=True)

    def _update_peak(self, op=None) -> None:
        if self.total > self.peak_total:
            self.peak_total = self.total
            self.peak_breakdown = dict(self.current)
            self.peak_op = None if op is None else str(op)
            self.peak_in_backward = _in_backward()
            if self._record_peak_live:
                self.peak_live = [(e[0], e[1], str(e[3]) if e[3] is not None else "", e[4])
                                  for e in self._live.values()]

    def reset_peak(self) -> None:
        self.peak_total = self.total
        self.peak_breakdown = dict(self.current)
        self.peak_op, self.peak_in_backward = None, False
        self.category_peak = dict(self.current)
        if self._record_peak_live:
            self.peak_live = [(e[0], e[1], str(e[3]) if e[3] is not None else "", e[4])
                              for e in self._live.values()]

    def record_peak_live(self, on: bool = True) -> None:
        """Also keep the list of live storages ``(nbytes, category, creating op, shape)`` at the
        peak (costly: a copy at every new peak)."""
        self._record_peak_live = on

    def live_bytes(self, category: str | None = None) -> int:
        return self.total if category is None else self.current[category]

    # -- the named tensors ----------------------------------------------------------------------
    def _mark_named(self) -> None:
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            for b in m.buffers():
                self.mark(b, "buffers")
        for opt in self.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        self._params = params
        for p in params:
            self.mark(p, "params")
            self.mark(p.grad, "grads")
        for opt in self.optimizers:
            self._mark_opt_state(opt)
        for t in self.inputs:
            self.mark(t, "inputs")

    def _mark_opt_state(self, opt: torch.optim.Optimizer) -> None:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self.mark(v, "opt_state")

    def _on_grad(self, p: torch.Tensor) -> None:
        self.mark(p.grad, "grads")

    def _opt_pre(self, opt, args, kwargs) -> None:
        self._in_opt += 1
        for g in opt.param_groups:  # gradients of parameters the modules did not name
            for p in g["params"]:
                self.mark(p.grad, "grads")

    def _opt_post(self, opt, args, kwargs) -> None:
        self._mark_opt_state(opt)
        self._in_opt = max(self._in_opt - 1, 0)

    def __enter__(self):
        if self._depth == 0:
            self._mark_named()
            for p in self._params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._handles.append(register_optimizer_step_pre_hook(self._opt_pre))
            self._handles.append(register_optimizer_step_post_hook(self._opt_post))
            self._update_peak()
        self._depth += 1
        if self.track_ops:
            return super().__enter__()
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for h in self._handles:
                h.remove()
            self._handles.clear()
        if self.track_ops:
            return super().__exit__(*exc)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._in_opt:
            category = "opt_temps"
        elif _in_backward():
            category = "backward"
        else:
            category = "activations"
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                st = self._storage(t)
                if st is not None and id(st) not in self._live:
                    self._see(t, "other", func)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, category, func)
        self._update_peak(func)
        return out

    def snapshot(self, peak: bool = True) -> dict:
        """Bytes by fine category and by the four-way breakdown (at the peak, or now)."""
        cats = self.peak_breakdown if peak else self.current
        return {
            "total": self.peak_total if peak else self.total,
            "breakdown": {k: sum(cats[c] for c in v) for k, v in BREAKDOWN.items()},
            "detail": dict(cats),
        }


# ----------------------------------------------------------------------------------------------
# building one step kind
# ----------------------------------------------------------------------------------------------
@dataclass
class StepSetup:
    """A network, its learner and a fixed batch, ready to run one kind of step."""

    kind: str
    net: nn.Module
    executor: object
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    batch: int
    stats: object
    # the image in [0, 1] that a reconstructing local loss needs (InfoPro's decoders, HPFF's patch
    # decoders), as the trainer hands it to the learner; None where the method needs none
    image01: torch.Tensor | None = None

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The batch's tensors (what the tracker counts as inputs)."""
        return [t for t in (self.x, self.y, self.image01) if t is not None]

    def run(self) -> None:
        """One step of this kind on the fixed batch."""
        _call(self, self.x, self.y, self.image01)

    def warm_up(self, batch: int | None = None) -> None:
        """One step (at a smaller batch if given) so that optimizer state exists."""
        if batch is None or batch >= self.batch:
            self.run()
        else:
            _call(self, self.x[:batch], self.y[:batch], None if self.image01 is None else self.image01[:batch])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _call(setup: StepSetup, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None) -> None:
    if setup.kind == "local":
        setup.executor.local_step(x, y, image01)
    else:
        setup.executor.global_step(x, y, image01)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    return dev


def build_step(kind: str, *, arch: str = "resnet32", J: int = 16, aux: str | None = "1c2f", batch: int = 256,
               dtype: str = "fp32", device: str | torch.device = "cpu", image_size: int = 32, seed: int = 0,
               split: str = "auto", head_kernels: str = "auto", channels_last: bool = False,
               num_classes: int = 10, lean_blocks: bool = False, model: str | None = None,
               cuts: str | None = None, cifar_stem: bool = False, pgl_local: str = "dgl",
               local_options: dict | None = None) -> StepSetup:
    """A fresh network + learner for one step kind, built as a training run builds them
    (``--arch``, ``--model``/``--cuts`` and ``--cifar-stem`` as in ``pgl_fast.train``). The
    local-learning kinds are PGL's over ``pgl_local`` (``--pgl-local``: ``infopro`` adds InfoPro's
    decoders, ``man`` MAN's copies on the aux path, ``hpff`` HPFF's second heads and patch decoders
    and its two-module local step); ``local_options``: that objective's own flags as
    :class:`~pgl_fast.config.TrainConfig` fields (``man_base``, ``hpff_base``, ``hpff_patches``,
    ``infopro_loss``, ...). Where its loss reconstructs the image, the step gets a random
    ``image01`` batch as the trainer would hand it."""
    if kind not in KINDS:
        raise UserError(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if image_size < 8:
        raise UserError(f"--image-size: must be >= 8, got {image_size}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dtype == "fp16" and dev.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA GPU (it needs loss scaling); use fp32 or bf16 on the CPU")
    method = "bp" if kind.startswith("bp") else "pgl"
    if method == "pgl" and aux is None:
        raise UserError(f"--aux: the {kind} step needs aux heads; pick one of the aux configs")
    options = dict(local_options or {}) if method == "pgl" else {}
    for name in options:
        if name not in LOCAL_OPTIONS:
            raise UserError(f"build_step(local_options=...): {name!r} is not one of {', '.join(LOCAL_OPTIONS)}")
    factory = flags_factory(arch=arch, J=J, aux=aux, split=split, num_classes=num_classes, image_size=image_size,
                            lean_blocks=lean_blocks, model=model, cuts=cuts, cifar_stem=cifar_stem,
                            pgl_local=pgl_local, local_options=options)
    return setup_step(kind, factory, batch=batch, dtype=dtype, device=dev, seed=seed, head_kernels=head_kernels,
                      channels_last=channels_last)


def flags_factory(*, arch: str = "resnet32", J: int = 16, aux: str | None = "1c2f", split: str = "auto",
                  num_classes: int = 10, image_size: int = 32, lean_blocks: bool = False, model: str | None = None,
                  cuts: str | None = None, cifar_stem: bool = False, pgl_local: str = "dgl",
                  local_options: dict | None = None) -> StepFactory:
    """The :class:`~pgl_fast.config.build.StepFactory` that :func:`build_step`'s keywords describe: the
    network of ``--arch``/``--model``, J modules (or J from ``--cuts``), the local kinds PGL's over
    ``pgl_local`` with its flags ``local_options``."""
    return StepFactory(
        model=ModelConfig(arch=arch, modules=16 if (model or cuts) else J, split=split, model=model, cuts=cuts,
                          cifar_stem=cifar_stem),
        method=MethodConfig(method="pgl", pgl_local=pgl_local, aux=aux or "1c2f", **dict(local_options or {})),
        lean_blocks=lean_blocks, num_classes=num_classes, image_size=image_size)


def setup_step(kind: str, factory: StepFactory, *, batch: int, dtype: str = "fp32",
               device: torch.device = torch.device("cpu"), seed: int = 0, head_kernels: str = "eager",
               channels_last: bool = False) -> StepSetup:
    """A fresh network + learner from ``factory`` for one step kind, and a fixed random batch."""
    dev = device
    image_size, num_classes = factory.image_size, factory.num_classes
    net, exe = factory(kind, batch=batch, dtype=dtype, device=dev, head_kernels=head_kernels,
                       channels_last=channels_last, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    image01 = None
    if exe.method.needs_image:  # drawn after x and y: their values do not depend on the method
        image01 = torch.rand(batch, 3, image_size, image_size, generator=gen).to(dev)
    return StepSetup(kind=kind, net=net, executor=exe, x=x, y=y, device=dev, batch=batch, stats=exe.stats,
                     image01=image01)


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if id(st) not in seen:
                seen.add(id(st))
                total += st.nbytes()
    return total


def _opt_state_tensors(optimizers) -> list[torch.Tensor]:
    return [v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """Training turns cuDNN autotuning on (non-deterministic runs); do the same while measuring."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def measure_step(setup: StepSetup, steps: int = 1, measure: str = "auto", record_live: bool = False) -> dict:
    """Peak memory of ``steps`` steps of an already warmed-up ``setup``, as one result dict."""
    if measure not in MEASURES:
        raise UserError(f"--measure: {measure!r} is not one of {', '.join(MEASURES)}")
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    dev = setup.device
    if measure == "auto":
        measure = "cuda" if dev.type == "cuda" else "tracker"
    if measure == "cuda" and dev.type != "cuda":
        raise UserError("--measure cuda needs --device cuda; the CPU uses --measure tracker")
    exe = setup.executor
    cuda = dev.type == "cuda"
    tracker = TensorMemoryTracker(modules=[setup.net], optimizers=exe.optimizers, inputs=setup.inputs,
                                  device=dev, track_ops=measure == "tracker")
    tracker.record_peak_live(record_live)
    step_peaks, step_times, alloc_peaks, reserved_peaks, grad_peaks = [], [], [], [], []
    with _cudnn_benchmark(dev):
        if cuda:
            torch.cuda.synchronize(dev)
        with tracker:
            persistent = tracker.total
            alloc_start = torch.cuda.memory_allocated(dev) if cuda else None
            overall = None
            for _ in range(steps):
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                tracker.reset_peak()
                t0 = time.perf_counter()
                setup.run()
                if cuda:
                    torch.cuda.synchronize(dev)
                    alloc_peaks.append(torch.cuda.max_memory_allocated(dev))
                    reserved_peaks.append(torch.cuda.max_memory_reserved(dev))
                step_times.append(time.perf_counter() - t0)
                step_peaks.append(tracker.peak_total)
                grad_peaks.append(tracker.category_peak["grads"])
                snap = tracker.snapshot(peak=True)
                snap.update(op=tracker.peak_op, bw=tracker.peak_in_backward, live=tracker.peak_live)
                if overall is None or snap["total"] > overall["total"]:
                    overall = snap
    result = {
        "kind": setup.kind,
        "step": {"local": "local_step", "global": "global_step", "global_ckpt": "global_step"}.get(
            setup.kind, "bp_step"),
        "checkpoint_global": setup.kind.endswith("_ckpt"),
        "source": "tensor_tracker" if measure == "tracker" else "cuda_allocator",
        "steps": steps,
        "step_seconds": sorted(step_times)[len(step_times) // 2],
        "reserved_bytes": max(reserved_peaks) if cuda else None,
        "allocator_peak_bytes": max(alloc_peaks) if cuda else None,
        "ratio_to_bp": None,
    }
    if measure == "tracker":
        result.update({
            "peak_bytes": overall["total"],
            "breakdown": overall["breakdown"],
            "detail": overall["detail"],
            "breakdown_exact": True,
            "persistent_bytes": persistent,
            "step_peaks_bytes": step_peaks,
            "peak_op": overall["op"],
            "peak_in_backward": overall["bw"],
        })
        if record_live:
            result["peak_live"] = sorted(overall["live"], key=lambda e: -e[0])
    else:
        params = _unique_bytes(list(setup.net.parameters()) + list(setup.net.buffers()))
        opt = _unique_bytes(_opt_state_tensors(exe.optimizers))
        grads = max(grad_peaks)
        peak = max(alloc_peaks)
        result.update({
            "peak_bytes": peak,
            "breakdown": {"params": params, "grads": grads, "opt_state": opt,
                          "activations": max(peak - params - grads - opt, 0)},
            "detail": None,
            "breakdown_exact": False,
            "persistent_bytes": alloc_start,
            "step_peaks_bytes": alloc_peaks,
            "peak_op": None,
            "peak_in_backward": None,
        })
    return result


def profile_steps(arch: str = "resnet32", J: int = 16, aux: str | None = "1c2f", batch: int = 256,
                  dtype: str = "fp32", device: str = "cpu", steps: int = 2,
                  kinds: Iterable[str] = DEFAULT_KINDS, image_size: int = 32, seed: int = 0, *,
                  split: str = "auto", measure: str = "auto", warmup_batch: int | None = None,
                  head_kernels: str = "auto", channels_last: bool = False, record_live: bool = False,
                  progress: Callable[[str], None] | None = None, lean_blocks: bool = False,
                  model: str | None = None, cuts: str | None = None, cifar_stem: bool = False,
                  pgl_local: str = "dgl", local_options: dict | None = None) -> dict:
    """Peak memory per step kind (see the module docstring for the dict layout). ``pgl_local``: the
    local objective of the local and global kinds (``man``: with MAN's aux path; ``hpff``: HPFF's
    two-module local step), ``local_options`` its flags (see :func:`build_step`).

    ``warmup_batch``: run the warm-up step at this smaller batch (it only has to create the
    optimizer state; the measured steps run at ``batch``). ``None``: the full batch.
    """
    kinds = tuple(kinds)
    if not kinds:
        raise UserError("--kinds: give at least one kind")
    for k in kinds:
        if k not in KINDS:
            raise UserError(f"--kinds: {k!r} is not one of {', '.join(KINDS)}")
    if batch < 1:
        raise UserError(f"-b/--batch-size: must be >= 1, got {batch}")
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    if warmup_batch is not None and warmup_batch < 1:
        raise UserError(f"--warmup-batch: must be >= 1, got {warmup_batch}")
    if measure not in MEASURES:
        raise UserError(f"--measure: {measure!r} is not one of {', '.join(MEASURES)}")
    dev = resolve_device(device)
    if measure == "cuda" and dev.type != "cuda":
        raise UserError("--measure cuda needs --device cuda; the CPU uses --measure tracker")
    results: dict[str, dict] = {}
    for kind in dict.fromkeys(kinds):
        setup = build_step(kind, arch=arch, J=J, aux=aux, batch=batch, dtype=dtype, device=dev,
                           image_size=image_size, seed=seed, split=split, head_kernels=head_kernels,
                           channels_last=channels_last, lean_blocks=lean_blocks, model=model, cuts=cuts,
                           cifar_stem=cifar_stem, pgl_local=pgl_local, local_options=local_options)
        with _cudnn_benchmark(dev):
            setup.warm_up(warmup_batch)
        results[kind] = measure_step(setup, steps=steps, measure=measure, record_live=record_live)
        J = setup.net.J  # with --cuts the cuts set J
        del setup
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress(kind)
    if "bp" in results:
        bp = results["bp"]["peak_bytes"]
        for r in results.values():
            r["ratio_to_bp"] = r["peak_bytes"] / bp if bp else None
    return {
        "config": {"arch": model or arch, "J": J, "aux": aux, "batch": batch, "dtype": dtype, "device": str(dev),
                   "steps": steps, "kinds": list(results), "image_size": image_size, "seed": seed,
                   "split": split, "measure": measure, "warmup_batch": warmup_batch,
                   "head_kernels": head_kernels, "channels_last": channels_last, "pgl_local": pgl_local,
                   "local_options": dict(local_options or {})},
        "device": str(dev),
        "device_name": device_name(dev),
        "cpu_threads": torch.get_num_threads(),
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    cols = ["kind", "peak MiB", "params", "grads", "opt", "activations", "ratio to bp"]
    cuda = any(r["reserved_bytes"] is not None for r in report["results"].values())
    if cuda:
        cols.append("reserved MiB")
    cols.append("step s")
    rows = []
    for kind, r in report["results"].items():
        b = r["breakdown"]
        row = {"kind": kind, "peak MiB": f"{r['peak_bytes'] / MiB:.1f}", "params": f"{b['params'] / MiB:.2f}",
               "grads": f"{b['grads'] / MiB:.2f}", "opt": f"{b['opt_state'] / MiB:.2f}",
               "activations": f"{b['activations'] / MiB:.1f}",
               "ratio to bp": "-" if r["ratio_to_bp"] is None else f"{r['ratio_to_bp']:.3f}",
               "step s": f"{r['step_seconds']:.3f}"}
        if cuda:
            row["reserved MiB"] = f"{r['reserved_bytes'] / MiB:.1f}"
        rows.append(row)
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(r[c].ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pgl_fast.memory.profile",
                      description="Peak memory per training step kind (bp, bp+checkpoint, local, PGL global).",
                      formatter_class=DefaultsHelpFormatter)
    # the flags a training run shares are TrainConfig's own: one help text, one set of choices
    add_field(p, TrainConfig, "arch")
    add_field(p, TrainConfig, "model")
    add_field(p, TrainConfig, "cuts")
    add_field(p, TrainConfig, "cifar_stem")
    add_field(p, TrainConfig, "modules", dest="J")
    add_field(p, TrainConfig, "aux", note="the aux head of the local and global kinds")
    add_field(p, TrainConfig, "pgl_local", note="the local objective of the local and global kinds")
    for name in LOCAL_OPTIONS:  # that objective's own flags; only those given reach its config
        add_field(p, TrainConfig, name, explicit_only=True)
    add_field(p, TrainConfig, "batch_size", dest="batch", default=256, help="batch size")  # not training's default
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="fp32, or autocast bf16/fp16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=KINDS, metavar="KIND",
                   help=f"step kinds, from {', '.join(KINDS)}")
    p.add_argument("--steps", type=int, default=2, help="measured steps per kind (after one warm-up step)")
    p.add_argument("--warmup-batch", type=int, default=None,
                   help="batch of the warm-up step (default: --batch-size); it only creates optimizer state")
    p.add_argument("--image-size", type=int, default=32)
    add_field(p, TrainConfig, "split")
    add_field(p, TrainConfig, "seed")
    p.add_argument("--measure", default="auto", choices=MEASURES,
                   help="tracker (tensor-level, CPU or CUDA) or cuda (allocator counters); auto picks by device")
    add_field(p, TrainConfig, "head_kernels")
    add_field(p, TrainConfig, "channels_last")
    add_field(p, TrainConfig, "lean_blocks", note="in the local-learning kinds; bp stays the eager baseline")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = profile_steps(arch=args.arch, J=args.J, aux=args.aux, batch=args.batch, dtype=args.dtype,
                               device=args.device, steps=args.steps, kinds=args.kinds, image_size=args.image_size,
                               seed=args.seed, split=args.split, measure=args.measure,
                               warmup_batch=args.warmup_batch, head_kernels=args.head_kernels,
                               channels_last=args.channels_last, lean_blocks=args.lean_blocks,
                               model=args.model, cuts=args.cuts, cifar_stem=args.cifar_stem,
                               pgl_local=args.pgl_local,
                               local_options={k: getattr(args, k) for k in LOCAL_OPTIONS if hasattr(args, k)})
    except UserError as e:
        print(f"python -m pgl_fast.memory.profile: error: {e}", file=sys.stderr)
        return 2
    c = report["config"]
    print(f"{c['arch']} J={c['J']} aux={c['aux']} batch={c['batch']} {c['dtype']} on {report['device']} "
          f"({report['device_name']}); {c['steps']} measured step(s) per kind after one warm-up; "
          f"source: {next(iter(report['results'].values()))['source']}")
    print(format_table(report))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
                f.write("\n")
        except OSError as e:
            print(f"python -m pgl_fast.memory.profile: error: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
