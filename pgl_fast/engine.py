"""Training executors. Each step kind is one explicit, swappable piece:

- ``local_step``: for j = 1..J: run module j on the detached output of module j-1, its local loss,
  its backward, step its optimizer, free its graph and gradients. Only one module's activations
  (plus its aux head) are alive at a time. DGL, InfoPro and PGL's local epochs.
- ``global_step``: run all modules end to end; at every cut the aux head sees the *detached*
  features and its local loss is backpropagated at once (eq. 4: heads learn from their local loss
  only, and their graphs are freed before the next module runs); then the final loss is
  backpropagated through the whole backbone (eq. 3: the backbone learns from the final loss only).
  PGL's global epochs. With ``checkpoint_global`` the modules are checkpointed at their
  boundaries.
- ``bp_step``: plain end-to-end backprop on the final loss (no aux heads exist).

There is one SGD optimizer per module (module j's backbone parameters, its aux head and decoder).
Stepping module j right after its own backward is exactly InfoPro's single step after all
backwards, because SGD (momentum, Nesterov, weight decay) is elementwise per parameter and every
module's input was computed before any update (prior-art §6.3). Optimizer state carries across
phase switches untouched.

Step statistics are accumulated in device tensors and read once per epoch (no host sync per step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .heads import reconstruction_loss, supcon_loss, upcast
from .network import LocalNet
from .optim import DeviceLRSGD


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


@dataclass
class LossSpec:
    """What the local loss of a module is made of (resolved from the config)."""

    kind: str  # "ce" (DGL / PGL) or "infopro"
    infopro_contrast: bool = False
    lambdas: tuple[tuple[float, float], ...] = ()


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


class Executor:
    def __init__(self, net: LocalNet, *, method: str, lr: float, momentum: float, nesterov: bool,
                 weight_decay: float, loss_spec: LossSpec, amp_dtype: torch.dtype | None,
                 checkpoint_global: bool = False, channels_last: bool = False,
                 segments: list[tuple[int, int]] | None = None, compile_mode: str | None = None):
        self.net = net
        self.method = method
        self.J = net.J
        self.loss_spec = loss_spec
        self.amp_dtype = amp_dtype
        self.checkpoint_global = checkpoint_global
        # unit ranges checkpointed as one piece in global steps (None: no checkpointing);
        # checkpoint_global alone means one segment per module
        self.segments = segments if segments is not None else (list(net.ranges) if checkpoint_global else None)
        self.channels_last = channels_last
        self.optimizers = [
            DeviceLRSGD(net.module_parameters(j) + net.aux_parameters(j), lr=lr, momentum=momentum,
                        nesterov=nesterov, weight_decay=weight_decay)
            for j in range(self.J)
        ]
        self.device_type = next(net.parameters()).device.type
        # fp16 needs loss scaling; bf16 (the default) does not, so nothing syncs with the host
        self.scaler = torch.amp.GradScaler(self.device_type) if amp_dtype == torch.float16 else None
        self.stats: StepStats | None = None  # set by the train step for the gradient check
        # a CUDA-graph capture must not keep autocast's weight-cast cache across the capture boundary
        self.autocast_cache = True
        # --compile: the steps' forward-and-loss pieces under torch.compile (None: eager)
        self.compiled = None
        if compile_mode is not None:
            from .compile import CompiledPieces

            self.compiled = CompiledPieces(self, compile_mode)

    # -- helpers ---------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            opt.set_lr(lr)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype, cache_enabled=self.autocast_cache)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, j: int) -> None:
        opt = self.optimizers[j]
        if self.scaler is not None:
            self.scaler.step(opt)  # skips the step on inf/nan gradients, by design
        else:
            if self.stats is not None:
                self.stats.add_grad_check(j, [p.grad for g in opt.param_groups for p in g["params"]
                                              if p.grad is not None])
            opt.step()
        opt.zero_grad(set_to_none=True)

    def _end_step(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def local_loss(self, j: int, h: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None) -> torch.Tensor:
        """The local loss of module j < J-1 on its output ``h``."""
        out = self.net.heads[j](h)
        if self.loss_spec.kind == "ce":
            return F.cross_entropy(upcast(out), y)
        lam_rec, lam_task = self.loss_spec.lambdas[j]
        task = supcon_loss(out, y) if self.loss_spec.infopro_contrast else F.cross_entropy(upcast(out), y)
        rec = reconstruction_loss(self.net.decoders[j].logits(h), image01)
        return lam_rec * rec + lam_task * task

    # -- the three step kinds --------------------------------------------------------------------
    def local_step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats,
                   image01: torch.Tensor | None = None) -> None:
        net, n = self.net, x.shape[0]
        h = x
        if self.compiled is not None:
            self.compiled.begin_step()
        for j in range(self.J):
            with self.autocast():
                if self.compiled is not None:
                    # module j's forward and local loss as one compiled graph; its output comes back
                    # detached (the last module's: the logits)
                    h, loss = self.compiled.local[j](h, y, image01)
                    logits = h
                elif j < self.J - 1:
                    h = net.blocks[j](h.detach())
                    loss = self.local_loss(j, h, y, image01)
                else:
                    logits = net.classifier(net.blocks[j](h.detach()))
                    loss = F.cross_entropy(upcast(logits), y)
            self.stats = stats
            self._backward(loss)
            self._step(j)
            stats.add(j, loss, n)
            del loss
        self._end_step()
        stats.add_correct(logits, y)
        stats.end_step(n)

    def global_step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats) -> None:
        net, n = self.net, x.shape[0]
        units = net.units
        # unit index -> aux head fed by that unit's output (the cut after module j)
        head_at = {b - 1: j for j, (a, b) in enumerate(net.ranges[:-1])} if len(net.heads) else {}
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
                j = head_at[u]
                # eq. 4: the head learns from its local loss on detached features only; its graph
                # is released right here instead of living until the final backward.
                with self.autocast():
                    if self.compiled is not None:
                        aux_loss = self.compiled.aux[j](feat, y)
                    else:
                        aux_loss = self.local_loss(j, feat.detach(), y, None)
                self._backward(aux_loss)
                stats.add(j, aux_loss, n)
                del aux_loss
            del tapped, inner
        with self.autocast():
            if self.compiled is not None:
                logits, loss = self.compiled.final(h, y)
            else:
                logits = net.classifier(h)
                loss = F.cross_entropy(upcast(logits), y)
        self._backward(loss)  # eq. 3: the backbone learns from the final loss only
        self.stats = stats
        for j in range(self.J):
            self._step(j)
        self._end_step()
        stats.add(self.J - 1, loss, n)
        stats.add_correct(logits, y)
        stats.end_step(n)

    def bp_step(self, x: torch.Tensor, y: torch.Tensor, stats: StepStats) -> None:
        self.global_step(x, y, stats)

    def train_step(self, phase: str, x: torch.Tensor, y: torch.Tensor, stats: StepStats,
                   image01: torch.Tensor | None = None) -> None:
        if phase == "local":
            self.local_step(x, y, stats, image01)
        else:
            self.global_step(x, y, stats)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches, eval_heads: bool = True) -> dict:
        """Test accuracy of the full network, and of every aux head that outputs class logits."""
        net = self.net
        was_training = net.training
        net.eval()
        correct = torch.zeros((), dtype=torch.int64, device=next(net.parameters()).device)
        # contrastive InfoPro heads output features, not class logits: nothing to score
        head_logits = eval_heads and not (self.loss_spec.kind == "infopro" and self.loss_spec.infopro_contrast)
        n_heads = len(net.heads) if head_logits else 0
        head_correct = torch.zeros(max(n_heads, 1), dtype=torch.int64, device=correct.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=correct.device)
        total = 0
        for x, y in batches:
            with self.autocast():
                h = x
                for j in range(self.J):
                    h = net.blocks[j](h)
                    if j < n_heads:
                        head_correct[j] += (net.heads[j](h).argmax(1) == y).sum()
                logits = net.classifier(h)
            loss_sum += F.cross_entropy(upcast(logits), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            total += y.shape[0]
        net.train(was_training)
        total = max(total, 1)
        return {
            "test_acc": correct.item() / total,
            "test_loss": loss_sum.item() / total,
            "head_acc": [c / total for c in head_correct[:n_heads].tolist()] if n_heads else None,
        }
