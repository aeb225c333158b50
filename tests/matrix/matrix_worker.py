"""One rank of a distributed strategy of the matrix: runs every cell it is given, in order, in
one set of processes (``pgl_fast.distributed.pipeline.run_local_group`` starts two gloo ranks).

A cell's result is ``{"rank": r, "state": ..., "error": None}`` (the parameters and buffers this
rank holds after the two steps: all of them under data parallel, the stage's own modules in a
pipeline) or ``{"error": "<Type>: <first line>"}``. After every cell the ranks agree on whether
any of them failed, so a cell that fails on one rank cannot leave the other waiting in the next."""
from __future__ import annotations

import torch
import torch.distributed as dist

import matrix_cases as C
from pgl_fast import LocalLearner
from pgl_fast.distributed import DataParallelLearner, DistContext
from pgl_fast.distributed.pipeline import FAIL_KEY, _default_store, build_stage


def _line(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _dp_build(ctx, strategy, method, model, runtime):
    net = C.build_model(model, method)
    learner = DataParallelLearner(net, C.method_of(method), ctx=ctx, sync_bn=strategy == "dp_syncbn",
                                  **C.learner_kwargs(runtime))
    return net, learner


def _dp_train(ctx, method, net, learner):
    r, w = ctx.rank, ctx.world_size
    for e, (x, y, im) in enumerate(C.batches()):
        learner.start_epoch(e)
        learner.step(x.tensor_split(w)[r], y.tensor_split(w)[r],
                     im.tensor_split(w)[r] if C.needs_image(method) else None, global_batch=x.shape[0])
    return C.state(net)


def _pipe_build(strategy, method, model, runtime):
    net = C.build_model(model, method)
    learner = LocalLearner(net, C.method_of(method), **C.learner_kwargs(runtime))
    # a process group of its own per cell: a cell that fails mid-step leaves receives posted on its
    # group's connections, which would swallow the next cell's messages
    group = dist.new_group([0, 1])
    runner = build_stage(learner, 2, micro_batches=1 if strategy == "pipe_m1" else 2,
                         input_shape=(3, C.IMG, C.IMG), timeout_s=30, group=group)
    return net, learner, runner


def _pipe_train(method, net, learner, runner):
    data = C.batches()
    for e in range(C.STEPS):
        learner.start_epoch(e)
        x, y, im = data[e]
        batch = (x, y, im if C.needs_image(method) else None)
        runner.train_epoch(learner.phase, [x.shape[0]], (lambda t, b=batch: b) if runner.first else None)
    keep = tuple(f"{p}.{j}." for j in runner.modules for p in ("blocks", "heads", "decoders"))
    return {k: v for k, v in C.state(net).items()
            if k.startswith(keep) or (runner.last and k.startswith("classifier."))}


def _agree(rank: int, world: int, error, store):
    """Every rank's error of this stage of a cell (None where it went well), on every rank."""
    errors = [None] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        # a failed pipeline stage leaves its failure flag in the store: clear it for the next cell
        dist.barrier()
        if rank == 0 and store is not None and store.check([FAIL_KEY]):
            store.delete_key(FAIL_KEY)
        dist.barrier()
        return " | ".join(f"rank {r}: {m}" for r, m in enumerate(errors) if m)
    return None


def run(rank: int, world: int, strategy: str, cells: list) -> dict:
    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu", timeout_s=60) if strategy.startswith("dp") else None
    store = _default_store()
    out = {}
    for method, model, runtime in cells:
        # built first, and only trained when every rank built: a rank that failed to build must not
        # leave the other waiting in the first step's messages
        error = built = None
        try:
            if ctx is not None:
                built = _dp_build(ctx, strategy, method, model, runtime)
            else:
                built = _pipe_build(strategy, method, model, runtime)
        except Exception as e:  # noqa: BLE001 - reported per cell to the test
            error = _line(e)
        error = _agree(rank, world, error, store)
        st = None
        if error is None:
            try:
                st = _dp_train(ctx, method, *built) if ctx is not None else _pipe_train(method, *built)
            except Exception as e:  # noqa: BLE001
                error = _line(e)
            error = _agree(rank, world, error, store)
        out[(method, model, runtime)] = {"error": error, "state": st if error is None else None}
    return out
