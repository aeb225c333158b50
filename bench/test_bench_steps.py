"""Step benchmarks: time and peak memory of a bp step, bp with module-boundary checkpointing, a
local (DGL/PGL) step and a checkpointed PGL global step, for J in {2, 4, 8, 16}.

CUDA: resnet32 and resnet110 at batch 1024; the timed function synchronises before it returns
(pytest-benchmark reads a host clock); memory from ``max_memory_allocated``/``max_memory_reserved``
over one steady-state step. CPU: resnet32 at batch 16 on one thread (``PGL_FAST_BENCH_THREADS``
to change it), memory from the tensor-level tracker of ``pgl_fast.memory.profile``; CPU times are only a
smoke test.

``extra_info`` of every benchmark: images/s, step time, peak memory and its breakdown, and the
ratios of memory and time to the bp step of the same arch / J / batch measured in this same run
(cached per module, computed on demand when the bp benchmark was deselected). The machine info
(device, versions, threads) comes from ``bench/conftest.py``.

    pytest bench/test_bench_steps.py --benchmark-only --benchmark-enable --benchmark-json steps.json
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
BATCH = 1024 if CUDA else 16
DTYPE = os.environ.get("PGL_FAST_BENCH_DTYPE", "fp32")
AUX = "1c2f"
ARCHS = ("resnet32", "resnet110") if CUDA else ("resnet32",)
JS = (2, 4, 8, 16)
KINDS = ("bp", "bp_ckpt", "local", "global_ckpt")  # bp first: the others' ratios reuse its numbers
ROUNDS = 10 if CUDA else 3
CASES = [(arch, J, kind) for arch in ARCHS for J in JS for kind in KINDS]
MiB = 2 ** 20

_BP: dict[tuple, dict] = {}  # (arch, J, batch, dtype, device) -> {"peak_bytes", "step_s"}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(int(os.environ.get("PGL_FAST_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _release():
    yield
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _setup(arch: str, J: int, kind: str):
    setup = build_step(kind, arch=arch, J=J, aux=AUX, batch=BATCH, dtype=DTYPE, device=DEVICE)
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


def _bp_reference(arch: str, J: int) -> dict:
    key = (arch, J, BATCH, DTYPE, DEVICE)
    if key not in _BP:
        setup, mem = _setup(arch, J, "bp")
        times: list[float] = []
        step = _timed(setup, times)
        for _ in range(2):
            step()
        _BP[key] = {"peak_bytes": mem["peak_bytes"], "step_s": statistics.median(times)}
        del setup
        gc.collect()
    return _BP[key]


@pytest.mark.parametrize("arch, J, kind", CASES, ids=[f"{a}-J{J}-{k}" for a, J, k in CASES])
def test_step(benchmark, arch, J, kind):
    benchmark.group = f"{arch}-J{J:02d}-B{BATCH}-{DTYPE}"
    setup, mem = _setup(arch, J, kind)
    times: list[float] = []
    benchmark.pedantic(_timed(setup, times), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    # the warm-up round (when benchmarking is enabled) is in `times` too: drop it
    measured = times[1:] if len(times) > 1 else times
    step_s = statistics.median(measured)
    if kind == "bp":
        _BP[(arch, J, BATCH, DTYPE, DEVICE)] = {"peak_bytes": mem["peak_bytes"], "step_s": step_s}
    bp = _bp_reference(arch, J)
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
    # parameters and buffers, recounted from the network itself: the tracker's own "params" class
    # must hold exactly these bytes (at peak they are all alive)
    weights = sum(t.numel() * t.element_size() for t in [*setup.net.parameters(), *setup.net.buffers()])
    if mem["breakdown_exact"]:
        assert mem["breakdown"]["params"] == weights
    assert mem["peak_bytes"] >= weights + mem["breakdown"]["activations"] > weights
    if kind != "bp":
        # every other step kind exists to hold less than plain backprop at the same batch
        assert info["mem_ratio_to_bp"] < 1.0, info
