"""``--compile`` against eager and against what a user would write without this engine.

For every (step, dtype) -- the local (DGL / PGL-local) step and the PGL global step, fp32 and bf16
autocast -- one benchmark times these implementations *interleaved*, round by round, on identical
networks and batches, so their ratios come from the same machine state:

- ``ours_eager``: ``LocalLearner`` as ``python -m pgl_fast.train`` runs it;
- ``ours_compile``: the same learner with ``compile="default"`` (``--compile``);
- ``plain_eager`` / ``plain_compile`` (local step only): a plain PyTorch loop with no pgl_fast
  learner -- per module ``h = block(x)``, the head's cross-entropy, ``loss.backward()``,
  ``torch.optim.SGD(..., nesterov=True).step()`` -- with each module's forward + loss under
  ``torch.compile`` in the compiled variant.

Compilation happens in untimed warm-up rounds (its wall time is reported as ``compile_s``). The
benchmark's own statistics are of one interleaved round (all implementations); ``extra_info`` holds
the per-implementation median images/s and the ratios (``ours_compile / plain_compile`` is the
figure to watch). In the default test suite (``--benchmark-disable``) the fp32 rows run once on a
tiny network, without the plain compiled loop (the bf16 rows are skipped), so the test stays cheap;
real shapes and every row only when benchmarking is enabled:

    pytest bench/test_bench_compile.py --benchmark-only --benchmark-enable

On CUDA the local rows add ``ours_graphs_fused_heads`` (``--cuda-graphs`` with the Triton heads) and
``plain_compile_reduce_overhead`` (the plain loop under ``torch.compile(mode="reduce-overhead")``);
these two rows are unmeasured so far (no GPU session has run them).

CPU: resnet32 J=16 1c2f at batch 128 on ``PGL_FAST_BENCH_THREADS`` threads (default 2; set
``PGL_FAST_BENCH_COMPILE_BATCH`` / ``_ARCH`` / ``_J`` to change the shape). CUDA: batch 1024.
"""
from __future__ import annotations

import copy
import gc
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import PGL
from pgl_fast.models.local_model import LocalModel
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.runtime.optim import sgd

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
AUX = "1c2f"
BENCH_THREADS = 2  # on the CPU, unless PGL_FAST_BENCH_THREADS says otherwise
pytestmark = pytest.mark.usefixtures("bench_threads")
LR, MOMENTUM, WD = 0.05, 0.9, 1e-4
CASES = [(kind, dtype) for kind in ("local", "global") for dtype in ("fp32", "bf16")]


def _shape(enabled: bool) -> dict:
    if not enabled:  # the default suite: one cheap pass through every code path
        return {"arch": "resnet8", "J": 2, "batch": 16, "rounds": 1}
    return {"arch": os.environ.get("PGL_FAST_BENCH_COMPILE_ARCH", "resnet32"),
            "J": int(os.environ.get("PGL_FAST_BENCH_COMPILE_J", "16")),
            "batch": int(os.environ.get("PGL_FAST_BENCH_COMPILE_BATCH", "1024" if CUDA else "128")),
            "rounds": 10 if CUDA else 5}


class PlainLocalLoop:
    """The local step as a user would write it with plain PyTorch (optionally compiled)."""

    def __init__(self, net: LocalModel, amp_dtype: torch.dtype | None, compiled: bool, mode: str | None = None):
        self.amp_dtype = amp_dtype
        self.mark_steps = mode == "reduce-overhead"  # CUDAGraph Trees: each call is a new step
        self.fns, self.opts = [], []
        for j in range(net.J):
            head = net.heads[j] if j < net.J - 1 else net.classifier
            params = list(net.blocks[j].parameters()) + list(head.parameters())
            self.opts.append(torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD))
            fn = self._forward_loss(net.blocks[j], head)
            self.fns.append(torch.compile(fn, mode=mode) if compiled else fn)

    @staticmethod
    def _forward_loss(block, head):
        def forward_loss(x, y):
            h = block(x)
            return h.detach(), F.cross_entropy(head(h).float(), y)

        return forward_loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        h = x
        for fn, opt in zip(self.fns, self.opts):
            with torch.autocast(DEVICE.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                h, loss = fn(h, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def _implementations(kind: str, dtype: str, shape: dict, plain_compile: bool = True) -> dict:
    amp = torch.bfloat16 if dtype == "bf16" else None
    torch.manual_seed(0)
    base = cifar_resnet(shape["arch"], shape["J"], num_classes=10, image_size=32, aux=AUX).to(DEVICE)
    impls = {}
    for name in ("ours_eager", "ours_compile"):
        learner = LocalLearner(copy.deepcopy(base), PGL(1, 1), amp=amp,
                               optimizer=sgd(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD),
                               compile="default" if name == "ours_compile" else None)
        impls[name] = learner.local_step if kind == "local" else learner.global_step
    if kind == "local":
        for name in ("plain_eager", "plain_compile") if plain_compile else ("plain_eager",):
            impls[name] = PlainLocalLoop(copy.deepcopy(base), amp, compiled=name == "plain_compile")
    if kind == "local" and CUDA:  # the GPU comparison: our graphs + fused heads vs compile's own graphs
        from pgl_fast.runtime.graphs import GraphedLocalSteps

        net = copy.deepcopy(base)
        net.set_head_kernels(True)
        learner = LocalLearner(net, PGL(1, 1), amp=amp, cuda_graphs=True,
                               optimizer=sgd(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD))
        assert isinstance(learner.graphed, GraphedLocalSteps)
        impls["ours_graphs_fused_heads"] = learner.local_step
        impls["plain_compile_reduce_overhead"] = PlainLocalLoop(copy.deepcopy(base), amp, compiled=True,
                                                                mode="reduce-overhead")
    return impls


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("kind, dtype", CASES, ids=[f"{k}-{d}" for k, d in CASES])
def test_compile_vs_eager(benchmark, kind, dtype):
    if benchmark.disabled and dtype == "bf16":
        pytest.skip("bf16 rows compile a second set of graphs: run with --benchmark-enable")
    shape = _shape(not benchmark.disabled)
    B = shape["batch"]
    benchmark.group = f"compile-{shape['arch']}-J{shape['J']}-B{B}-{dtype}"
    # the default suite skips the plain compiled loop: its graphs are the one thing the tests of
    # --compile have not compiled already at these shapes
    impls = _implementations(kind, dtype, shape, plain_compile=not benchmark.disabled)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, 3, 32, 32, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (B,), generator=g).to(DEVICE)
    compile_s = {}
    for name, step in impls.items():  # warm-up: compiles (two rounds: lazy state on the second)
        t0 = time.perf_counter()
        for _ in range(2 if not benchmark.disabled else 1):
            step(x, y)
        _sync()
        compile_s[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in impls}

    def one_round():
        for name, step in impls.items():
            t0 = time.perf_counter()
            step(x, y)
            _sync()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=shape["rounds"], warmup_rounds=0, iterations=1)
    ips = {name: B / statistics.median(t) for name, t in times.items()}
    info = {"kind": kind, "dtype": dtype, "device": DEVICE.type, "threads": torch.get_num_threads(), **shape,
            "images_per_s": ips, "warmup_s": compile_s,
            "compile_over_eager": ips["ours_compile"] / ips["ours_eager"]}
    if kind == "local":
        info["ours_eager_over_plain_eager"] = ips["ours_eager"] / ips["plain_eager"]
    if "plain_compile" in ips:
        info["plain_compile_over_plain_eager"] = ips["plain_compile"] / ips["plain_eager"]
        info["ours_compile_over_plain_compile"] = ips["ours_compile"] / ips["plain_compile"]
    if "ours_graphs_fused_heads" in ips:
        info["ours_graphs_over_plain_reduce_overhead"] = (ips["ours_graphs_fused_heads"]
                                                          / ips["plain_compile_reduce_overhead"])
    benchmark.extra_info.update(info)
    assert all(v > 0 for v in ips.values())
    del impls
    gc.collect()
