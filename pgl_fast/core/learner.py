"""``LocalLearner``: trains a :class:`~pgl_fast.models.local_model.LocalModel` with a method
(:mod:`pgl_fast.core.methods`). Each step kind is one explicit piece:

- ``local_step``: for j = 1..J: run module j on the detached output of module j-1, its local loss,
  its backward, step its optimizer, free its graph and gradients. Only one module's activations
  (plus its aux head) are alive at a time. DGL, InfoPro and PGL's local epochs.
- ``global_step``: run all modules end to end; at every cut the aux head sees the *detached*
  features and its local loss is backpropagated at once (heads learn from their local loss only,
  and their graphs are freed before the next module runs); then the final loss is backpropagated
  through the whole backbone (the backbone learns from the final loss only). PGL's global epochs
  and BP. With checkpointing the units are recomputed segment by segment in the backward.

In both, right after the backward of module j's local loss the learner calls the method's
``after_local_backward(model, j)`` (MAN's EMA update; nothing for the other methods), before any
optimizer step of module j+1 in that step.

There is one optimizer per module (module j's backbone parameters, its aux head and decoder).
Stepping module j right after its own backward equals a single step of every module after all
backwards, because SGD (momentum, Nesterov, weight decay) is elementwise per parameter and every
module's input was computed before any update. Optimizer state carries across phase switches.

Runtime concerns -- autocast, the fp16 grad scaler, channels-last inputs, CUDA-graph replay of
local steps, ``torch.compile`` of the step pieces -- are options of the learner, apart from the
method. Step statistics are accumulated in device tensors and read once per epoch (no host sync
per step).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..models.heads import upcast
from ..models.local_model import LocalModel
from ..runtime.compile import CompiledPieces
from ..runtime.device import device_context
from ..runtime.graphs import GraphedLocalSteps
from ..runtime.optim import sgd
from .methods import Method, from_name
from .schedule import LOCAL


@contextlib.contextmanager
def frozen_bn_stats(modules):
    """Batch norm still normalises with batch statistics but leaves its running statistics (and
    ``num_batches_tracked``) untouched: used for the recomputation inside checkpointing, so that
    running statistics are updated exactly once per forward."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def checkpointed(units, x: torch.Tensor, taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """Non-reentrant checkpoint of running ``units`` in sequence on ``x``.

    Returns the last output followed by the outputs of the units whose indices are in ``taps``
    (the aux heads' inputs inside the segment). The recomputation in the backward leaves BN
    running statistics untouched, so they are updated exactly once per forward."""
    units = [units] if isinstance(units, nn.Module) else list(units)
    calls = [0]

    def forward(inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tapped = []
        for i, u in enumerate(units):
            inp = u(inp)
            if i in taps:
                tapped.append(inp)
        return (inp, *tapped)

    # Lean blocks keep an intermediate on their autograd context, outside the saved-tensor hooks
    # that checkpointing relies on: inside a checkpoint the plain block is both leaner and exact.
    lean = [u for u in units if getattr(u, "lean", False)]
    if lean:
        plain = forward

        def forward(inp: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: F811
            for u in lean:
                u.lean = False
            try:
                return plain(inp)
            finally:
                for u in lean:
                    u.lean = True

    def run(inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls[0] += 1
        if calls[0] == 1:
            return forward(inp)
        with frozen_bn_stats(units):
            return forward(inp)

    has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for u in units for m in u.modules())
    return checkpoint(run, x, use_reentrant=False, preserve_rng_state=has_dropout)


class StepStats:
    """Device-side accumulators for one epoch. Every counter is a tensor updated in place, so a
    step captured in a CUDA graph keeps counting on replay; ``read`` is the one host sync."""

    def __init__(self, J: int, device: torch.device):
        self.loss_sum = torch.zeros(J, device=device, dtype=torch.float64)
        self.final_correct = torch.zeros((), device=device, dtype=torch.int64)
        self.samples_t = torch.zeros((), device=device, dtype=torch.int64)
        self.step_t = torch.zeros((), device=device, dtype=torch.int64)
        # first step at which module j's loss (or gradient) was non-finite (-1: never)
        self.first_bad = torch.full((J,), -1, device=device, dtype=torch.int64)
        self.first_bad_grad = torch.full((J,), -1, device=device, dtype=torch.int64)

    _FIELDS = ("loss_sum", "final_correct", "samples_t", "step_t", "first_bad", "first_bad_grad")

    def reset(self) -> None:
        for k in self._FIELDS:
            t = getattr(self, k)
            t.fill_(-1) if k.startswith("first_bad") else t.zero_()

    @staticmethod
    def _mark(slot: torch.Tensor, bad: torch.Tensor, step: torch.Tensor) -> None:
        slot.copy_(torch.where(bad & (slot < 0), step, slot))

    def add(self, j: int, loss: torch.Tensor, n: int) -> None:
        loss = loss.detach()
        self.loss_sum[j] += loss.double() * n
        self._mark(self.first_bad[j], ~torch.isfinite(loss), self.step_t)

    def add_grad_check(self, j: int, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        # one multi-tensor launch per module instead of a norm kernel per parameter
        total = torch.stack(torch._foreach_norm([g.detach() for g in grads])).float().sum()
        self._mark(self.first_bad_grad[j], ~torch.isfinite(total), self.step_t)

    def add_correct(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.final_correct += (logits.detach().argmax(1) == y).sum()

    def end_step(self, n: int) -> None:
        self.samples_t += n
        self.step_t += 1

    @property
    def samples(self) -> int:
        return int(self.samples_t.item())

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in self._FIELDS]

    def state_dict(self) -> dict:
        return {k: getattr(self, k).cpu() for k in self._FIELDS}

    def load_state_dict(self, d: dict) -> None:
        for k in self._FIELDS:
            getattr(self, k).copy_(d[k])

    def read(self) -> dict:
        """One host sync: the epoch's averages."""
        loss_sum, correct, samples, first_bad, first_bad_grad = (
            t.tolist() for t in (self.loss_sum, self.final_correct, self.samples_t, self.first_bad, self.first_bad_grad))
        n = max(samples, 1)
        return {
            "losses": [v / n for v in loss_sum],
            "train_acc": correct / n,
            "samples": samples,
            "first_bad": first_bad,
            "first_bad_grad": first_bad_grad,
        }


def _on_device(method):
    """Run a learner method with the model's CUDA device current (see ``runtime.device``): streams,
    events, graph replays and Triton launches inside it go to that device, also for ``cuda:N``."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with device_context(self.device):
            return method(self, *args, **kwargs)
    return run


def _amp_dtype(amp) -> torch.dtype | None:
    if amp is None or amp is False:
        return None
    if amp is True or amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if isinstance(amp, torch.dtype) and amp in (torch.bfloat16, torch.float16):
        return amp
    raise UserError(f"amp={amp!r}: use None, True/'bf16' or 'fp16'")


def _compile_mode(compile) -> str | None:
    if compile is None or compile is False:
        return None
    return "default" if compile is True else str(compile)


class LocalLearner:
    """Trains ``model`` with ``method``.

    ``optimizer``: a callable taking an iterable of parameters and returning a ``torch.optim``
    optimizer, called once per module (default: SGD with momentum 0.9, Nesterov, weight decay 1e-4,
    lr 0.1, torch's fused SGD with its lr in a device tensor). ``amp``: None, True/"bf16" or "fp16" (autocast; fp16 with a
    grad scaler). ``compile``: None, True or a ``torch.compile`` mode for the steps' forward-and-loss
    pieces. ``cuda_graphs``: replay local steps as CUDA graphs (CUDA only). ``checkpoint_global``:
    False, True (one checkpointed segment per module) or a list of ``(start, end)`` unit ranges
    checkpointed as one piece each in global steps. ``lr_schedule``: ``epoch -> lr``, applied by
    :meth:`start_epoch` (None: the optimizers keep their lr). ``channels_last``: the model and 4-d
    inputs in channels-last memory format."""

    def __init__(self, local_model: LocalModel, method: Method | str, *, optimizer: Callable | None = None,
                 amp=None, compile=None, cuda_graphs: bool = False,
                 checkpoint_global: bool | Sequence[tuple[int, int]] = False,
                 lr_schedule: Callable[[int], float] | None = None, channels_last: bool = False):
        if not isinstance(local_model, LocalModel):
            raise UserError(f"LocalLearner: model is a {type(local_model).__name__}; build a LocalModel with "
                            "pgl_fast.split(...) or LocalModel(blocks, classifier, heads)")
        method = from_name(method) if isinstance(method, str) else method
        if not isinstance(method, Method):
            raise UserError(f"LocalLearner: method is a {type(method).__name__}; use pgl_fast.methods.BP(), DGL(), "
                            "InfoPro(...) or PGL(period, duration)")
        method.prepare(local_model)
        self.model = local_model
        self.method = method
        self.J = local_model.J
        self.amp_dtype = _amp_dtype(amp)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            local_model.to(memory_format=torch.channels_last)
        if checkpoint_global is True:
            self.segments = list(local_model.ranges)
        elif checkpoint_global is False or checkpoint_global is None:
            self.segments = None
        else:
            self.segments = [tuple(r) for r in checkpoint_global]
            covered = [u for a, b in self.segments for u in range(a, b)]
            if covered != list(range(len(local_model.units))):
                raise UserError(f"checkpoint_global: the segments {self.segments} must cover units "
                                f"0..{len(local_model.units) - 1} in order")
        self.checkpoint_global = self.segments is not None
        make = optimizer if optimizer is not None else sgd()
        self.optimizers = [make(local_model.module_parameters(j) + local_model.aux_parameters(j))
                           for j in range(self.J)]
        for j, opt in enumerate(self.optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise UserError(f"optimizer: the callable returned a {type(opt).__name__} for module {j}, "
                                "not a torch.optim.Optimizer")
        p = next(local_model.parameters())
        self.device = p.device
        self.device_type = p.device.type
        # fp16 needs loss scaling; bf16 does not, so nothing syncs with the host
        self.scaler = torch.amp.GradScaler(self.device_type) if self.amp_dtype == torch.float16 else None
        self.stats = StepStats(self.J, self.device)
        # module j's loss of the latest step, what step() returns (NaN: none yet, e.g. BP's headless
        # modules); written in place, so a step replayed from a CUDA graph updates it too
        self.last_losses = torch.full((self.J,), float("nan"), device=self.device, dtype=torch.float64)
        self.lr_schedule = lr_schedule
        self.phase = method.phase(0)
        self.epoch = 0
        # a CUDA-graph capture must not keep autocast's weight-cast cache across the capture boundary
        self.autocast_cache = True
        self.compiled = None
        mode = _compile_mode(compile)
        for on, option in ((mode is not None, "compile"), (cuda_graphs, "cuda_graphs")):
            why = method.refusal(option) if on else None
            if why:
                raise UserError(f"{option}: {why}; build the LocalLearner without {option}")
        if mode is not None:
            self.compiled = CompiledPieces(self, mode)
        self.graphed = None
        if cuda_graphs:
            if self.device_type != "cuda":
                raise UserError("cuda_graphs needs the model on a CUDA GPU (it is on "
                                f"{self.device_type}); train eagerly instead")
            if not all(getattr(o, "graph_safe", False) for o in self.optimizers):
                raise UserError("cuda_graphs needs optimizers whose lr lives in a device tensor read by a fused "
                                "kernel (pgl_fast.runtime.optim.sgd(kernel='fused'), the default)")
            self.graphed = GraphedLocalSteps(self, self.stats)

    # -- helpers ---------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            if hasattr(opt, "set_lr"):
                opt.set_lr(lr)
            else:
                for group in opt.param_groups:
                    group["lr"] = lr

    def start_epoch(self, epoch: int) -> float | None:
        """Enter 0-based ``epoch``: its phase, its lr (from ``lr_schedule``), fresh statistics.
        Returns the lr set (None without a schedule)."""
        self.epoch = epoch
        self.phase = self.method.phase(epoch)
        self.stats.reset()
        self.model.train()
        if self.lr_schedule is None:
            return None
        lr = float(self.lr_schedule(epoch))
        self.set_lr(lr)
        return lr

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype, cache_enabled=self.autocast_cache)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)

    def step_module(self, j: int) -> None:
        """Module j's update: the gradient finiteness check, its optimizer's step, gradients freed."""
        opt = self.optimizers[j]
        if self.scaler is not None:
            self.scaler.step(opt)  # skips the step on inf/nan gradients, by design
        else:
            self.stats.add_grad_check(j, [p.grad for g in opt.param_groups for p in g["params"]
                                          if p.grad is not None])
            opt.step()
        opt.zero_grad(set_to_none=True)

    def end_step(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def local_loss(self, j: int, h: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None) -> torch.Tensor:
        """The local loss of module j < J-1 on its output ``h`` (the method's)."""
        return self.method.local_loss(self.model, j, h, y, image01)

    def final_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upcast(logits), y)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format the model trains in (channels-last when it does so)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # -- the step kinds --------------------------------------------------------------------------
    @_on_device
    def step(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None) -> torch.Tensor:
        """One step of the current phase (set by :meth:`start_epoch`).

        Returns the step's losses as a float64 tensor of J entries on the learner's device (no host
        synchronisation: call ``.tolist()`` when the values are wanted on the host): entry j < J-1
        is module j's local loss (in a global step: its aux head's local loss on detached features),
        entry J-1 the final cross-entropy loss of the network. Entries of modules without an aux
        head (``BP``) are NaN. The tensor is a copy: later steps do not change it."""
        if self.phase == LOCAL:
            self.local_step(x, y, image01)
        else:
            self.global_step(x, y, image01)
        return self.last_losses.clone()

    @_on_device
    def local_step(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None) -> None:
        if self.graphed is not None:
            self.graphed(self.prepare_input(x), y, image01)
        else:
            self.run_local_step(self.prepare_input(x), y, image01)

    @_on_device
    def run_local_step(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None) -> None:
        """The eager local step (what a CUDA graph captures): :meth:`local_module` for every module,
        then :meth:`flush_local` for the modules a window still holds."""
        n = x.shape[0]
        if self.compiled is not None:
            self.compiled.begin_step()
        window: list[tuple[torch.Tensor, torch.Tensor]] = []
        h = x
        for j in range(self.J):
            h = self.local_module(j, h, y, image01, n, window)
        self.flush_local(window)
        self.end_step()
        self.stats.add_correct(h, y)
        self.stats.end_step(n)

    def local_module(self, j: int, h: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None, n: int,
                     window: list | None = None) -> torch.Tensor:
        """Module j's share of a local step: its forward on the detached ``h``, its local loss (the
        final loss for the last module), the backward, its optimizer step and statistics. Returns
        its output (the last module's: the logits). The one local step: the learner's own, a
        pipeline stage's and the cost model's timing all run it.

        A method whose loss at cut j reaches ``reach`` > 1 modules (its ``back`` part, see
        ``Method.local_parts``) keeps the last ``reach - 1`` modules' graphs alive in ``window``:
        ``back``'s gradient at module j's input is carried on through them, and module
        j - reach + 1 is stepped as soon as that loss is done (no later loss reaches it)."""
        net, stats, reach, last = self.model, self.stats, self.method.reach, j == self.J - 1
        inp = h.detach()
        if reach > 1 and j > 0:
            inp.requires_grad_()  # the cascade's gradient at this module's input flows on back
        with self.autocast():
            if self.compiled is not None:
                # module j's forward and local loss as one compiled graph; its output comes back
                # detached (the last module's: the logits)
                h, loss = self.compiled.local[j](h, y, image01)
                own, back = loss, None
            elif not last:
                h = net.blocks[j](inp)
                own, back = self.method.local_parts(net, j, h, y, image01)
                loss = own if back is None else back if own is None else own + back
            else:
                h = net.classifier(net.blocks[j](inp))
                loss = self.final_loss(h, y)
                own, back = self.method.final_parts(loss)
        if back is not None:
            # module j's graph serves ``own`` next and the cascade of the loss at cut j + 1
            self.backward(back, retain_graph=own is not None or not last)
            g = inp.grad if j > 0 else None
            for m_inp, m_out in reversed(window[len(window) - (reach - 1):] if reach > 1 else []):
                if g is None:
                    break
                m_inp.grad = None
                # the scaled gradient goes on as it is: backward() scales losses only
                m_out.backward(g, retain_graph=True)
                g = m_inp.grad
            del g
        if own is not None:
            self.backward(own, retain_graph=reach > 1 and not last)
        if not last:
            self.method.after_local_backward(net, j)
        if reach > 1:
            window.append((inp, h))
            if j - reach + 1 >= 0:
                self.step_module(j - reach + 1)
                window[:] = window[-(reach - 1):]
        else:
            self.step_module(j)
        if loss is not None:
            stats.add(j, loss, n)
            self.last_losses[j].copy_(loss.detach())
        return h

    def flush_local(self, window: list) -> None:
        """The end of a local step: the modules still in the window (a reach > 1 method's last
        ``reach - 1``) have had every loss that reaches them: step them."""
        reach = self.method.reach
        for m in range(max(self.J - reach + 1, 0), self.J) if reach > 1 else ():
            self.step_module(m)
        window.clear()

    def head_loss(self, j: int, feat: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None, n: int,
                  weight: float | None = None) -> None:
        """Aux head j's share of a global step: its local loss on the detached features ``feat`` of
        its cut, backpropagated at once (scaled by ``weight``, a micro-batch's share of the batch),
        so that its graph is released before the next module runs; the head learns from its local
        loss only. The learner's global step and a pipeline stage's both run it."""
        with self.autocast():
            if self.compiled is not None:
                aux_loss = self.compiled.aux[j](feat, y, image01)
            else:
                aux_loss = self.local_loss(j, feat.detach(), y, image01)
        if aux_loss is None:  # a cut without a loss of its own (HPFF's first)
            return
        self.backward(aux_loss if weight is None else aux_loss * weight)
        self.method.after_local_backward(self.model, j)
        self.stats.add(j, aux_loss, n)
        self.last_losses[j].copy_(aux_loss.detach())

    def final_backward(self, h: torch.Tensor, y: torch.Tensor, weight: float | None = None):
        """The end of a global step's forward: the classifier on the last features, the final loss,
        its backward through the whole backbone (the backbone learns from the final loss only).
        Returns (logits, loss)."""
        with self.autocast():
            if self.compiled is not None:
                logits, loss = self.compiled.final(h, y)
            else:
                logits = self.model.classifier(h)
                loss = self.final_loss(logits, y)
        self.backward(loss if weight is None else loss * weight)
        return logits, loss

    def step_modules(self, modules) -> None:
        """The update that ends a global step: every module's optimizer, then the loss scaler's."""
        for j in modules:
            self.step_module(j)
        self.end_step()

    @_on_device
    def global_step(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None) -> None:
        net, stats = self.model, self.stats
        x = self.prepare_input(x)
        n = x.shape[0]
        units = net.units
        # unit index -> aux head fed by that unit's output (the cut after module j)
        head_at = {b - 1: j for j, (a, b) in enumerate(net.ranges[:-1])} if len(net.heads) and self.method.has_heads else {}
        segments = self.segments if self.segments is not None else [(u, u + 1) for u in range(len(units))]
        if self.compiled is not None:
            self.compiled.begin_step()
            # not checkpointed: one compiled graph per module (the heads sit at module ends)
            segments = self.segments if self.segments is not None else list(net.ranges)
        h = x
        for a, b in segments:
            taps = [u for u in range(a, b) if u in head_at]
            with self.autocast():
                if self.compiled is not None:
                    h, inner = self.compiled.segment(a, b, h, tuple(u - a for u in taps if u != b - 1),
                                                     checkpointed=self.segments is not None)
                elif self.segments is not None:
                    outs = checkpointed(units[a:b], h, tuple(u - a for u in taps if u != b - 1))
                    h, inner = outs[0], list(outs[1:])
                else:
                    h, inner = units[a](h), []
            tapped = inner + ([h] if b - 1 in head_at else [])
            for u, feat in zip(taps, tapped):
                self.head_loss(head_at[u], feat, y, image01, n)
            del tapped, inner
        logits, loss = self.final_backward(h, y)
        self.step_modules(range(self.J))
        stats.add(self.J - 1, loss, n)
        self.last_losses[self.J - 1].copy_(loss.detach())
        stats.add_correct(logits, y)
        stats.end_step(n)

    # -- evaluation ------------------------------------------------------------------------------
    def scored_heads(self, eval_heads: bool = True) -> int:
        """How many aux heads evaluation scores: every one that outputs class logits (contrastive
        InfoPro heads output features: nothing to score)."""
        if not (eval_heads and self.method.has_heads and self.method.heads_output_logits):
            return 0
        return len(self.model.heads)

    def eval_module(self, j: int, h: torch.Tensor, y: torch.Tensor, head_correct: torch.Tensor,
                    n_heads: int) -> torch.Tensor:
        """Module j's share of an evaluation (no grad, eval mode, inside autocast): its output, and
        aux head j's correct predictions added to ``head_correct[j]`` when it is scored. The
        learner's evaluation and a pipeline stage's both run it."""
        net = self.model
        h = net.blocks[j](h)
        if j < n_heads:
            head_correct[j] += (net.heads[j](self.method.aux_input(net, j, h)).argmax(1) == y).sum()
        return h

    @staticmethod
    def eval_score(logits: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """The network's correct predictions and summed loss over a test batch, added in place."""
        loss_sum += F.cross_entropy(upcast(logits), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()

    @_on_device
    @torch.no_grad()
    def evaluate(self, batches: Iterable, eval_heads: bool = True) -> dict:
        """Test accuracy and loss of the full network over ``batches`` of (x, y), and the accuracy of
        every aux head that outputs class logits."""
        net = self.model
        was_training = net.training
        net.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        n_heads = self.scored_heads(eval_heads)
        head_correct = torch.zeros(max(n_heads, 1), dtype=torch.int64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        total = 0
        for x, y in batches:
            x, y = self.prepare_input(x.to(self.device)), y.to(self.device)
            with self.autocast():
                h = x
                for j in range(self.J):
                    h = self.eval_module(j, h, y, head_correct, n_heads)
                logits = net.classifier(h)
            self.eval_score(logits, y, correct, loss_sum)
            total += y.shape[0]
        net.train(was_training)
        self.eval_counts = {"correct": correct, "loss_sum": loss_sum, "head_correct": head_correct[:n_heads],
                            "total": total}
        total = max(total, 1)
        return {
            "test_acc": correct.item() / total,
            "test_loss": loss_sum.item() / total,
            "head_acc": [c / total for c in head_correct[:n_heads].tolist()] if n_heads else None,
        }

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if len(state["optimizers"]) != len(self.optimizers):
            raise UserError(f"learner state has {len(state['optimizers'])} optimizers, this learner {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
