"""The engine's CPU steps against plain loops written here: the local (DGL) step against a
hand-written DGL loop, the BP step against a hand-written BP loop, each plain loop both eager and
under ``torch.compile``; the engine's default step (what a run that is not tuned trains with) and
the engine with its tuned choice (``--cpu-tune auto`` as a long run makes it: threads,
channels-last, optimizer kernel, and ``--compile`` where its measured compile time pays over the
run). Same network (copies of the same weights), same data, same batch, fp32; the contenders run
in interleaved rounds (one step of each per round, the order reversed every other round, after
warm-up), and each ratio is median(plain) / median(engine) from the same rounds, so > 1 means the
engine is faster.

The plain loops use ``torch.optim.SGD`` as a user writes it (Python-float lr, torch's default
kernel choice), one optimizer per module for DGL, one for the network for BP. The compiled DGL
loop compiles one function per module (its forward on the detached input, its head, its loss),
the compiled BP loop the network's forward and loss; the first compiled step's time is reported as
the compile time.

Default run (``pytest bench/``): a smoke test at resnet8 J=4, batch 8, one round, eager
contenders only (a compile takes a minute even there).
``PGL_FAST_BENCH_FULL=1``: resnet32 J=16, batch 128, ``PGL_FAST_BENCH_ROUNDS`` rounds (default 5),
torch's thread count (``PGL_FAST_BENCH_THREADS`` to set it), compiled contenders and the tuned
engine (the tuner sees a run of ``PGL_FAST_BENCH_RUN_STEPS`` steps, default 200 CIFAR-10 epochs;
``PGL_FAST_BENCH_COMPILE=0`` leaves the compiled contenders out). Ratios and the load average go
to ``extra_info``.

    PGL_FAST_BENCH_FULL=1 pytest bench/test_bench_cpu_step.py --benchmark-only --benchmark-enable -s
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pgl_fast.config.build import build_learner, build_model
from pgl_fast.config import TrainConfig
from pgl_fast.train import tune_cpu

FULL = os.environ.get("PGL_FAST_BENCH_FULL") == "1"
ARCH, J, BATCH = ("resnet32", 16, 128) if FULL else ("resnet8", 4, 8)
ROUNDS = int(os.environ.get("PGL_FAST_BENCH_ROUNDS", "5")) if FULL else 1
WARMUP = 2 if FULL else 1
COMPILED = FULL and os.environ.get("PGL_FAST_BENCH_COMPILE", "1") == "1"
RUN_STEPS = int(os.environ.get("PGL_FAST_BENCH_RUN_STEPS", str(200 * (50000 // BATCH))))


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    if "PGL_FAST_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["PGL_FAST_BENCH_THREADS"]))
    elif not FULL:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(method):
    return TrainConfig(arch=ARCH, modules=J, method=method, batch_size=BATCH, lr=0.1,
                       split="auto" if FULL else "layerwise")


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def plain_dgl(net):
    """A hand-written DGL loop over the LocalModel's pieces: module j on the detached input, its
    aux head's cross-entropy (the classifier's for the last), backward, its own SGD step."""
    net = copy.deepcopy(net)
    opts = [_sgd(list(net.blocks[j].parameters()) + (list(net.heads[j].parameters()) if j < J - 1 else
                                                     list(net.classifier.parameters()))) for j in range(J)]

    def step(x, y):
        h = x
        for j in range(J):
            h = net.blocks[j](h.detach())
            out = net.heads[j](h) if j < J - 1 else net.classifier(h)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opts[j].step()
            opts[j].zero_grad(set_to_none=True)
    return step


def plain_bp(net):
    """A hand-written BP loop: the backbone and classifier end to end, one SGD."""
    net = copy.deepcopy(net)
    model = torch.nn.Sequential(*net.blocks, net.classifier)
    opt = _sgd(model.parameters())

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def plain_dgl_compiled(net):
    """The DGL loop with each module's forward, head and loss under ``torch.compile``."""
    net = copy.deepcopy(net)
    opts = [_sgd(list(net.blocks[j].parameters()) + (list(net.heads[j].parameters()) if j < J - 1 else
                                                     list(net.classifier.parameters()))) for j in range(J)]

    def piece(j):
        block, head = net.blocks[j], (net.heads[j] if j < J - 1 else net.classifier)

        def f(h, y):
            h = block(h)
            return h, F.cross_entropy(head(h), y)
        return torch.compile(f)
    pieces = [piece(j) for j in range(J)]

    def step(x, y):
        h = x
        for j in range(J):
            h, loss = pieces[j](h.detach(), y)
            loss.backward()
            opts[j].step()
            opts[j].zero_grad(set_to_none=True)
    return step


def plain_bp_compiled(net):
    """The BP loop with the network's forward and loss under ``torch.compile``."""
    net = copy.deepcopy(net)
    model = torch.nn.Sequential(*net.blocks, net.classifier)
    opt = _sgd(model.parameters())
    fwd = torch.compile(lambda x, y: F.cross_entropy(model(x), y))

    def step(x, y):
        fwd(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def engine(method, net, cfg=None):
    learner = build_learner(cfg or _cfg(method), copy.deepcopy(net))
    learner.start_epoch(0)
    return learner.step


def tuned_engine(method, net, threads: int):
    """The engine as ``--cpu-tune auto`` sets it up for a run of ``RUN_STEPS`` steps (measured
    here, in a fresh cache): its step runs at the chosen thread count, the other contenders at
    ``threads``. Returns (step, the tuner's header.json record)."""
    cfg = _cfg(method)
    with tempfile.TemporaryDirectory() as cache:
        old = os.environ.get("PGL_FAST_CACHE_DIR")
        os.environ["PGL_FAST_CACHE_DIR"] = cache
        try:
            run_cfg, record = tune_cpu(cfg, copy.deepcopy(net), torch.device("cpu"), SimpleNamespace(distributed=False),
                                       batch=BATCH, image_size=32, steps=RUN_STEPS)
        finally:
            torch.set_num_threads(threads)
            if old is None:
                del os.environ["PGL_FAST_CACHE_DIR"]
            else:
                os.environ["PGL_FAST_CACHE_DIR"] = old
    inner = engine(method, net.to(memory_format=torch.channels_last) if run_cfg.channels_last else net, run_cfg)
    n = record["used"]["threads"]

    def step(x, y):
        torch.set_num_threads(n)
        try:
            inner(x, y)
        finally:
            torch.set_num_threads(threads)
    return step, record


def _load() -> float:
    return os.getloadavg()[0]


def interleaved(fns: dict, x, y) -> dict:
    for fn in fns.values():
        for _ in range(WARMUP):
            fn(x, y)
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(ROUNDS):
        for k in (order if r % 2 == 0 else order[::-1]):  # neither always runs first
            fn = fns[k]
            t = time.perf_counter()
            fn(x, y)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@pytest.mark.parametrize("method", ["dgl", "bp"])
def test_engine_step_against_plain_loop(benchmark, method):
    torch.manual_seed(0)
    net = build_model(_cfg(method), 10, 32)
    x, y = _data()
    threads = torch.get_num_threads()
    load = [_load()]
    fns = {"engine": engine(method, net), "plain": plain_dgl(net) if method == "dgl" else plain_bp(net)}
    compile_s, record = {}, None
    if COMPILED:
        fns["plain_compiled"] = plain_dgl_compiled(net) if method == "dgl" else plain_bp_compiled(net)
        t = time.perf_counter()
        fns["plain_compiled"](x, y)  # the first step compiles
        compile_s["plain_compiled"] = time.perf_counter() - t
    if FULL:
        t = time.perf_counter()
        fns["engine_tuned"], record = tuned_engine(method, net, threads)
        compile_s["tuning"] = time.perf_counter() - t
    t = interleaved(fns, x, y)
    load.append(_load())
    ratios = {f"{k}_speedup_vs_{p}": t[p] / t[k] for k in ("engine", "engine_tuned") if k in t
              for p in ("plain", "plain_compiled") if p in t}
    benchmark.extra_info.update({"arch": ARCH, "J": J, "batch": BATCH, "threads": threads, "rounds": ROUNDS,
                                 "step_s": t, "ratios": ratios, "images_per_s": {k: BATCH / v for k, v in t.items()},
                                 "first_step_s": compile_s, "load_avg_1min": load,
                                 "tuned": None if record is None else {k: record.get(k) for k in
                                                                        ("tuned", "reason", "choice", "used",
                                                                         "estimate", "timings_s")}})
    print(f"\n{method} ({ARCH} J={J} batch {BATCH}, {threads} threads, load {load[0]:.2f}->{load[1]:.2f}): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()) + "; "
          + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
          + (f"; first steps/tuning {({k: round(v, 1) for k, v in compile_s.items()})} s" if compile_s else "")
          + (f"; tuned used {record['used']} ({record.get('estimate', {}).get('compile')})" if record else ""))
    benchmark.pedantic(fns["engine"], args=(x, y), rounds=1, iterations=1)
    assert all(v > 0 for v in t.values())
