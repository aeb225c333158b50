"""Memory planner: which checkpoint segments a run's global steps use, and the predicted peak of
every phase.

Candidates for the global step (``bp`` and PGL's global epochs):

- ``none``: plain autograd, fastest, full end-to-end activation memory;
- ``modules``: one checkpoint segment per local module (boundary tensors stored at the cuts);
- ``units``: one segment per unit (finer: more stored boundaries, the smallest recompute window);
- ``coarse``: about sqrt(units) segments of consecutive units, cut so that each holds a similar
  share of activation bytes (fewer stored boundaries, larger recompute windows).

Every checkpointed candidate recomputes the forward once; they differ only in the per-segment
overhead of checkpointing, so in time ``none`` < ``coarse`` < ``modules`` <= ``units``
(``COST_ORDER``; ``modules`` and ``units`` coincide where every module is one unit). On a CPU
(resnet32, J=16, one PGL global step, candidates interleaved) ``coarse`` took 1.13x the time of
``none``, ``modules`` and ``units`` 1.18-1.21x; unmeasured on a GPU. Whatever the limit -- a budget
in MiB, or ``factor`` times the predicted local-step peak -- the planner takes the cheapest
candidate in that order whose predicted peak fits.

Predictions are measurements, not a formula: each candidate's step (and the local step) is run once
on the CPU at a small batch under the tensor tracker of ``pgl_fast.profile``, which records after
every op the live bytes that do not depend on the batch (parameters, buffers, gradients, optimizer
state) and those that do (inputs, activations, backward temporaries). The peak at the real batch is
the maximum over that timeline of ``static + activations * batch / small_batch`` -- exact wherever
tensor sizes are linear in the batch; ``tests/test_planner.py`` checks it against a direct
measurement at the target batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from .models import unit_shapes

CANDIDATES = ("none", "modules", "units", "coarse")
# fastest first: ties in predicted memory go to the earlier one
COST_ORDER = ("none", "coarse", "modules", "units")
# --global-memory auto keeps PGL's global steps within this factor of the predicted local-step peak.
# Predicted for resnet32 with 1c2f heads: at J=4 coarse comes to 0.97x the local peak, at J=8 modules
# to 1.13x (coarse 1.42x), at J=16 the smallest is modules at 1.62x. 1.25 takes the segmentation that
# gets near the local peak wherever one does, and refuses a faster one that gives back much of the
# saving (coarse at J=8); where nothing fits, the smallest runs.
DEFAULT_FACTOR = 1.25
MiB = 2**20


def coarse_segments(arch: str, image_size: int, n_units: int) -> list[tuple[int, int]]:
    """~sqrt(n) segments with similar activation bytes (unit output size as the proxy)."""
    sizes = [c * s * s for c, s in unit_shapes(arch, image_size)]
    k = max(1, round(math.sqrt(n_units)))
    target = sum(sizes) / k
    segs, start, acc = [], 0, 0.0
    for u, sz in enumerate(sizes):
        acc += sz
        if acc >= target and len(segs) < k - 1 and u < n_units - 1:
            segs.append((start, u + 1))
            start, acc = u + 1, 0.0
    segs.append((start, n_units))
    return segs


def candidate_segments(name: str, net, arch: str, image_size: int):
    n = len(net.units)
    if name == "none":
        return None
    if name == "modules":
        return list(net.ranges)
    if name == "units":
        return [(u, u + 1) for u in range(n)]
    if name == "coarse":
        return coarse_segments(arch, image_size, n)
    raise ValueError(f"unknown checkpoint plan {name!r}; choose from {', '.join(CANDIDATES)}")


STATIC = ("params", "buffers", "grads", "opt_state", "opt_temps")


def _timelines(kind: str, segment_names, batch: int, **kw) -> dict:
    """For each name in ``segment_names`` (None: the executor's own segments), the (batch-independent
    bytes, batch-proportional bytes) live after every op of one step. One network serves every
    candidate: memory depends on the shapes and the segments, not on the weights' values."""
    from .profile import TensorMemoryTracker, build_step

    class Timeline(TensorMemoryTracker):
        def _update_peak(self, op=None) -> None:
            super()._update_peak(op)
            static = sum(self.current[c] for c in STATIC)
            self.points.append((static, self.total - static))

    setup = build_step(kind, batch=batch, device="cpu", head_kernels="eager", **kw)
    setup.warm_up(min(batch, 2))  # the optimizer state exists in the steady state
    out = {}
    for name in segment_names:
        if name is not None:
            setup.executor.segments = candidate_segments(name, setup.net, kw["arch"], kw["image_size"])
        tracker = Timeline(modules=[setup.net], optimizers=setup.executor.optimizers, inputs=[setup.x, setup.y],
                           device="cpu")
        tracker.points = []
        with tracker:
            tracker.points.clear()
            setup.run()
        out[name] = tracker.points
    return out


def peak_at(points: list[tuple[int, int]], measured_batch: int, batch: int) -> int:
    """The peak at ``batch``: activations scale with the batch, the rest does not. Exact for every
    op whose tensors are linear in the batch (all of them but InfoPro's B x B SupCon matrix)."""
    return int(max(st + sc * batch / measured_batch for st, sc in points))


# predictions already measured in this process: they depend on nothing but predict()'s arguments
# (seeded network, fixed batch, deterministic byte counts), and a process that trains many small
# runs (tests, grids in one interpreter) should measure each configuration once
_CACHE: dict[tuple, dict] = {}


def predict(*, method: str, arch: str, J: int, aux: str, batch: int, dtype: str = "fp32", image_size: int = 32,
            split: str = "auto", num_classes: int = 10, candidates=CANDIDATES, measure_batch: int = 8,
            lean_blocks: bool = False, local: bool = True) -> dict:
    """Predicted peak bytes per phase at ``batch``: ``local`` (for local methods, unless
    ``local=False``) and ``global`` under every checkpoint candidate in ``candidates``."""
    import torch

    candidates = tuple(candidates)
    key = (method, arch, J, aux, batch, dtype, image_size, split, num_classes, candidates, measure_batch,
           lean_blocks, local)
    if key in _CACHE:
        return copy.deepcopy(_CACHE[key])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory does not depend on threads; small steps are faster on one
    try:
        kw = dict(arch=arch, J=J, aux=None if method == "bp" else aux, dtype=dtype, image_size=image_size,
                  split=split, num_classes=num_classes, lean_blocks=lean_blocks)
        gkind = "bp" if method == "bp" else "global"
        out = {"batch": batch, "global": {}, "local": None}
        if candidates:
            lines = _timelines(gkind, candidates, measure_batch, **kw)
            out["global"] = {c: peak_at(lines[c], measure_batch, batch) for c in candidates}
        if method != "bp" and local:
            out["local"] = peak_at(_timelines("local", (None,), measure_batch, **kw)[None], measure_batch, batch)
    finally:
        torch.set_num_threads(threads)
    _CACHE[key] = copy.deepcopy(out)
    return out


class PlanError(ValueError):
    pass


def by_cost(names) -> list[str]:
    """``names`` fastest first."""
    return sorted(names, key=COST_ORDER.index)


def check_local(prediction: dict, budget_mib: float) -> None:
    """PlanError where the local steps alone exceed the budget."""
    local = prediction.get("local")
    if local is not None and local > budget_mib * MiB:
        raise PlanError(f"--memory-budget {budget_mib:g} MiB: even the local steps need "
                        f"{local / MiB:.0f} MiB (predicted); lower the batch size or raise the budget")


def smallest(g: dict) -> str:
    """The candidate with the smallest predicted peak; ties go to the faster one."""
    return min(by_cost(g), key=g.get)


def choose(prediction: dict, budget_mib: float | None = None, *, factor: float | None = None) -> tuple[str, str]:
    """(candidate, reason) among the candidates in ``prediction["global"]``.

    - ``budget_mib``: the fastest candidate (``COST_ORDER``) whose predicted peak fits the budget;
      a budget that even the local steps (or every candidate) exceed is a ``PlanError``.
    - ``factor``: the fastest candidate within ``factor`` x the predicted local-step peak; where
      none is, the one with the smallest predicted peak.
    - neither: the smallest predicted peak.
    """
    g = prediction["global"]
    local = prediction.get("local")
    if budget_mib is not None:
        budget = budget_mib * MiB
        check_local(prediction, budget_mib)
        fitting = [c for c in by_cost(g) if g[c] <= budget]
        if not fitting:
            best = smallest(g)
            raise PlanError(f"--memory-budget {budget_mib:g} MiB: the smallest predicted global-step peak is "
                            f"{g[best] / MiB:.0f} MiB ({best} checkpointing); lower the batch size or raise the budget")
        best = fitting[0]
        return best, (f"the fastest that fits the budget ({g[best] / MiB:.1f} <= {budget_mib:g} MiB)"
                      if len(g) > 1 else f"fits the budget ({g[best] / MiB:.1f} <= {budget_mib:g} MiB)")
    if factor is not None:
        if local is None:
            raise ValueError("choose(factor=...) needs the predicted local-step peak")
        limit = factor * local
        fitting = [c for c in by_cost(g) if g[c] <= limit]
        if fitting:
            best = fitting[0]
            return best, (f"the fastest within {factor:g}x the local-step peak "
                          f"({g[best] / MiB:.1f} <= {factor:g} x {local / MiB:.1f} MiB)")
        best = smallest(g)
        return best, (f"nothing fits within {factor:g}x the local-step peak ({factor:g} x {local / MiB:.1f} MiB): "
                      f"the smallest predicted peak, {g[best] / local:.2f}x")
    best = smallest(g)
    return best, f"smallest predicted global-step peak ({g[best] / MiB:.0f} MiB)"


@dataclass
class MemoryPlan:
    """The global-step checkpointing a run executes, and why: what ``--plan`` prints, what the
    executor runs and what ``header.json`` records are all this one object."""

    choice: str                                   # one of CANDIDATES
    segments: list[tuple[int, int]] | None        # unit ranges checkpointed in global steps; None: none
    selected_by: str                              # the flags that made the choice
    reason: str
    prediction: dict | None = None                # predict()'s output, where measured
    factor: float | None = None
    budget_mib: float | None = None
    global_steps: bool = True                     # False: the run has no global step to plan
    alternatives: dict[str, str] = field(default_factory=dict)  # candidate -> flags that select it

    def text(self) -> str:
        lines = []
        if self.prediction is not None:
            p = self.prediction
            lines.append(f"memory plan (predicted peak tracked bytes at batch {p['batch']}, CPU tensor tracker, "
                         f"excluding the data set and allocator slack):")
            local = p.get("local")
            if local is not None:
                lines.append(f"  local steps                     {local / MiB:9.1f} MiB")
            for c in by_cost(p["global"]):
                v = p["global"][c]
                rel = f" ({v / local:.2f}x local)" if local else ""
                if not self.global_steps:
                    mark = ""
                elif c == self.choice:
                    mark = "  <- will run"
                else:
                    mark = f"  select: {self.alternatives[c]}" if c in self.alternatives else ""
                lines.append(f"  global steps, checkpoint {c:<8} {v / MiB:9.1f} MiB{rel}{mark}")
        if not self.global_steps:
            lines.append(f"global steps: none in this run ({self.reason})")
            return "\n".join(lines)
        n = f", {len(self.segments)} segments" if self.segments is not None else ""
        lines.append(f"global steps: checkpoint {self.choice}{n} (by {self.selected_by}): {self.reason}")
        if self.prediction is None:
            others = "; ".join(f"{c}: {f}" for c, f in self.alternatives.items())
            lines.append(f"  others: {others}; --plan prints every candidate's predicted peak")
        return "\n".join(lines)

    def record(self) -> dict:
        """The plan as header.json records it (bytes in MiB)."""
        pred = None
        if self.prediction is not None:
            p = self.prediction
            pred = {"batch": p["batch"], "local_mib": None if p.get("local") is None else p["local"] / MiB,
                    "global_mib": {c: v / MiB for c, v in p["global"].items()}}
        return {"choice": self.choice, "segments": self.segments, "selected_by": self.selected_by,
                "reason": self.reason, "factor": self.factor, "budget_mib": self.budget_mib,
                "global_steps": self.global_steps, "predicted": pred, "alternatives": self.alternatives,
                "text": self.text()}

