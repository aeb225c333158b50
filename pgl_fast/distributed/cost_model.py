"""What ``--pipeline S`` can gain: a cost model from measured per-module times, activation sizes
and a link bandwidth.

    python -m pgl_fast.distributed.cost_model --batch 128 --bandwidth-gbs 25

Inputs:

- ``times[j]``: seconds of module j's share of a local step on one batch (its forward on the detached
  input, its aux head and local loss, their backward, its optimizer step), measured by
  :func:`measure_module_times` on the device at hand;
- ``act_bytes[j]``: bytes per sample of module j's output (what crosses a cut), from the shapes;
- a link: ``bandwidth`` (bytes/s) and a ``latency`` (s per message).

**Local epochs** (the stages never wait for a backward): stage r needs ``T_r = sum(times[j])`` over
its modules per batch, and the cut after it carries ``c_r = latency + batch * (act_bytes + 8 label
bytes) / bandwidth``. With communication overlapped with compute (``overlap=True``: DMA engines,
NCCL on its own stream) the steady-state period is ``P = max(max_r T_r, max_r c_r)``; without
(``overlap=False``: the CPU that computes also copies) ``P = max_r (c_{r-1} + T_r + c_r)``. An
epoch of N batches takes the first batch's trip through all stages plus ``(N-1) * P``, against
``N * sum(times)`` in one process. ``balance = sum(T) / (S * max T_r)`` is the bound that
imbalance alone sets (speedup <= S * balance); ``bubble`` is the idle share of the S devices,
``1 - speedup / S`` (fill and drain, imbalance and communication together).

**Global epochs** (GPipe with M micro-batches): each module's time splits into forward
``fwd_fraction * t`` and backward (default 1/3 : 2/3, the usual ratio for convolutions). A step
takes ``(M + S - 1)`` slots of the slowest stage's micro-batch forward plus backward, plus the
activations' and gradients' trips across the ``S - 1`` cuts; one process takes ``sum(times)``.
The bubble of a balanced pipeline is ``(S - 1) / (M + S - 1)``.

**PGL**: a run of P local and Q global epochs per cycle gains the time-weighted mix of the two.

The model ignores what it cannot know from these inputs: per-step overheads outside the modules (data
loading on stage 0, the metric reductions), memory-bandwidth contention between processes sharing a
device or a CPU, and kernel-efficiency changes with micro-batch size. :func:`check_against` compares
it with a measured pipeline run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from ..models.cifar_resnet import unit_shapes
from ..models.splits import resolve_split
from ..memory.profile import build_step
from .pipeline import balance_by_time

LABEL_BYTES = 8  # int64 label per sample travels with the activations


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def activation_bytes(arch: str, J: int, *, split: str = "auto", image_size: int = 32,
                     dtype_bytes: int = 4) -> list[int]:
    """Bytes per sample of every module's output (the last: the logits, which never travel)."""
    shapes = unit_shapes(arch, image_size)
    ranges = resolve_split(arch, J, split)
    return [shapes[b - 1][0] * shapes[b - 1][1] ** 2 * dtype_bytes for _, b in ranges]


def measure_module_times(arch: str = "resnet32", J: int = 16, *, batch: int = 128, aux: str = "1c2f",
                         steps: int = 3, device: str = "cpu", image_size: int = 32,
                         clock: str = "auto", split: str = "auto") -> list[float]:
    """Median seconds per module of a local step (forward, local loss, backward, optimizer step),
    on a fresh network built as a training run builds it; one warm-up step first.

    ``clock``: "wall", or "cpu" (this process's CPU seconds: on a CPU shared with other jobs it is
    what the module needs rather than what it got; exact for one intra-op thread, where the
    work runs on the calling thread). "auto": cpu on the CPU with one thread, else wall."""
    if clock == "auto":
        clock = "cpu" if device == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock not in ("wall", "cpu"):
        raise UserError(f"clock {clock!r} is not wall or cpu")
    now = time.process_time if clock == "cpu" else time.perf_counter
    setup = build_step("local", arch=arch, J=J, aux=aux, batch=batch, device=device, image_size=image_size,
                       split=split)
    learner, x, y = setup.executor, setup.x, setup.y
    cuda = setup.device.type == "cuda"
    per = [[] for _ in range(learner.J)]
    for step in range(steps + 1):
        h = x
        for j in range(learner.J):
            if cuda:
                torch.cuda.synchronize(setup.device)
            t0 = now()
            h = learner.local_module(j, h, y, None, x.shape[0])  # the local step's own piece
            if cuda:
                torch.cuda.synchronize(setup.device)
            if step > 0:
                per[j].append(now() - t0)
        learner.end_step()
    return [statistics.median(p) for p in per]


def measured_module_times(arch: str, J: int, *, batch: int, aux: str = "1c2f", split: str = "auto",
                          image_size: int = 32, group=None, src: int = 0) -> list[float]:
    """``--pipeline-balance auto``: rank ``src`` measures the seconds of every module's local step on
    its device (a fresh network, as :func:`measure_module_times`)
    and broadcasts them, so every rank balances by the same numbers."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    times = torch.zeros(J, dtype=torch.float64, device=device)
    if dist.get_rank() == src:
        times.copy_(torch.tensor(measure_module_times(arch, J, batch=batch, aux=aux, split=split,
                                                      device=str(device), image_size=image_size, steps=2)))
    dist.broadcast(times, src, group=group)
    return times.tolist()


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def _stage_sums(times, ranges):
    return [sum(times[a:b]) for a, b in ranges]


def _cut_seconds(act_bytes, ranges, samples, bandwidth, latency):
    """Seconds to send the output of each stage but the last, for ``samples`` samples."""
    return [latency + samples * (act_bytes[b - 1] + LABEL_BYTES) / bandwidth for _, b in ranges[:-1]]


def predict_local(times: Sequence[float], act_bytes: Sequence[int], ranges: Sequence[tuple[int, int]], *,
                  batch: int, n_batches: int, bandwidth: float, latency: float = 0.0,
                  overlap: bool = True) -> dict:
    """A local epoch of ``n_batches`` on ``len(ranges)`` stages (see the module docstring)."""
    S = len(ranges)
    T = _stage_sums(times, ranges)
    c = _cut_seconds(act_bytes, ranges, batch, bandwidth, latency)
    if overlap:
        period = max(max(T), max(c, default=0.0))
    else:
        period = max((c[r - 1] if r > 0 else 0.0) + T[r] + (c[r] if r < S - 1 else 0.0) for r in range(S))
    first_trip = sum(T) + sum(c)
    epoch = first_trip + (n_batches - 1) * period
    single = n_batches * sum(times)
    speedup = single / epoch if epoch > 0 else 1.0
    return {"stage_seconds": T, "cut_seconds": c, "period": period, "epoch_seconds": epoch,
            "single_seconds": single, "speedup": speedup, "balance": sum(T) / (S * max(T)) if max(T) > 0 else 1.0,
            "bubble": 1.0 - speedup / S, "comm_bound": max(c, default=0.0) > max(T)}


def predict_global(times: Sequence[float], act_bytes: Sequence[int], ranges: Sequence[tuple[int, int]], *,
                   batch: int, micro_batches: int, bandwidth: float, latency: float = 0.0,
                   fwd_fraction: float = 1 / 3) -> dict:
    """One GPipe global step on ``len(ranges)`` stages and ``micro_batches`` micro-batches."""
    S, M = len(ranges), micro_batches
    T = _stage_sums(times, ranges)
    slot = max(T) / M  # the slowest stage's forward + backward of one micro-batch
    c = _cut_seconds(act_bytes, ranges, batch / M, bandwidth, latency)
    # forward activations and backward gradients each cross every cut once on the critical path
    step = (M + S - 1) * slot + 2 * sum(c)
    single = sum(times)
    speedup = single / step if step > 0 else 1.0
    return {"stage_seconds": T, "step_seconds": step, "single_seconds": single, "speedup": speedup,
            "bubble": 1.0 - speedup / S, "balanced_bubble": (S - 1) / (M + S - 1),
            "fwd_fraction": fwd_fraction}


def predict_pgl(local: dict, glob: dict, *, period: int, duration: int, n_batches: int) -> float:
    """Speedup of a PGL run (P local epochs, then Q global ones) from the two phase predictions."""
    single = period * local["single_seconds"] + duration * n_batches * glob["single_seconds"]
    piped = period * local["epoch_seconds"] + duration * n_batches * glob["step_seconds"]
    return single / piped


def table_rows(times_by_config: dict[tuple[str, int], Sequence[float]], *, stages: Sequence[int] = (2, 4),
               batch: int = 128, n_batches: int = 391, bandwidth: float = 25e9, latency: float = 10e-6,
               micro_batches: int | None = None, dtype_bytes: int = 4, overlap: bool = True,
               period: int = 10, duration: int = 2) -> list[dict]:
    """One row per (arch, J, S): the time-balanced stages, their balance, the local-epoch speedup
    and bubble, the global-step speedup (GPipe, ``micro_batches`` or 4*S micro-batches) and the
    PGL run's speedup at P local : Q global epochs."""
    rows = []
    for (arch, J), times in times_by_config.items():
        acts = activation_bytes(arch, J, dtype_bytes=dtype_bytes)
        for S in stages:
            if S > J:
                continue
            ranges = balance_by_time(times, S)
            M = micro_batches or 4 * S
            loc = predict_local(times, acts, ranges, batch=batch, n_batches=n_batches, bandwidth=bandwidth,
                                latency=latency, overlap=overlap)
            glo = predict_global(times, acts, ranges, batch=batch, micro_batches=M, bandwidth=bandwidth,
                                 latency=latency)
            rows.append({
                "arch": arch, "J": J, "S": S,
                "stages": "/".join(str(b - a) for a, b in ranges),
                "balance": round(loc["balance"], 3),
                "local_speedup": round(loc["speedup"], 2),
                "local_bubble": round(loc["bubble"], 3),
                "comm_bound": loc["comm_bound"],
                "M": M,
                "global_speedup": round(glo["speedup"], 2),
                "global_bubble": round(glo["bubble"], 3),
                "pgl_speedup": round(predict_pgl(loc, glo, period=period, duration=duration, n_batches=n_batches), 2),
            })
    return rows


def check_against(predicted_img_s: float, measured_img_s: float) -> dict:
    """How far a prediction is from a measurement (ratio > 1: the model is optimistic)."""
    return {"predicted_img_s": predicted_img_s, "measured_img_s": measured_img_s,
            "ratio": predicted_img_s / measured_img_s if measured_img_s > 0 else float("inf")}


COLUMNS = ("arch", "J", "S", "stages", "balance", "local_speedup", "local_bubble", "M", "global_speedup",
           "global_bubble", "pgl_speedup")


def format_markdown(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgl_fast.distributed.cost_model",
                                description="Predicted --pipeline speedups from measured per-module times.")
    p.add_argument("--archs", default="resnet32,resnet110")
    p.add_argument("--Js", default="4,8,16")
    p.add_argument("--stages", default="2,4")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--bandwidth-gbs", type=float, default=25.0, help="link bandwidth, GB/s")
    p.add_argument("--latency-us", type=float, default=10.0)
    p.add_argument("--n-batches", type=int, default=391, help="batches per epoch (50,000 / 128)")
    p.add_argument("--no-overlap", action="store_true", help="communication takes the compute's own time")
    a = p.parse_args(argv)
    try:
        archs = a.archs.split(",")
        Js = [int(v) for v in a.Js.split(",")]
        stages = [int(v) for v in a.stages.split(",")]
    except ValueError:
        print("error: --Js and --stages take comma-separated integers", file=sys.stderr)
        return 2
    try:
        times = {(arch, J): measure_module_times(arch, J, batch=a.batch, steps=a.steps, device=a.device)
                 for arch in archs for J in Js}
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = table_rows(times, stages=stages, batch=a.batch, n_batches=a.n_batches, bandwidth=a.bandwidth_gbs * 1e9,
                      latency=a.latency_us * 1e-6, overlap=not a.no_overlap)
    print(format_markdown(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
