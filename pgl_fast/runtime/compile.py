"""``--compile``: the training steps' pieces under ``torch.compile`` (Inductor).

The learner keeps its own loop -- per-module backward, the per-module SGD step, the device-side
statistics -- and compiles only what runs between two backward passes:

- **local step**: one compiled callable per module: its forward on the *detached* input and its
  local loss (aux head, or the classifier and the final cross-entropy for the last module),
  returning the detached output the next module (or the statistics) needs and the loss;
- **global step**: one per checkpoint segment (or per module when the global step is not
  checkpointed), one per aux-head loss on detached features, and one for the classifier and final
  loss. Under ``--checkpoint-global`` the compiled segment *contains* the non-reentrant
  ``torch.utils.checkpoint`` call: Dynamo turns it into a region that the partitioner recomputes in
  the backward, and batch-norm buffer updates, functionalised in the forward graph, happen exactly
  once (the eager path needs ``core.learner.frozen_bn_stats`` for that; here the recomputation has no side
  effects at all).

What is compiled are closures over the modules, never the modules themselves, so parameter and
buffer names carry no ``_orig_mod.`` prefix: state dicts, optimizers and checkpoints are the same
objects as in an eager run, and a run can switch between eager and compiled on resume.

Compiled variants. Every callable is compiled with ``dynamic=False``, so each distinct input shape is
its own graph: the last partial batch of an epoch adds one compile per piece, once per run (a bounded
two variants per piece; resumes within a process reuse them). Closures of one kind share their code
object, and Dynamo's guards let modules of identical structure (e.g. the BasicBlocks of one stage)
share one compiled graph, so compile time grows with the number of distinct module structures, not
with J. Dynamo caps the variants per code object (8 by default) and beyond it runs the function
eagerly with only a logged warning; the cap is raised to what this network needs and hitting it is
made an error, so a run never falls back to eager unnoticed. Switching between PGL's local and global phases compiles nothing new once both
have run.

Modes: ``default``, ``max-autotune-no-cudagraphs`` (Inductor's autotuned kernels; composes with
``--cuda-graphs``, which captures the whole local step including the compiled pieces), and
``reduce-overhead`` / ``max-autotune``, which capture CUDA graphs themselves (CUDAGraph Trees; each
training step is marked as a new step) and so are refused together with ``--cuda-graphs``. The fused
Triton head kernels are not traced by Dynamo: with ``--compile`` the heads are plain PyTorch and
Inductor generates their fused kernels. Evaluation stays eager.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.heads import upcast

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# modes whose Inductor backend captures CUDA graphs itself (CUDAGraph Trees)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# distinct batch shapes a piece sees in a run: the full batch and the last partial one
_SHAPES_PER_PIECE = 2


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process so far (all pieces, all variants)."""
    from torch._dynamo.utils import counters  # Dynamo loads on first use: a run that never compiles skips it

    return int(counters["stats"]["unique_graphs"])


def _raise_recompile_limit(needed: int) -> None:
    """Make room for ``needed`` variants per code object, and make overflowing it an error instead
    of Dynamo's silent fall-back to eager. Process-wide Dynamo settings: only ever raised."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < needed:
        setattr(cfg, name, needed)
    fail = "fail_on_recompile_limit_hit" if hasattr(cfg, "fail_on_recompile_limit_hit") else "fail_on_cache_limit_hit"
    if hasattr(cfg, fail):
        setattr(cfg, fail, True)


# -- the pieces, as plain functions of modules (what gets compiled) --------------------------------
def _local_ce_piece(block: nn.Module, head: nn.Module):
    def local_piece(x, y, image01):
        h = block(x.detach())
        return h.detach(), F.cross_entropy(upcast(head(h)), y)

    return local_piece


def _local_loss_piece(exe, j: int):
    # the method's own loss (InfoPro: per-module lambdas, decoder), traced as is
    def local_loss_piece(x, y, image01):
        h = exe.model.blocks[j](x.detach())
        return h.detach(), exe.local_loss(j, h, y, image01)

    return local_loss_piece


def _local_final_piece(block: nn.Module, classifier: nn.Module):
    def local_final_piece(x, y, image01):
        logits = classifier(block(x.detach()))
        return logits.detach(), F.cross_entropy(upcast(logits), y)

    return local_final_piece


def _segment_piece(units: list[nn.Module], taps: tuple[int, ...], checkpointed: bool, has_dropout: bool):
    def run(inp):
        tapped = []
        for i, u in enumerate(units):
            inp = u(inp)
            if i in taps:
                tapped.append(inp)
        return (inp, *tapped)

    if not checkpointed:
        return run

    def checkpointed_segment(inp):
        return checkpoint(run, inp, use_reentrant=False, preserve_rng_state=has_dropout)

    return checkpointed_segment


def _aux_ce_piece(head: nn.Module):
    def aux_piece(feat, y, image01=None):
        return F.cross_entropy(upcast(head(feat.detach())), y)

    return aux_piece


def _aux_loss_piece(exe, j: int):
    def aux_loss_piece(feat, y, image01=None):
        return exe.local_loss(j, feat.detach(), y, image01)

    return aux_loss_piece


def _final_piece(classifier: nn.Module):
    def final_piece(h, y):
        logits = classifier(h)
        return logits.detach(), F.cross_entropy(upcast(logits), y)

    return final_piece


class CompiledPieces:
    """The compiled callables a ``LocalLearner`` calls instead of its eager forward code.

    ``local[j](x, y, image01) -> (output.detach(), loss)``: module j's forward on ``x.detach()`` and
    its local loss (output = features for j < J-1, logits for the last module).
    ``segment(a, b, h, taps) -> (h, [tapped outputs])``, ``aux[j](feat, y) -> loss``,
    ``final(h, y) -> (logits.detach(), loss)``: the global step's pieces.
    """

    def __init__(self, exe, mode: str):
        if mode not in COMPILE_MODES:
            raise ValueError(f"--compile-mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.uses_cudagraphs = mode in CUDAGRAPH_MODES
        self._options = dict(dynamic=False, mode=None if mode == "default" else mode)
        net = exe.model
        self.net = net
        J = net.J
        ce = exe.method.local_loss_is_ce
        local = []
        for j in range(J):
            if j == J - 1:
                fn = _local_final_piece(net.blocks[j], net.classifier)
            elif j >= len(net.heads):
                # a headless module (end-to-end training) takes no local step: nothing to compile
                local.append(None)
                continue
            elif ce:
                fn = _local_ce_piece(net.blocks[j], net.heads[j])
            else:
                fn = _local_loss_piece(exe, j)
            local.append(self._compile(fn))
        self.local = local
        self.aux = [self._compile(_aux_ce_piece(h) if ce else _aux_loss_piece(exe, j)) for j, h in enumerate(net.heads)]
        self.final = self._compile(_final_piece(net.classifier))
        self._segments: dict[tuple, object] = {}
        # per code object: every module or segment may have its own structure, times the batch shapes,
        # with room for a few more variants (another dtype or layout) in a long-lived process
        n_segments = len(exe.segments) if exe.segments is not None else J
        _raise_recompile_limit(_SHAPES_PER_PIECE * max(J, n_segments) + 8)

    def _compile(self, fn):
        return torch.compile(fn, **self._options)

    def begin_step(self) -> None:
        """CUDAGraph Trees reuse a step's output memory in the next step: mark where one begins."""
        if self.uses_cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def segment(self, a: int, b: int, h: torch.Tensor, taps: tuple[int, ...], checkpointed: bool):
        """Units a..b-1 on ``h``: (output, outputs of the units at relative indices ``taps``)."""
        key = (a, b, taps, checkpointed)
        fn = self._segments.get(key)
        if fn is None:
            units = list(self.net.units[a:b])
            has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for u in units for m in u.modules())
            fn = self._segments[key] = self._compile(_segment_piece(units, taps, checkpointed, has_dropout))
        outs = fn(h)
        return outs[0], list(outs[1:])
