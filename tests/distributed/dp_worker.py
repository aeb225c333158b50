"""The data-parallel scenarios of ``test_data_parallel.py``: tiny training runs of every method, as
a single process runs them (``ctx=None``) or as one rank of a torchrun launch.

    torchrun --standalone --nproc_per_node=2 tests/distributed/dp_worker.py OUT_DIR

writes ``OUT_DIR/rank{r}.pt`` with every scenario's result; the test compares them with
single-process runs of the same functions (and with an emulation of per-rank batch norm).

    torchrun --standalone --nproc_per_node=2 tests/distributed/dp_worker.py OUT_DIR syncbn

runs only the ``--sync-bn`` global steps of models cut by ``split()`` (``test_syncbn_exact.py``;
``syncbn-slow``: those of torchvision's resnet18).
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import BP, DGL, HPFF, PGL, InfoPro
from pgl_fast.data import BatchAugmenter, DatasetSpec, epoch_batches, make_generator, normalize
from pgl_fast.distributed import DataParallelLearner, DistContext, augment_shard, eval_shard, shard_batch
from pgl_fast.errors import UserError
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.models.split import split
from pgl_fast.runtime.optim import sgd

N_TRAIN, N_TEST, BATCH, IMAGE, J = 21, 11, 8, 16, 3  # 21 = 8 + 8 + 5: the last batch splits 3 + 2
SPEC = DatasetSpec("synthetic", 10, IMAGE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), pad=2, pad_mode="reflect", flip=True)
EPOCHS = {"dgl": 1, "pgl": 2, "bp": 1, "infopro": 1, "pgl_hpff": 2}  # pgl: one local epoch, then one global epoch


def method_of(name: str):
    return {"dgl": DGL(), "pgl": PGL(1, 1), "bp": BP(), "infopro": InfoPro(lambdas=[(1.0, 1.0), (0.5, 1.0)]),
            # HPFF's cascade crosses module boundaries in local steps; PGL adds a global epoch
            "pgl_hpff": PGL(1, 1, local=HPFF(wx=0.3, wy=0.7, base=InfoPro(lambdas=[(1.0, 1.0), (0.5, 1.0)])))}[name]


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N_TRAIN + N_TEST, 3, IMAGE, IMAGE), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=g)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def build(method: str, ctx: DistContext | None = None, sync_bn: bool = False):
    torch.manual_seed(0)
    m = method_of(method)
    model = cifar_resnet("resnet8", J, image_size=IMAGE, split="even", aux="1c2f" if m.has_heads else None)
    kw = dict(optimizer=sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
              lr_schedule=lambda e: 0.1 / (1 + e))
    if ctx is None:
        return LocalLearner(model, m, **kw)
    return DataParallelLearner(model, m, ctx=ctx, sync_bn=sync_bn, **kw)


def train(method: str, learner, *, ctx: DistContext | None = None, start_epoch: int = 0, stop_epoch=None, gen=None,
          record_events: bool = False):
    """Train through the method's epochs from ``start_epoch``; returns (generator, the statistics of
    every epoch, the bucket/step order of every epoch's first step). With ``ctx`` each global batch is
    sharded and augmented as ``pgl_fast.distributed`` does."""
    x_all, y_all, _, _ = data()
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    gen = gen or make_generator(7)
    augment = BatchAugmenter(SPEC)
    out, events = [], []
    for e in range(start_epoch, stop_epoch or EPOCHS[method]):
        learner.start_epoch(e)
        for step, idx in enumerate( epoch_batches(N_TRAIN, BATCH, generator=gen, drop_last=False)):
            n_global = idx.numel()
            if ctx is not None:
                idx = shard_batch(idx, rank, world)
                xb = augment_shard(augment, x_all[idx], gen, n_global, rank, world)
            else:
                xb = augment(x_all[idx], gen)
            image01 = xb.float().div(255) if learner.method.needs_image else None
            first = record_events and step == 0
            if first:
                learner.events = []  # the order of bucket launches and optimizer steps
            kw = {"global_batch": n_global} if ctx is not None else {}
            learner.step(normalize(xb, SPEC), y_all[idx], image01, **kw)
            if first:
                events.append(learner.events)
                learner.events = None
        out.append(learner.stats.read())
    return gen, out, events


def test_batches(ctx: DistContext | None = None, batch: int = 4):
    _, _, x, y = data()
    lo, hi = eval_shard(x.shape[0], ctx.rank, ctx.world_size) if ctx is not None else (0, x.shape[0])
    for i in range(lo, hi, batch):
        j = min(i + batch, hi)
        yield normalize(x[i:j], SPEC), y[i:j]


# -- --sync-bn global steps of split() models (test_syncbn_exact.py) -------------------------------
SB_BATCH, SB_CLASSES, SB_LR = 5, 3, 0.1  # a global batch of 5 splits 3 + 2: unequal shards
SB_CASES = [("vgg", "bp"), ("vgg", "pgl")]
SB_SLOW_CASES = [("resnet18", "bp"), ("resnet18", "pgl")]  # importing torchvision alone takes seconds


def syncbn_net(arch: str, aux: bool):
    """(the float64 torch model, its split, the children the cuts follow, the image size), built
    from seed 0. The split runs the model's own child modules, so the model's state_dict is the
    trained one. In both models a batch norm is followed by an in-place ReLU inside a cut-out
    piece (every BN of the VGG-like model, resnet18's top-level bn1)."""
    torch.manual_seed(0)
    if arch == "vgg":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                              nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                              nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, SB_CLASSES)).double()
        cuts, image = [2, 5], 8
        after = [model[2], model[5]]
    else:
        import torchvision  # optional heavy dependency: only this scenario needs it

        model = torchvision.models.resnet18(num_classes=SB_CLASSES).double()
        cuts, image = ["layer1", "layer3"], 16
        after = [model.layer1, model.layer3]
    local = split(model, cuts, aux="1c2f" if aux else None, input_shape=(3, image, image))
    return model, local, after, image


def syncbn_batch(image: int):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SB_BATCH, 3, image, image, generator=g, dtype=torch.float64)
    return x, torch.randint(0, SB_CLASSES, (SB_BATCH,), generator=g)


def syncbn_main(out_dir: str, cases) -> None:
    """One global step (BP, and PGL's global phase) of every case on this rank's shard."""
    from pgl_fast.core.schedule import GLOBAL

    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu", timeout_s=120)
    res = {}
    for arch, method in cases:
        model, local, _, image = syncbn_net(arch, aux=method == "pgl")
        x, y = syncbn_batch(image)
        learner = DataParallelLearner(local, method_of(method), ctx=ctx, sync_bn=True,
                                      optimizer=lambda ps: torch.optim.SGD(ps, lr=SB_LR))
        learner.start_epoch(1 if method == "pgl" else 0)
        assert learner.phase == GLOBAL
        r, w = ctx.rank, ctx.world_size
        learner.step(x.tensor_split(w)[r], y.tensor_split(w)[r], global_batch=SB_BATCH)
        res[f"{arch}/{method}"] = {"model": model.state_dict(), "heads": local.heads.state_dict()}
    torch.save(res, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    ctx.barrier()
    ctx.shutdown()


def _refuse():
    raise UserError("--resume x.pt: no such checkpoint file")


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu", timeout_s=120)
    res = {"rank": ctx.rank, "world": ctx.world_size}
    # --sync-bn: every method, against one process x B (the test's reference)
    for method in ("dgl", "pgl", "bp", "infopro", "pgl_hpff"):
        learner = build(method, ctx, sync_bn=True)
        _, st, events = train(method, learner, ctx=ctx, record_events=True)
        res[f"sync/{method}"] = {"model": learner.model.state_dict(), "stats": st, "events": events}
        if method == "dgl":
            res["eval"] = learner.evaluate(test_batches(ctx))
    # the same DGL run through the Trainer's own data object wrapped in ShardedData
    from pgl_fast.distributed import ShardedData
    from pgl_fast.data.batches import TensorData

    x_tr, y_tr, x_te, y_te = data()
    learner = build("dgl", ctx, sync_bn=True)
    tdata = ShardedData(TensorData((x_tr, y_tr), (x_te, y_te), SPEC, True, torch.device("cpu"), False, 4), ctx, learner)
    gen = make_generator(7)
    learner.start_epoch(0)
    for b in tdata.epoch_batches(BATCH, gen, False):
        learner.step(*tdata.train_batch(b, gen, learner.method.needs_image))
    res["sharded_data/dgl"] = {"model": learner.model.state_dict(), "stats": [learner.stats.read()],
                               "eval": learner.evaluate(tdata.test_batches())}
    # per-rank batch norm (the default)
    learner = build("dgl", ctx, sync_bn=False)
    _, st, _ = train("dgl", learner, ctx=ctx)
    learner.sync_buffers()
    res["local_bn/dgl"] = {"model": learner.model.state_dict(), "stats": st}
    # rank 0 checkpoints in the middle of PGL's local epoch (after 2 of its 3 steps, statistics
    # included); every rank restores it and finishes the run
    learner = build("pgl", ctx, sync_bn=True)
    x_all, y_all, _, _ = data()
    gen, augment = make_generator(7), BatchAugmenter(SPEC)
    learner.start_epoch(0)
    batches = epoch_batches(N_TRAIN, BATCH, generator=gen, drop_last=False)
    for idx in batches[:2]:
        mine = shard_batch(idx, ctx.rank, ctx.world_size)
        xb = augment_shard(augment, x_all[mine], gen, idx.numel(), ctx.rank, ctx.world_size)
        learner.step(normalize(xb, SPEC), y_all[mine], global_batch=idx.numel())
    state = {**learner.state_dict(), "stats": learner.stats.state_dict(),  # collective: every rank
             "gen": gen.get_state(), "perm": torch.cat(batches)}
    path = os.path.join(out_dir, "ckpt.pt")
    if ctx.is_main:
        torch.save(state, path)
    ctx.barrier()
    del learner, state
    learner = build("pgl", ctx, sync_bn=True)
    saved = torch.load(path, weights_only=True)
    learner.load_state_dict(saved)
    gen = make_generator(0)
    gen.set_state(saved["gen"])
    learner.start_epoch(0)
    learner.stats.load_state_dict(saved["stats"])
    for idx in list(saved["perm"].split(BATCH))[2:]:
        mine = shard_batch(idx, ctx.rank, ctx.world_size)
        xb = augment_shard(augment, x_all[mine], gen, idx.numel(), ctx.rank, ctx.world_size)
        learner.step(normalize(xb, SPEC), y_all[mine], global_batch=idx.numel())
    first_epoch = learner.stats.read()
    _, rest, _ = train("pgl", learner, ctx=ctx, start_epoch=1, gen=gen)
    res["resumed/pgl"] = {"model": learner.model.state_dict(), "stats": [first_epoch, *rest]}
    # a decision that fails on rank 0 stops every rank with the same one line
    try:
        ctx.on_main(_refuse)
    except UserError as e:
        res["on_main_error"] = str(e)
    res["on_main_value"] = ctx.on_main(lambda: f"decided by rank {ctx.rank}")
    torch.save(res, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    ctx.barrier()
    ctx.shutdown()


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else None
    if mode is None:
        main(sys.argv[1])
    else:
        syncbn_main(sys.argv[1], {"syncbn": SB_CASES, "syncbn-slow": SB_SLOW_CASES}[mode])
