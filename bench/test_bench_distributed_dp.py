"""Data parallel on this CPU: 2 gloo ranks x 1 thread against 1 process x 2 threads (equal total
threads), for a DGL/PGL local step and a PGL global step, with per-rank and synchronised batch norm.

The 2-rank timings come from one ``torchrun --standalone --nproc_per_node=2`` launch of this file
(``__main__`` below) made at the start of the module; the single-process timings are the
pytest-benchmark measurement of each test. ``extra_info``: images/s of both (global batch / step
time), their ratio (``ddp_speedup`` > 1: two ranks are faster), the 1-process x 1-thread rate
measured in the same run, and the load average, since other jobs may share the machine.

    pytest bench/test_bench_distributed_dp.py --benchmark-only --benchmark-enable --benchmark-json dp.json

With benchmarking disabled (the default test run) every case runs once at a small batch as a
smoke test. ``PGL_FAST_BENCH_DP_BATCH`` sets the global batch of a measured run (default 128).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

MEASURED, AUX = ("resnet32", 16), "1c2f"  # measured runs: the configuration of the CPU figures
SMOKE = ("resnet8", 3)  # unmeasured runs (the default test run): the same code on a tiny network
KINDS = ("local", "global")
BNS = ("per_rank", "sync")
CASES = [(k, b) for k in KINDS for b in BNS]
HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))


def _build(kind: str, arch: str, J: int, ctx=None, sync_bn: bool = False):
    """A PGL learner on a CIFAR ResNet (its local and global steps are DGL's and BP-with-heads')."""
    from pgl_fast.core.learner import LocalLearner
    from pgl_fast.core.methods import PGL
    from pgl_fast.distributed import DataParallelLearner
    from pgl_fast.models.presets import cifar_resnet
    from pgl_fast.runtime.optim import sgd

    torch.manual_seed(0)
    model = cifar_resnet(arch, J, aux=AUX, split="auto" if (arch, J) == MEASURED else "even")
    kw = dict(optimizer=sgd(lr=0.05))
    if ctx is None:
        return model, LocalLearner(model, PGL(1, 1), **kw)
    return model, DataParallelLearner(model, PGL(1, 1), ctx=ctx, sync_bn=sync_bn, **kw)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _run(learner, kind: str, x, y, global_batch=None) -> None:
    if global_batch is not None:
        learner.set_global_batch(global_batch)
    (learner.local_step if kind == "local" else learner.global_step)(x, y)


def _time_steps(learner, kind, x, y, rounds: int, warmup: int, barrier=None, global_batch=None) -> list[float]:
    times = []
    for i in range(warmup + rounds):
        if barrier is not None:
            barrier()  # both ranks start each step together: the step time is the slower rank's
        t0 = time.perf_counter()
        _run(learner, kind, x, y, global_batch)
        if barrier is not None:
            barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _worker(out: str, arch: str, J: int, batch: int, rounds: int, warmup: int) -> None:
    """One rank of the 2-rank measurement (1 thread each)."""
    from pgl_fast.distributed import DistContext, shard_batch

    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu", timeout_s=600)
    x, y = _data(batch, 0)
    idx = shard_batch(torch.arange(batch), ctx.rank, ctx.world_size)
    res = {}
    for kind, bn in CASES:
        _, learner = _build(kind, arch, J, ctx, sync_bn=bn == "sync")
        times = _time_steps(learner, kind, x[idx], y[idx], rounds, warmup, ctx.barrier, global_batch=batch)
        res[f"{kind}/{bn}"] = times
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(res, f)
    ctx.barrier()
    ctx.shutdown()


@pytest.fixture(scope="module")
def settings(request):
    opt = request.config.getoption
    # pytest-benchmark: --benchmark-enable overrides the --benchmark-disable of pytest.ini
    enabled = opt("benchmark_enable", False) or not opt("benchmark_disable", False)
    if enabled:
        return {"arch": MEASURED[0], "J": MEASURED[1], "batch": int(os.environ.get("PGL_FAST_BENCH_DP_BATCH", "128")), "rounds": 5,
                "warmup": 1}
    return {"arch": SMOKE[0], "J": SMOKE[1], "batch": 8, "rounds": 1, "warmup": 0}


@pytest.fixture(scope="module")
def two_ranks(settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp-bench") / "ranks.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", HERE, "--worker",
           str(out), settings["arch"], str(settings["J"]),
           *(str(settings[k]) for k in ("batch", "rounds", "warmup"))]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_thread_rates(settings):
    """1 process x 1 thread, for the same cases (the scaling of threads themselves)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = _data(settings["batch"], 0)
    rates = {}
    try:
        for kind in KINDS:
            _, learner = _build(kind, settings["arch"], settings["J"])
            times = _time_steps(learner, kind, x, y, settings["rounds"], settings["warmup"])
            rates[kind] = settings["batch"] / statistics.median(times)
    finally:
        torch.set_num_threads(n)
    return rates


@pytest.mark.parametrize("kind, bn", CASES, ids=[f"{k}-{b}" for k, b in CASES])
def test_ddp_two_ranks_vs_one_process(benchmark, settings, two_ranks, one_thread_rates, kind, bn):
    batch, arch, J = settings["batch"], settings["arch"], settings["J"]
    benchmark.group = f"dp-{arch}-J{J}-B{batch}-{kind}"
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, learner = _build(kind, arch, J)  # per-rank and synchronised BN are the same thing in one process
        x, y = _data(batch, 0)
        times: list[float] = []

        def step():
            t0 = time.perf_counter()
            _run(learner, kind, x, y)
            times.append(time.perf_counter() - t0)

        benchmark.pedantic(step, rounds=settings["rounds"], warmup_rounds=settings["warmup"], iterations=1)
    finally:
        torch.set_num_threads(n)
    one = batch / statistics.median(times[settings["warmup"]:] or times)
    ddp = batch / statistics.median(two_ranks[f"{kind}/{bn}"])
    benchmark.extra_info.update({
        "arch": arch, "J": J, "aux": AUX, "kind": kind, "bn": bn, "global_batch": batch, "per_rank_batch": batch // 2,
        "one_process_2_threads_img_s": one, "two_ranks_1_thread_img_s": ddp,
        "one_process_1_thread_img_s": one_thread_rates[kind], "ddp_speedup": ddp / one,
        "load_average": os.getloadavg()[0],
    })
    assert one > 0 and ddp > 0


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
