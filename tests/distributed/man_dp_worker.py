"""Worker of tests/distributed/test_man_data_parallel.py (run by torchrun with 2 gloo ranks): PGL
over MAN in float64 with synchronised batch norm, one local step then one global step on a batch
of 7 split 4 + 3; each rank saves its model state."""
from __future__ import annotations

import sys

import torch

from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import MAN, PGL
from pgl_fast.distributed import DataParallelLearner, DistContext
from pgl_fast.models.presets import cifar_resnet

N = 7


def build():
    torch.manual_seed(0)
    return cifar_resnet("resnet8", 3, image_size=8, split="even", aux="0c1f").double()


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (N,), generator=g)


def run(learner, x, y, **kw):
    for epoch in (0, 1):  # PGL(1, 1): a local epoch, then a global one
        learner.start_epoch(epoch)
        learner.step(x, y, **kw)
    return learner


def method():
    return PGL(1, 1, local=MAN(0.9))


def optimizer(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def single() -> dict:
    """The reference: one process, the whole batch."""
    x, y = batch()
    return run(LocalLearner(build(), method(), optimizer=optimizer), x, y).model.state_dict()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu", timeout_s=120)
    learner = DataParallelLearner(build(), method(), ctx=ctx, sync_bn=True, optimizer=optimizer)
    x, y = batch()
    lo, hi = (0, 4) if ctx.rank == 0 else (4, N)
    run(learner, x[lo:hi], y[lo:hi], global_batch=N)
    torch.save(learner.model.state_dict(), f"{out_dir}/rank{ctx.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
