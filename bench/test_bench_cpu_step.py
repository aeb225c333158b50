"""The engine's default CPU steps against plain loops written here: the local (DGL) step against a
hand-written eager DGL loop, the BP step against a hand-written eager BP loop. Same network
(copies of the same weights), same data, same batch, fp32; the contenders run in interleaved rounds
(one step of each per round, the order reversed every other round, after warm-up), and the ratio is median(plain) / median(engine), so
> 1 means the engine is faster.

The plain loops use ``torch.optim.SGD`` as a user writes it (Python-float lr, torch's default
kernel choice), one optimizer per module for DGL, one for the network for BP.

Default run (``pytest bench/``): a smoke test at resnet8 J=4, batch 8, one round.
``PGL_FAST_BENCH_FULL=1``: resnet32 J=16, batch 128, ``PGL_FAST_BENCH_ROUNDS`` rounds (default 5),
torch's thread count (``PGL_FAST_BENCH_THREADS`` to set it). Ratios go to ``extra_info``.

    PGL_FAST_BENCH_FULL=1 pytest bench/test_bench_cpu_step.py --benchmark-only --benchmark-enable -s
"""
from __future__ import annotations

import copy
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from pgl_fast.build import build_learner, build_model
from pgl_fast.config import TrainConfig

FULL = os.environ.get("PGL_FAST_BENCH_FULL") == "1"
ARCH, J, BATCH = ("resnet32", 16, 128) if FULL else ("resnet8", 4, 8)
ROUNDS = int(os.environ.get("PGL_FAST_BENCH_ROUNDS", "5")) if FULL else 1
WARMUP = 2 if FULL else 1


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


def engine(method, net):
    learner = build_learner(_cfg(method), copy.deepcopy(net))
    learner.start_epoch(0)
    return learner.step


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
    eng = engine(method, net)
    plain = plain_dgl(net) if method == "dgl" else plain_bp(net)
    t = interleaved({"engine": eng, "plain": plain}, x, y)
    ratio = t["plain"] / t["engine"]
    benchmark.extra_info.update({"arch": ARCH, "J": J, "batch": BATCH, "threads": torch.get_num_threads(),
                                 "rounds": ROUNDS, "engine_step_s": t["engine"], "plain_step_s": t["plain"],
                                 "speedup_vs_plain": ratio,
                                 "engine_images_per_s": BATCH / t["engine"], "plain_images_per_s": BATCH / t["plain"]})
    print(f"\n{method}: engine {t['engine'] * 1e3:.1f} ms, plain {t['plain'] * 1e3:.1f} ms, "
          f"engine speed-up {ratio:.3f}x ({ARCH} J={J} batch {BATCH}, {torch.get_num_threads()} threads)")
    benchmark.pedantic(eng, args=(x, y), rounds=1, iterations=1)
    assert t["engine"] > 0 and t["plain"] > 0
