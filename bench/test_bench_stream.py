"""Streaming pipeline benchmarks: the loader alone (img/s with 0, 1, 2 worker processes) against
the training step's img/s, and the resident memory (RSS) of the training process and its
workers over one epoch.

Data: the ImageNet-like tree of ``pgl_fast.tools.make_imagefolder`` (``PGL_FAST_STREAM_TREE``
names an existing one; otherwise one is generated from ``.cache/cifar10-jpeg`` when present, else
from synthetic images), read with the imagenet recipe at 224 pixels. Step: torchvision ResNet-50
split by ``--split infopro -J 2``, a PGL local step (DGL's) at batch 8 on the CPU. RSS is sampled
every 0.1 s from ``/proc`` (VmRSS of the main process and of each worker; the sum over processes
counts pages the forked workers share with the parent more than once, so it is an upper bound).

    PGL_FAST_STREAM_TREE=/tmp/inet pytest bench/test_bench_stream.py --benchmark-only \\
        --benchmark-enable --benchmark-json stream.json -s

With benchmarking disabled (the default test run) everything runs once on a tiny tree at 32
pixels, as a smoke test of the same code.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from pgl_fast.data import stream as ds
from pgl_fast.config.build import build_learner, build_model
from pgl_fast.config import TrainConfig
from pgl_fast.tools.make_imagefolder import make_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def settings(request, tmp_path_factory):
    opt = request.config.getoption
    enabled = opt("benchmark_enable", False) or not opt("benchmark_disable", False)
    if not enabled:
        tree = make_imagefolder("synthetic", tmp_path_factory.mktemp("s") / "t", classes=2, train_per_class=8,
                                test_per_class=1, min_size=40, max_size=60)
        return {"tree": tree, "size": 32, "loader_batch": 4, "step_batch": 2, "rounds": 1}
    tree = os.environ.get("PGL_FAST_STREAM_TREE")
    if not tree:
        cifar = os.path.join(REPO, ".cache", "cifar10-jpeg")
        tree = make_imagefolder(cifar if os.path.isdir(cifar) else "synthetic", tmp_path_factory.mktemp("b") / "t",
                                classes=10, train_per_class=200, test_per_class=20)
    return {"tree": tree, "size": 224, "loader_batch": 32, "step_batch": 8, "rounds": 3}


def _epoch(stream, workers, batch, epoch=0):
    """Read one epoch of the train split; the images read."""
    stream.workers = workers
    plan = ds._Plan()
    order = torch.randperm(stream.num_train, generator=torch.Generator().manual_seed(epoch)).tolist()
    plan.keys = [[(i, ds.sample_seed(0, epoch, i)) for i in order[a:a + batch]] for a in range(0, len(order), batch)]
    n = 0
    for x, _ in ds._batches_of(stream.loader("train", plan, torch.device("cpu"))):
        n += x.shape[0]
    return n


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_images_per_s(benchmark, settings, workers):
    stream = ds.load_stream(settings["tree"], recipe="imagenet", image_size=settings["size"], workers=workers)
    benchmark.group = "stream-loader"
    t = []

    def run():
        t0 = time.perf_counter()
        n = _epoch(stream, workers, settings["loader_batch"])
        t.append(n / (time.perf_counter() - t0))

    benchmark.pedantic(run, rounds=settings["rounds"], iterations=1)
    rate = sorted(t)[len(t) // 2]
    benchmark.extra_info.update({"workers": workers, "images_per_s": rate, "images": stream.num_train,
                                 "load_average": os.getloadavg()})
    print(f"\nloader workers={workers}: {rate:.1f} img/s over {stream.num_train} images (load {os.getloadavg()})")


def test_step_images_per_s(benchmark, settings):
    size, batch = settings["size"], settings["step_batch"]
    cfg = TrainConfig(dataset="imagefolder", recipe="imagenet", arch="torchvision:resnet50", split="infopro",
                      modules=2, method="pgl", batch_size=batch, device="cpu", global_memory="none")
    net = build_model(cfg, 10, size)
    learner = build_learner(cfg, net)
    learner.start_epoch(0)  # PGL's first epoch: a local step
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    learner.step(x, y)  # warm-up
    t = []

    def run():
        t0 = time.perf_counter()
        learner.step(x, y)
        t.append(batch / (time.perf_counter() - t0))

    benchmark.group = "stream-step"
    benchmark.pedantic(run, rounds=settings["rounds"], iterations=1)
    rate = sorted(t)[len(t) // 2]
    benchmark.extra_info.update({"images_per_s": rate, "threads": torch.get_num_threads(),
                                 "load_average": os.getloadavg()})
    print(f"\nstep resnet50 J=2 local, batch {batch} @ {size}px: {rate:.2f} img/s "
          f"({torch.get_num_threads()} threads, load {os.getloadavg()})")


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def test_epoch_rss_is_flat(settings):
    """Main-process and worker RSS sampled through an epoch with 2 workers: a data set never held
    whole shows no growth with the images read."""
    stream = ds.load_stream(settings["tree"], recipe="imagenet", image_size=settings["size"], workers=2)
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()
    pid = os.getpid()

    def sample():
        while not done.is_set():
            kids = _children(pid)
            samples.append((time.perf_counter(), _rss_kib(pid), sum(_rss_kib(c) for c in kids)))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    before = _rss_kib(pid)
    th.start()
    t0 = time.perf_counter()
    n = _epoch(stream, 2, settings["loader_batch"], epoch=1)
    done.set()
    th.join()
    assert n == stream.num_train and samples
    main = [m for _, m, _ in samples]
    total = [m + w for _, m, w in samples]
    q = len(samples) // 10
    print(f"\nepoch of {n} images in {time.perf_counter() - t0:.1f}s; main RSS MiB before {before / 1024:.0f}, "
          f"at 10% {main[q] / 1024:.0f}, peak {max(main) / 1024:.0f}, end {main[-1] / 1024:.0f}; main+workers "
          f"at 10% {total[q] / 1024:.0f}, peak {max(total) / 1024:.0f}, end {total[-1] / 1024:.0f}")
