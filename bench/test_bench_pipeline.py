"""``--pipeline 2`` against one process on this CPU, with equal total threads, next to the cost
model's prediction for the same configuration.

Measured, all on a PGL/DGL local epoch of resnet32 J=16 (1c2f heads) on one fixed batch:

- the per-module times of ``cost_model.measure_module_times`` on 1 thread, in CPU seconds (what each
  module needs, whatever else shares the machine): they feed the model and the stage balance;
- one process on 1 thread and on 2 threads: ``LocalLearner.local_step``, wall clock;
- two pipeline ranks of 1 thread each (gloo on this machine), the stages balanced by those times:
  wall clock from a barrier to the last rank's end of the epoch, after a warm-up epoch;
- the gloo loopback bandwidth at the size of the cut the pipeline sends.

Predicted: ``predict_local`` with those module times, the measured bandwidth and ``overlap=False``
(on a CPU the copies cost the cores that compute). Two checks: each rank's measured CPU seconds
against the model's stage seconds (the balance, independent of other jobs on the machine), and the
wall-clock throughput against the prediction, which assumes every rank has a core to itself; their
ratio says what the model leaves out here (two processes sharing two cores' caches and memory
bandwidth, and on a busy machine the other jobs: ``load_avg_1min`` is recorded).

The default run (a smoke test in ``python -m pytest``) uses batch 8 and 2 batches; the
measured configuration: ``PGL_FAST_BENCH_PIPE_BATCH=128 PGL_FAST_BENCH_PIPE_STEPS=10 pytest
bench/test_bench_pipeline.py --benchmark-only --benchmark-enable -s``.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from pgl_fast.distributed.cost_model import activation_bytes, measure_module_times, predict_local
from pgl_fast.distributed.pipeline import balance_by_time, build_stage, run_local_group

ARCH, J, AUX = "resnet32", 16, "1c2f"
BATCH = int(os.environ.get("PGL_FAST_BENCH_PIPE_BATCH", "8"))
STEPS = int(os.environ.get("PGL_FAST_BENCH_PIPE_STEPS", "2"))
WARM = 1


def _pipe_worker(rank, world, times, batch, steps):
    from pgl_fast.memory.profile import build_step

    setup = build_step("local", arch=ARCH, J=J, aux=AUX, batch=batch)
    runner = build_stage(setup.executor, world, balance=times, timeout_s=600)
    fn = (lambda t: (setup.x, setup.y, None)) if runner.first else None
    runner.local_epoch([batch] * WARM, fn)
    # loopback bandwidth at the size of the cut between the two stages
    shape = runner._in_shape if not runner.first else _next_shape(setup, runner.ranges[0][1])
    buf = torch.zeros((batch, *shape))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(5):
        (dist.send if runner.first else dist.recv)(buf, 1 - rank)
    bw = 5 * buf.numel() * buf.element_size() / (time.perf_counter() - t0)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    runner.local_epoch([batch] * steps, fn)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "bandwidth": bw, "ranges": runner.ranges,
            "peak_inflight_bytes": runner.peak_inflight_bytes}


@torch.no_grad()
def _next_shape(setup, b):
    h = torch.zeros(1, 3, 32, 32)
    net = setup.net
    was = net.training
    net.eval()
    for j in range(b):
        h = net.blocks[j](h)
    net.train(was)
    return tuple(h.shape[1:])


def _single(threads: int, batch: int, steps: int) -> float:
    from pgl_fast.memory.profile import build_step

    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        setup = build_step("local", arch=ARCH, J=J, aux=AUX, batch=batch)
        for _ in range(WARM):
            setup.run()
        t0 = time.perf_counter()
        for _ in range(steps):
            setup.run()
        return steps * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU comparison (a GPU pipeline needs several GPUs)")
def test_bench_pipeline2_vs_one_process(benchmark):
    out = {}

    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # CPU seconds: what each module needs, whatever else shares the machine
            times = measure_module_times(ARCH, J, batch=BATCH, aux=AUX, steps=STEPS, clock="cpu")
        finally:
            torch.set_num_threads(n)
        out["one_1t_img_s"] = _single(1, BATCH, STEPS)
        out["one_2t_img_s"] = _single(2, BATCH, STEPS)
        res = run_local_group(_pipe_worker, 2, times, BATCH, STEPS, threads=1, timeout_s=600)
        for r, x in enumerate(res):
            assert x is not None and x[0] == "ok", f"rank {r}: {x}"
        ranks = [x[1] for x in res]
        out["pipe2_img_s"] = STEPS * BATCH / max(r["wall"] for r in ranks)
        out["ranges"] = ranks[0]["ranges"]
        out["bandwidth_MBs"] = ranks[0]["bandwidth"] / 1e6
        out["peak_inflight_MiB"] = [r["peak_inflight_bytes"] / 2 ** 20 for r in ranks]
        ranges = balance_by_time(times, 2)
        out["model_ranges"] = ranges
        pred = predict_local(times, activation_bytes(ARCH, J), ranges, batch=BATCH, n_batches=STEPS,
                             bandwidth=ranks[0]["bandwidth"], overlap=False)
        # the model's stage seconds against each rank's own CPU seconds: the balance, load-independent
        out["predicted_stage_cpu_s"] = [STEPS * t for t in pred["stage_seconds"]]
        out["measured_stage_cpu_s"] = [r["cpu"] for r in ranks]
        out["measured_stage_wall_s"] = [r["wall"] for r in ranks]
        # wall: the model assumes each rank has a core to itself
        out["predicted_one_1t_img_s"] = BATCH / sum(times)
        out["predicted_pipe2_img_s"] = STEPS * BATCH / pred["epoch_seconds"]
        out["predicted_speedup_vs_1t"] = pred["speedup"]
        out["measured_speedup_vs_1t"] = out["pipe2_img_s"] / out["one_1t_img_s"]
        out["ratio_predicted_measured"] = out["predicted_pipe2_img_s"] / out["pipe2_img_s"]
        out["batch"], out["steps"] = BATCH, STEPS
        out["load_avg_1min"] = os.getloadavg()[0]

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    print("\npipeline bench:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()})
    assert out["pipe2_img_s"] > 0 and out["predicted_pipe2_img_s"] > 0
    assert out["ranges"] == out["model_ranges"]  # the ranks balanced by the same times as the model
