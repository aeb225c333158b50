"""Step benchmarks: time and peak memory of

- ``test_step``: a bp step, bp with module-boundary checkpointing, a local (DGL/PGL) step and a
  checkpointed PGL global step, for J in {2, 4, 8, 16}, with ratios to the bp step of the same
  arch / J / batch;
- ``test_objective_step``: what each local objective costs -- DGL's, InfoPro's, MAN's and HPFF's
  local step and PGL's checkpointed global step over each, on the accuracy frontier's network
  (resnet32, J=16, 1c2f heads; MAN and HPFF on DGL's cross-entropy, as in
  ``docs/results/experiments/frontier``), with ratios to DGL's step of the same kind.

Every step is built as a training run builds it (:func:`pgl_fast.memory.profile.build_step`); the
reference of each ratio is measured in this same run (cached per module, computed on demand when its
own case was deselected), on the same thread count.

CUDA: resnet32 and resnet110 at batch 1024; the timed function synchronises before it returns
(pytest-benchmark reads a host clock); memory from ``max_memory_allocated``/``max_memory_reserved``
over one steady-state step. CPU: resnet32 at batch 16 on one thread (``PGL_FAST_BENCH_BATCH``,
``PGL_FAST_BENCH_THREADS`` to change them), memory from the tensor-level tracker of
``pgl_fast.memory.profile``.

``extra_info`` of every benchmark: images/s, step time, peak memory and its breakdown, and the
ratios. The machine info (device, versions, threads) comes from ``bench/conftest.py``.

    pytest bench/test_bench_steps.py --benchmark-only --benchmark-enable --benchmark-json steps.json
    PGL_FAST_BENCH_BATCH=64 pytest bench/test_bench_steps.py -k objective --benchmark-only --benchmark-enable
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import pytest
import torch

from pgl_fast.memory.profile import build_step, measure_step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH = int(os.environ.get("PGL_FAST_BENCH_BATCH", "1024" if CUDA else "16"))
DTYPE = os.environ.get("PGL_FAST_BENCH_DTYPE", "fp32")
AUX = "1c2f"
ARCHS = ("resnet32", "resnet110") if CUDA else ("resnet32",)
JS = (2, 4, 8, 16)
KINDS = ("bp", "bp_ckpt", "local", "global_ckpt")  # bp first: the others' ratios reuse its numbers
ROUNDS = 10 if CUDA else 5
CASES = [(arch, J, kind) for arch in ARCHS for J in JS for kind in KINDS]
OBJECTIVES = {  # name -> its flags, as the frontier's runs set them; DGL first: the others' reference
    "dgl": {},
    "infopro": {},
    "man": {"man_base": "dgl"},
    "hpff": {"hpff_base": "dgl"},
}
OBJECTIVE_CASES = [(obj, kind) for kind in ("local", "global_ckpt") for obj in OBJECTIVES]
MiB = 2 ** 20
pytestmark = pytest.mark.usefixtures("bench_threads", "release_memory")

_REF: dict[tuple, dict] = {}  # (arch, J, kind, objective, batch, dtype, device) -> {"peak_bytes", "step_s", "params"}


def _setup(arch: str, J: int, kind: str, objective: str = "dgl"):
    setup = build_step(kind, arch=arch, J=J, aux=AUX, batch=BATCH, dtype=DTYPE, device=DEVICE,
                       pgl_local=objective, local_options=OBJECTIVES[objective])
    setup.warm_up()
    mem = measure_step(setup, steps=1)  # tracker on the CPU, allocator counters on CUDA
    return setup, mem


def _timed(setup, times: list[float]):
    def step():
        t0 = time.perf_counter()
        setup.run()
        if CUDA:
            torch.cuda.synchronize()  # wait for the GPU inside the timed call
        times.append(time.perf_counter() - t0)

    return step


def _params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def _benchmark(benchmark, arch: str, J: int, kind: str, objective: str = "dgl"):
    """Time one step kind; returns its setup, memory, median step time and the cached record."""
    setup, mem = _setup(arch, J, kind, objective)
    times: list[float] = []
    benchmark.pedantic(_timed(setup, times), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    # the warm-up round (when benchmarking is enabled) is in `times` too: drop it
    step_s = statistics.median(times[1:] if len(times) > 1 else times)
    record = {"peak_bytes": mem["peak_bytes"], "step_s": step_s, "params": _params(setup.net)}
    _REF[(arch, J, kind, objective, BATCH, DTYPE, DEVICE)] = record
    return setup, mem, step_s, record


def _reference(arch: str, J: int, kind: str, objective: str = "dgl") -> dict:
    """The record of a step measured in this run, measured now when its case was deselected."""
    key = (arch, J, kind, objective, BATCH, DTYPE, DEVICE)
    if key not in _REF:
        setup, mem = _setup(arch, J, kind, objective)
        times: list[float] = []
        step = _timed(setup, times)
        for _ in range(3):
            step()
        _REF[key] = {"peak_bytes": mem["peak_bytes"], "step_s": statistics.median(times[1:]),
                     "params": _params(setup.net)}
        del setup
        gc.collect()
    return _REF[key]


def _check_tracker(setup, mem) -> int:
    """Parameters and buffers, recounted from the network itself: the tracker's own "params" class
    must hold exactly these bytes (at peak they are all alive). Returns them."""
    weights = sum(t.numel() * t.element_size() for t in [*setup.net.parameters(), *setup.net.buffers()])
    if mem["breakdown_exact"]:
        assert mem["breakdown"]["params"] == weights
    assert mem["peak_bytes"] >= weights + mem["breakdown"]["activations"] > weights
    return weights


@pytest.mark.parametrize("arch, J, kind", CASES, ids=[f"{a}-J{J}-{k}" for a, J, k in CASES])
def test_step(benchmark, arch, J, kind):
    benchmark.group = f"{arch}-J{J:02d}-B{BATCH}-{DTYPE}"
    setup, mem, step_s, _ = _benchmark(benchmark, arch, J, kind)
    bp = _reference(arch, J, "bp")
    info = {
        "arch": arch, "J": J, "kind": kind, "step": mem["step"], "batch": BATCH, "dtype": DTYPE, "aux": AUX,
        "device": DEVICE, "threads": torch.get_num_threads(),
        "images_per_s": BATCH / step_s, "step_ms": 1e3 * step_s,
        "peak_mib": mem["peak_bytes"] / MiB,
        "reserved_mib": None if mem["reserved_bytes"] is None else mem["reserved_bytes"] / MiB,
        "breakdown_mib": {k: v / MiB for k, v in mem["breakdown"].items()},
        "breakdown_exact": mem["breakdown_exact"], "mem_source": mem["source"],
        "bp_peak_mib": bp["peak_bytes"] / MiB, "bp_images_per_s": BATCH / bp["step_s"],
        "mem_ratio_to_bp": mem["peak_bytes"] / bp["peak_bytes"],
        "time_ratio_to_bp": step_s / bp["step_s"],
    }
    benchmark.extra_info.update(info)
    _check_tracker(setup, mem)
    if kind != "bp":
        # every other step kind exists to hold less than plain backprop at the same batch
        assert info["mem_ratio_to_bp"] < 1.0, info


@pytest.mark.parametrize("objective, kind", OBJECTIVE_CASES, ids=[f"{o}-{k}" for o, k in OBJECTIVE_CASES])
def test_objective_step(benchmark, objective, kind):
    arch, J = "resnet32", 16
    benchmark.group = f"objectives-{arch}-J{J}-B{BATCH}-{DTYPE}-{kind}"
    setup, mem, step_s, record = _benchmark(benchmark, arch, J, kind, objective)
    dgl = _reference(arch, J, kind, "dgl")
    benchmark.extra_info.update({
        "arch": arch, "J": J, "aux": AUX, "objective": objective, "options": OBJECTIVES[objective],
        "kind": kind, "step": mem["step"], "batch": BATCH, "dtype": DTYPE, "device": DEVICE,
        "threads": torch.get_num_threads(), "images_per_s": BATCH / step_s, "step_ms": 1e3 * step_s,
        "peak_mib": mem["peak_bytes"] / MiB, "breakdown_mib": {k: v / MiB for k, v in mem["breakdown"].items()},
        "mem_source": mem["source"], "params": record["params"], "load_avg_1min": os.getloadavg()[0],
        "time_ratio_to_dgl": step_s / dgl["step_s"], "mem_ratio_to_dgl": mem["peak_bytes"] / dgl["peak_bytes"],
        "params_ratio_to_dgl": record["params"] / dgl["params"],
    })
    _check_tracker(setup, mem)
    # MAN adds the copies of the next block on every aux path, HPFF a second head and the patch
    # decoders, InfoPro its decoders: each objective's network is larger than DGL's
    if objective != "dgl":
        assert record["params"] > dgl["params"], (objective, record["params"], dgl["params"])
