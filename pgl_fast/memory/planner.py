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
on the CPU at a small batch under the tensor tracker of ``pgl_fast.memory.profile``, which records after
every op the live bytes that do not depend on the batch (parameters, buffers, gradients, optimizer
state) and those that do (inputs, activations, backward temporaries). The peak at the real batch is
the maximum over that timeline of ``static + activations * batch / small_batch`` -- exact wherever
tensor sizes are linear in the batch; ``tests/memory/test_planner.py`` checks it against a direct
measurement at the target batch.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch

from ..config.build import StepFactory, method_of, step_factory
from ..core.schedule import GLOBAL, LOCAL
from ..errors import UserError
from .profile import TensorMemoryTracker, flags_factory, setup_step

CANDIDATES = ("none", "modules", "units", "coarse")
# fastest first: ties in predicted memory go to the earlier one
COST_ORDER = ("none", "coarse", "modules", "units")
MiB = 2**20


def coarse_segments(net) -> list[tuple[int, int]]:
    """~sqrt(n) segments with similar activation bytes (unit output size as the proxy)."""
    sizes = [math.prod(shape) for shape in net.unit_out_shapes]
    n_units = len(sizes)
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


def candidate_segments(name: str, net):
    n = len(net.units)
    if name == "none":
        return None
    if name == "modules":
        return list(net.ranges)
    if name == "units":
        return [(u, u + 1) for u in range(n)]
    if name == "coarse":
        return coarse_segments(net)
    raise ValueError(f"unknown checkpoint plan {name!r}; choose from {', '.join(CANDIDATES)}")


STATIC = ("params", "buffers", "grads", "opt_state", "opt_temps")


def _timelines(kind: str, segment_names, batch: int, factory: StepFactory, dtype: str = "fp32") -> dict:
    """For each name in ``segment_names`` (None: the executor's own segments), the (batch-independent
    bytes, batch-proportional bytes) live after every op of one step of ``factory``'s run. One
    network serves every candidate: memory depends on the shapes and the segments, not on the
    weights' values."""
    class Timeline(TensorMemoryTracker):
        def _update_peak(self, op=None) -> None:
            super()._update_peak(op)
            static = sum(self.current[c] for c in STATIC)
            self.points.append((static, self.total - static))

    setup = setup_step(kind, factory, batch=batch, dtype=dtype, device=torch.device("cpu"), head_kernels="eager")
    setup.warm_up(min(batch, 2))  # the optimizer state exists in the steady state
    out = {}
    for name in segment_names:
        if name is not None:
            setup.executor.segments = candidate_segments(name, setup.net)
        tracker = Timeline(modules=[setup.net], optimizers=setup.executor.optimizers, inputs=setup.inputs,
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
# (seeded network, fixed batch, deterministic byte counts; the factory by its key), and a process that trains many small
# runs (tests, grids in one interpreter) should measure each configuration once
_CACHE: dict[tuple, dict] = {}


def predict(*, batch: int, factory: StepFactory | None = None, dtype: str = "fp32", candidates=CANDIDATES,
            measure_batch: int = 8, local: bool = True, method: str | None = None, **network) -> dict:
    """Predicted peak bytes per phase at ``batch`` of the run whose steps ``factory`` builds
    (:func:`~pgl_fast.config.build.step_factory` of its config): ``local`` (for local methods, unless
    ``local=False``) and ``global`` under every checkpoint candidate in ``candidates``. The steps
    measured are PGL's over the run's local objective (``bp``'s for bp): ``infopro`` measures
    InfoPro's decoders, ``man`` MAN's copies on the aux path, ``hpff`` HPFF's second heads, patch
    decoders and its local step, which keeps two modules' graphs alive.

    Without ``factory``, the steps are those of :func:`~pgl_fast.memory.profile.build_step`'s keywords
    ``network`` (``arch``, ``J``, ``aux``, ``split``, ``image_size``, ``num_classes``,
    ``lean_blocks``, ``model``, ``cuts``, ``cifar_stem``, ``pgl_local``, ``local_options``), and
    ``method`` only tells ``bp`` from local learning."""
    if factory is None:
        if method is None:
            raise TypeError("predict() needs factory=, or method= and the network's keywords")
        network["local_options"] = dict(network.get("local_options", ()))
        factory = flags_factory(**network)
        if method == "bp":
            factory = dataclasses.replace(factory, method=dataclasses.replace(factory.method, method="bp"))
    elif method is not None or network:
        raise TypeError(f"predict(factory=...) takes no network keywords, got {sorted(network) or ['method']}")
    candidates = tuple(candidates)
    key = (factory.key, batch, dtype, candidates, measure_batch, local)
    if key in _CACHE:
        return copy.deepcopy(_CACHE[key])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory does not depend on threads; small steps are faster on one
    try:
        gkind = "bp" if factory.bp else "global"
        out = {"batch": batch, "global": {}, "local": None}
        if candidates:
            lines = _timelines(gkind, candidates, measure_batch, factory, dtype)
            out["global"] = {c: peak_at(lines[c], measure_batch, batch) for c in candidates}
        if not factory.bp and local:
            out["local"] = peak_at(_timelines("local", (None,), measure_batch, factory, dtype)[None],
                                   measure_batch, batch)
    finally:
        torch.set_num_threads(threads)
    _CACHE[key] = copy.deepcopy(out)
    return out


def by_cost(names) -> list[str]:
    """``names`` fastest first."""
    return sorted(names, key=COST_ORDER.index)


def check_local(prediction: dict, budget_mib: float) -> None:
    """UserError where the local steps alone exceed the budget."""
    local = prediction.get("local")
    if local is not None and local > budget_mib * MiB:
        raise UserError(f"--memory-budget {budget_mib:g} MiB: even the local steps need "
                        f"{local / MiB:.0f} MiB (predicted); lower the batch size or raise the budget")


def smallest(g: dict) -> str:
    """The candidate with the smallest predicted peak; ties go to the faster one."""
    return min(by_cost(g), key=g.get)


def choose(prediction: dict, budget_mib: float | None = None, *, factor: float | None = None) -> tuple[str, str]:
    """(candidate, reason) among the candidates in ``prediction["global"]``.

    - ``budget_mib``: the fastest candidate (``COST_ORDER``) whose predicted peak fits the budget;
      a budget that even the local steps (or every candidate) exceed is a ``UserError``.
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
            raise UserError(f"--memory-budget {budget_mib:g} MiB: the smallest predicted global-step peak is "
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


def phase_predictions(cfg, plan: "MemoryPlan", image_size: int, num_classes: int) -> dict[str, float]:
    """{phase label as metrics record it: predicted peak MiB} for every phase this run has (``local``;
    ``global`` for PGL's global epochs, ``bp`` for backprop, under the plan's checkpointing), from
    the plan's own prediction where it has the numbers, else measured here (the same cached
    measurement: a fraction of a second for small networks, a few seconds for resnet32 J=16)."""
    method = method_of(cfg)
    phases = set(method.phases(cfg.epochs))
    need_local = LOCAL in phases
    need_global = GLOBAL in phases
    p = plan.prediction
    if p is None or (need_local and p.get("local") is None) or (need_global and plan.choice not in p["global"]):
        p = predict(factory=step_factory(cfg, num_classes, image_size), batch=cfg.batch_size,
                    dtype="bf16" if cfg.amp else "fp32", candidates=(plan.choice,) if need_global else (),
                    local=need_local)
    out = {}
    if need_local:
        out[LOCAL] = p["local"] / MiB
    if need_global:
        out[method.epoch_label(next(e for e in range(cfg.epochs) if method.phase(e) == GLOBAL))] = \
            p["global"][plan.choice] / MiB
    return out


def plan_run(cfg, net, image_size: int, num_classes: int) -> "MemoryPlan":
    """The global-step checkpointing of this run, resolved once: ``--plan`` prints this
    :class:`~pgl_fast.memory.planner.MemoryPlan`, the executor runs exactly its segments (None: no
    checkpointing) and ``header.json`` records it.

    The flags name the candidates -- ``--global-memory X`` or ``--checkpoint-global --global-segments
    X`` one of them (``--global-segments auto``: every checkpointed one), ``--global-memory auto`` all
    four -- and a rule picks among them: under ``--memory-budget`` the fastest that fits; else, for
    ``auto`` on PGL, the fastest within ``--global-memory-factor`` x the predicted local-step peak;
    else the smallest predicted peak. ``auto`` on ``bp`` is plain backprop. The planner measures
    only where the rule needs predictions, or for ``--plan``."""
    planner = sys.modules[__name__]
    budget = cfg.memory_budget
    fixed_why = "as asked"
    if cfg.global_memory != "auto":
        candidates, selected_by = (cfg.global_memory,), f"--global-memory {cfg.global_memory}"
    elif cfg.checkpoint_global:
        candidates = (("modules", "units", "coarse") if cfg.global_segments == "auto" else (cfg.global_segments,))
        selected_by = f"--checkpoint-global --global-segments {cfg.global_segments}"
    elif cfg.method == "bp" and budget is None:
        candidates, selected_by = ("none",), "--global-memory auto"
        fixed_why = "bp trains end to end: auto leaves it plain backprop, as fast as it gets"
    else:
        candidates, selected_by = planner.CANDIDATES, "--global-memory auto"
    rule = "budget" if budget is not None else (
        "fixed" if len(candidates) == 1 else "factor" if cfg.global_memory == "auto" and not cfg.checkpoint_global
        else "smallest")
    if budget is not None:
        selected_by += f" --memory-budget {budget:g}"
    has_global = method_of(cfg).has_phase(GLOBAL, cfg.epochs)
    if not has_global:
        # nothing to plan; a budget still has to hold for the local steps
        rule = "budget" if budget is not None else "fixed"
        candidates = (candidates[0],) if len(candidates) == 1 else ("none",)

    prediction = None
    if cfg.plan or rule != "fixed":
        measured = (planner.CANDIDATES if cfg.plan else candidates) if has_global else ()
        prediction = planner.predict(
            factory=step_factory(cfg, num_classes, image_size), batch=cfg.batch_size,
            # fp16 and bf16 tensors have the same size; the CPU planner measures fp16 as bf16
            dtype="bf16" if cfg.amp else "fp32", candidates=tuple(planner.by_cost(measured)))

    if not has_global:
        why = (f"--method {cfg.method} trains locally only" if cfg.method != "pgl" else
               f"-P {cfg.period} -Q {cfg.duration} over --epochs {cfg.epochs} reaches no global epoch")
        if budget is not None:
            planner.check_local(prediction, budget)
        choice = candidates[0]
        return planner.MemoryPlan(
            choice=choice, segments=planner.candidate_segments(choice, net),
            selected_by=selected_by, reason=why, prediction=prediction, budget_mib=budget, global_steps=False)

    if rule == "fixed":
        choice, why = candidates[0], fixed_why
    else:
        sub = dict(prediction, **{"global": {c: prediction["global"][c] for c in candidates}})
        choice, why = planner.choose(sub, budget, factor=cfg.global_memory_factor if rule == "factor" else None)
    # the exact flags that would select each other candidate from this command
    alternatives = {}
    for c in planner.COST_ORDER:
        if c == choice:
            continue
        drop = (["--checkpoint-global"] if cfg.checkpoint_global else []) + (
            ["--memory-budget"] if budget is not None and (prediction is None or c not in prediction["global"]
                                                           or prediction["global"][c] > budget * planner.MiB) else [])
        alternatives[c] = f"--global-memory {c}" + (f" (without {' and '.join(drop)})" if drop else "")
    return planner.MemoryPlan(
        choice=choice, segments=planner.candidate_segments(choice, net),
        selected_by=selected_by, reason=why, prediction=prediction,
        factor=cfg.global_memory_factor if rule == "factor" else None, budget_mib=budget, alternatives=alternatives)
