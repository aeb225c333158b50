"""What each local objective costs per step: DGL's, InfoPro's, MAN's and HPFF's local step and
PGL's checkpointed global step over each, on the frontier's network (resnet32, J=16, 1c2f heads;
MAN and HPFF on DGL's cross-entropy, as in ``docs/results/experiments/frontier``).

The frontier's wall times (MAN and HPFF runs 39 to 45 minutes, DGL's 12 to 13) ran under different
thread counts and loads, so they do not say what the objectives themselves cost. Here every
objective's step is built the same way (:func:`pgl_fast.memory.profile.build_step`, as a training run
builds it), timed on the same thread count in the same run, and reported as a ratio to DGL's step of
the same kind measured in this run (computed on demand when the DGL case was deselected).

CUDA: batch 1024; the timed function synchronises. CPU: batch 16 on one thread
(``PGL_FAST_BENCH_THREADS``, ``PGL_FAST_BENCH_BATCH`` to change them), memory from the tensor-level
tracker of ``pgl_fast.memory.profile``.

    pytest bench/test_bench_objectives.py --benchmark-only --benchmark-enable --benchmark-json objectives.json
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
ARCH, J, AUX = "resnet32", 16, "1c2f"
OBJECTIVES = {  # name -> its flags, as the frontier's runs set them
    "dgl": {},
    "infopro": {},
    "man": {"man_base": "dgl"},
    "hpff": {"hpff_base": "dgl"},
}
KINDS = ("local", "global_ckpt")
ROUNDS = 10 if CUDA else 5
CASES = [(obj, kind) for kind in KINDS for obj in OBJECTIVES]  # DGL first: the others reuse its numbers
MiB = 2 ** 20

_DGL: dict[tuple, dict] = {}  # (kind, batch, device) -> {"peak_bytes", "step_s", "params"}


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


def _setup(objective: str, kind: str):
    setup = build_step(kind, arch=ARCH, J=J, aux=AUX, batch=BATCH, device=DEVICE, pgl_local=objective,
                       local_options=OBJECTIVES[objective])
    setup.warm_up()
    mem = measure_step(setup, steps=1)
    return setup, mem


def _timed(setup, times: list[float]):
    def step():
        t0 = time.perf_counter()
        setup.run()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    return step


def _params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def _dgl_reference(kind: str) -> dict:
    key = (kind, BATCH, DEVICE)
    if key not in _DGL:
        setup, mem = _setup("dgl", kind)
        times: list[float] = []
        step = _timed(setup, times)
        for _ in range(3):
            step()
        _DGL[key] = {"peak_bytes": mem["peak_bytes"], "step_s": statistics.median(times[1:]),
                     "params": _params(setup.net)}
        del setup
        gc.collect()
    return _DGL[key]


@pytest.mark.parametrize("objective, kind", CASES, ids=[f"{o}-{k}" for o, k in CASES])
def test_objective_step(benchmark, objective, kind):
    benchmark.group = f"{ARCH}-J{J}-B{BATCH}-{kind}"
    setup, mem = _setup(objective, kind)
    times: list[float] = []
    benchmark.pedantic(_timed(setup, times), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    measured = times[1:] if len(times) > 1 else times  # the warm-up round is in `times` too
    step_s = statistics.median(measured)
    params = _params(setup.net)
    if objective == "dgl":
        _DGL[(kind, BATCH, DEVICE)] = {"peak_bytes": mem["peak_bytes"], "step_s": step_s, "params": params}
    dgl = _dgl_reference(kind)
    benchmark.extra_info.update({
        "arch": ARCH, "J": J, "aux": AUX, "objective": objective, "options": OBJECTIVES[objective],
        "kind": kind, "step": mem["step"], "batch": BATCH, "device": DEVICE, "threads": torch.get_num_threads(),
        "images_per_s": BATCH / step_s, "step_ms": 1e3 * step_s, "peak_mib": mem["peak_bytes"] / MiB,
        "breakdown_mib": {k: v / MiB for k, v in mem["breakdown"].items()}, "mem_source": mem["source"],
        "params": params, "load_avg_1min": os.getloadavg()[0],
        "time_ratio_to_dgl": step_s / dgl["step_s"], "mem_ratio_to_dgl": mem["peak_bytes"] / dgl["peak_bytes"],
        "params_ratio_to_dgl": params / dgl["params"],
    })
    # the tracker's "params" class holds exactly the network's parameters and buffers
    weights = sum(t.numel() * t.element_size() for t in [*setup.net.parameters(), *setup.net.buffers()])
    if mem["breakdown_exact"]:
        assert mem["breakdown"]["params"] == weights
    # MAN adds the copies of the next block on every aux path, HPFF a second head and the patch
    # decoders, InfoPro its decoders: each objective's network is larger than DGL's
    if objective != "dgl":
        assert params > dgl["params"], (objective, params, dgl["params"])
