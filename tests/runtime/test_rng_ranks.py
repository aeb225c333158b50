"""Dropout under data parallel, on 2 gloo ranks through the Trainer: each rank draws its own masks
(distinct from the other rank's, the same on every fresh start), and a run resumed from a
checkpoint continues every rank's own stream, so it equals the uninterrupted run.

The file is its own worker: ``python test_rng_ranks.py OUT`` with torchrun's variables set runs
one rank (two plain processes here, no launcher: cheaper than torchrun)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from pgl_fast.core.methods import DGL
from pgl_fast.distributed import DataParallelLearner, DistContext
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.runtime.optim import sgd
from pgl_fast.training.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MASKS_PER_EPOCH = 2 * 3  # 16 images in batches of 8, three BasicBlocks with dropout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_has_its_own_dropout_stream_and_resumes_it(tmp_path):
    port = _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                   RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PGL_FAST_DIST_TIMEOUT="120")
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, got in enumerate(res):
        a, b1, b2 = got["masks_a"], got["masks_b1"], got["masks_b2"]
        assert len(a) == 2 * MASKS_PER_EPOCH and len(b1) == len(b2) == MASKS_PER_EPOCH
        assert all(torch.equal(m, n) for m, n in zip(a[:MASKS_PER_EPOCH], b1)), f"rank {r}: a fresh start drew other masks"
        assert all(torch.equal(m, n) for m, n in zip(a[MASKS_PER_EPOCH:], b2)), \
            f"rank {r}: the resumed epoch drew other masks than the uninterrupted run"
        for k in got["params_a"]:
            assert torch.equal(got["params_a"][k], got["params_b"][k]), f"rank {r}: {k} differs after resume"
    # the two ranks' shards get masks from different streams: not one stream drawn twice
    same = [torch.equal(m, n) for m, n in zip(res[0]["masks_a"], res[1]["masks_a"])]
    assert not any(same), f"ranks 0 and 1 drew the same dropout masks at draws {[i for i, s in enumerate(same) if s]}"


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    ctx = DistContext.from_env("cpu")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    masks: list[torch.Tensor] = []  # the generator state at every dropout draw

    def build():
        torch.manual_seed(0)
        net = cifar_resnet("resnet8", 2, image_size=8, split="even", aux="1c2f", droprate=0.5)
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                # the generator's state as the layer draws its mask: the mask is a function of it
                # (and of the input's shape), where the zeros of the output also depend on the input
                # (in training only: an eval-mode forward, as the Trainer's check of one batch, draws none)
                m.register_forward_pre_hook(lambda mod, inp: masks.append(torch.get_rng_state()) if mod.training else None)
        return DataParallelLearner(net, DGL(), ctx=ctx, optimizer=sgd(lr=0.05, momentum=0.9))

    def fit(learner, name, epochs, **kw):
        Trainer(learner, (x, y), None, epochs=epochs, batch_size=8, output_dir=os.path.join(out, name),
                progress="off", heartbeat=0, **kw).fit()
        got = list(masks)
        masks.clear()
        return got

    a = build()
    masks_a = fit(a, "a", 2)
    masks_b1 = fit(build(), "b", 1)
    b = build()
    masks_b2 = fit(b, "b", 2, resume="auto", allow_schedule_change=True)
    torch.save({"masks_a": masks_a, "masks_b1": masks_b1, "masks_b2": masks_b2,
                # parameters only: with per-rank batch norm a checkpoint holds rank 0's running
                # statistics, which every rank restores (by design, see distributed/data_parallel.py)
                "params_a": {k: v.detach().clone() for k, v in a.model.named_parameters()},
                "params_b": {k: v.detach().clone() for k, v in b.model.named_parameters()}},
               os.path.join(out, f"rank{ctx.rank}.pt"))
    ctx.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1])
