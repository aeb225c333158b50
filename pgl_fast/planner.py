"""Memory planner: which checkpoint segments a run's global steps use, and the predicted peak of
every phase.

Candidates for the global step (``bp`` and PGL's global epochs):

- ``none``: plain autograd, fastest, full end-to-end activation memory;
- ``modules``: one checkpoint segment per local module (boundary tensors stored at the cuts);
- ``units``: one segment per unit (finer: more stored boundaries, the smallest recompute window);
- ``coarse``: about sqrt(units) segments of consecutive units, cut so that each holds a similar
  share of activation bytes (fewer stored boundaries, larger recompute windows).

Every checkpointed candidate recomputes the forward once, so they cost about the same time; the
planner prefers ``none`` when it fits the budget and otherwise the candidate with the smallest
predicted global peak.

Predictions are measurements, not a formula: each candidate's step (and the local step) is run once
on the CPU at a small batch under the tensor tracker of ``pgl_fast.profile``, which records after
every op the live bytes that do not depend on the batch (parameters, buffers, gradients, optimizer
state) and those that do (inputs, activations, backward temporaries). The peak at the real batch is
the maximum over that timeline of ``static + activations * batch / small_batch`` -- exact wherever
tensor sizes are linear in the batch; ``tests/test_planner.py`` checks it against a direct
measurement at the target batch.
"""
from __future__ import annotations

import math

from .models import unit_shapes

CANDIDATES = ("none", "modules", "units", "coarse")
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


def _timeline(kind: str, segments_name: str | None, batch: int, **kw) -> list[tuple[int, int]]:
    """(batch-independent bytes, batch-proportional bytes) live after every op of one step."""
    from .profile import TensorMemoryTracker, build_step

    class Timeline(TensorMemoryTracker):
        def _update_peak(self, op=None) -> None:
            super()._update_peak(op)
            static = sum(self.current[c] for c in STATIC)
            self.points.append((static, self.total - static))

    setup = build_step(kind, batch=batch, device="cpu", head_kernels="eager", **kw)
    if segments_name is not None:
        setup.executor.segments = candidate_segments(segments_name, setup.net, kw["arch"], kw["image_size"])
    setup.warm_up(min(batch, 2))
    tracker = Timeline(modules=[setup.net], optimizers=setup.executor.optimizers, inputs=[setup.x, setup.y],
                       device="cpu")
    tracker.points = []
    with tracker:
        tracker.points.clear()
        setup.run()
    return tracker.points


def peak_at(points: list[tuple[int, int]], measured_batch: int, batch: int) -> int:
    """The peak at ``batch``: activations scale with the batch, the rest does not. Exact for every
    op whose tensors are linear in the batch (all of them but InfoPro's B x B SupCon matrix)."""
    return int(max(st + sc * batch / measured_batch for st, sc in points))


def predict(*, method: str, arch: str, J: int, aux: str, batch: int, dtype: str = "fp32", image_size: int = 32,
            split: str = "auto", num_classes: int = 10, candidates=CANDIDATES, measure_batch: int = 8,
            lean_blocks: bool = False) -> dict:
    """Predicted peak bytes per phase at ``batch``: ``local`` (for local methods) and ``global``
    under every checkpoint candidate."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory does not depend on threads; small steps are faster on one
    try:
        kw = dict(arch=arch, J=J, aux=None if method == "bp" else aux, dtype=dtype, image_size=image_size,
                  split=split, num_classes=num_classes, lean_blocks=lean_blocks)

        def extrapolate(kind, seg):
            return peak_at(_timeline(kind, seg, measure_batch, **kw), measure_batch, batch)

        gkind = "bp" if method == "bp" else "global"
        out = {"batch": batch, "global": {c: extrapolate(gkind, c) for c in candidates}}
        out["local"] = extrapolate("local", None) if method != "bp" else None
        return out
    finally:
        torch.set_num_threads(threads)


def choose(prediction: dict, budget_mib: float | None) -> tuple[str, str]:
    """(candidate, reason). Without a budget: the smallest predicted global peak."""
    g = prediction["global"]
    if budget_mib is None:
        best = min(g, key=g.get)
        return best, f"smallest predicted global-step peak ({g[best] / MiB:.0f} MiB)"
    budget = budget_mib * MiB
    if prediction.get("local") is not None and prediction["local"] > budget:
        raise PlanError(f"--memory-budget {budget_mib:g} MiB: even the local steps need "
                        f"{prediction['local'] / MiB:.0f} MiB (predicted); lower the batch size or raise the budget")
    if "none" in g and g["none"] <= budget:
        return "none", f"no checkpointing fits ({g['none'] / MiB:.0f} <= {budget_mib:g} MiB)"
    fitting = {c: v for c, v in g.items() if v <= budget}
    if not fitting:
        best = min(g, key=g.get)
        raise PlanError(f"--memory-budget {budget_mib:g} MiB: the smallest predicted global-step peak is "
                        f"{g[best] / MiB:.0f} MiB ({best} checkpointing); lower the batch size or raise the budget")
    best = min(fitting, key=fitting.get)
    return best, f"{best} checkpointing fits ({fitting[best] / MiB:.0f} <= {budget_mib:g} MiB)"


class PlanError(ValueError):
    pass


def format_plan(prediction: dict, chosen: str | None = None) -> str:
    lines = [f"memory plan (predicted peak tracked bytes at batch {prediction['batch']}, CPU tensor tracker, "
             f"excluding the data set and allocator slack):"]
    if prediction.get("local") is not None:
        lines.append(f"  local steps                     {prediction['local'] / MiB:9.1f} MiB")
    for c, v in prediction["global"].items():
        mark = "  <- chosen" if c == chosen else ""
        lines.append(f"  global steps, checkpoint {c:<8} {v / MiB:9.1f} MiB{mark}")
    return "\n".join(lines)
