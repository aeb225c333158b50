"""The float64 reference of the matrix, written from the methods' definitions with plain autograd
in one process. It uses the network's parts (blocks, aux heads, decoders, MAN's copies, HPFF's
second heads and the tile decoders of its patch decoders, classifier) as functions and nothing of
the engine's steps, losses, EMA update or optimizer.

- local step (DGL, InfoPro, MAN, PGL's local epochs): module j runs on the *detached* output of
  module j-1; modules 0..J-2 learn from their local loss (DGL: cross-entropy of the aux head;
  InfoPro: lambda_rec * BCE(decoder(h), image in [0, 1]) + lambda_task * cross-entropy of the head),
  the last module from the classifier's cross-entropy. MAN: the head (and InfoPro's decoder) sees
  ``LB_j(h) + EMA_j(h)`` instead of ``h``;
- HPFF's local step: the independent path (module j on the detached output of module j-1) gives
  ``IL_j``, the cross-entropy of head j on module j's output; the cascade path runs modules j-1 and
  j from the detached output of module j-2 (the input for j = 1) and gives ``CL_j``: the
  cross-entropy of the second head (``hpff_heads``) on its output, plus for an InfoPro base
  ``lambda_rec`` times the sum over the p x p tiles of the BCE of the tile's decoder on the
  feature tile against the image tile. Module j's loss is ``wx IL_j + wy CL_j`` (j >= 1; cut 0 has
  none), the last module's ``wx CE + wy CE`` of the classifier on the two paths' outputs. The
  cascade repeats forwards the engine runs once: it normalises with the batch's statistics but
  leaves the running statistics alone (they are updated once, by the independent path);
- global step (BP, PGL's global epochs): the network end to end; the backbone learns from the final
  cross-entropy only, each aux head (and decoder, MAN's LB copy, HPFF's second head and patch
  decoder) from its local loss on detached features (HPFF: ``wx IL_j + wy CL_j`` at cuts j >= 1);
- MAN's EMA copies: no gradient of their own; after every step's gradients and before any update,
  ``ema = m ema + (1 - m) theta`` for every parameter, theta that of the first unit of module j+1;
- SGD with momentum m, Nesterov, L2 weight decay wd added to the gradient, the momentum buffer
  starting at zero: d = g + wd p; b = m b + d; p -= lr (d + m b). A parameter without a gradient
  keeps its value and its buffer.

Batch norm: ``bn="full"`` normalises the whole batch at once (one process, ``--sync-bn``, a
pipelined global step of one micro-batch). ``bn="rank0"`` is per-rank batch norm: every shard is
normalised by its own statistics, the loss is the shard-size-weighted sum of the shard losses (the
mean over the whole batch), and the running statistics are those shard 0 alone leaves (rank 0's,
what the engine keeps). ``bn="sequential"`` normalises every shard on its own and updates the
running statistics shard after shard (GPipe micro-batches)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def _batch_statistics_only(net):
    """Batch norm normalises with the batch's statistics and neither reads nor updates its running
    statistics (a module that does not track them is handed none)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was = [m.track_running_stats for m in bns]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, w in zip(bns, was):
            m.track_running_stats = w


def _local_loss(net, kind, j, h, y, image01, lambdas, hpff=None):
    if kind.startswith("hpff"):
        if j == 0:
            return 0.0  # HPFF's first cut has no loss
        wx, wy, patches = hpff
        return wx * F.cross_entropy(net.heads[j](h), y) + wy * _hpff_cl(net, kind, j, h, y, image01, lambdas, patches)
    if kind.startswith("man"):
        h = net.lb_blocks[j](h) + net.ema_blocks[j](h)
    ce = F.cross_entropy(net.heads[j](h), y)
    if kind in ("ce", "man_ce"):
        return ce
    lam_rec, lam_task = lambdas[j]
    rec = F.binary_cross_entropy(net.decoders[j](h), image01.to(h.dtype))
    return lam_rec * rec + lam_task * ce


def _hpff_cl(net, kind, j, z, y, image01, lambdas, patches):
    """HPFF's cascade loss at cut j on the features ``z``."""
    task = F.cross_entropy(net.hpff_heads[str(j)](z), y)
    if kind == "hpff_ce":
        return task
    lam_rec, lam_task = lambdas[j]
    fh, fw = z.shape[-2] // patches, z.shape[-1] // patches
    ih, iw = image01.shape[-2] // patches, image01.shape[-1] // patches
    rec = 0.0
    for r in range(patches):
        for c in range(patches):
            dec = net.hpff_decoders[str(j)].decoders[r * patches + c]
            tile = dec(z[:, :, r * fh:(r + 1) * fh, c * fw:(c + 1) * fw])
            rec = rec + F.binary_cross_entropy(tile, image01[:, :, r * ih:(r + 1) * ih, c * iw:(c + 1) * iw])
    return lam_rec * rec + lam_task * task


def _hpff_local_sum(net, kind, x, y, image01, lambdas, hpff):
    """Every loss of an HPFF local step, summed: each parameter's gradient is that of the losses
    that reach it (the independent path's inputs and the cascade's start are detached)."""
    wx, wy, patches = hpff
    B, J = net.blocks, len(net.blocks)
    hx, h = [], x
    for j in range(J):
        h = B[j](h.detach())
        hx.append(h)

    def cascade(j):  # modules j-1 and j from the detached output of module j-2
        start = x if j == 1 else hx[j - 2].detach()
        with _batch_statistics_only(net):
            return B[j](B[j - 1](start))

    total = 0.0
    for j in range(1, J - 1):
        total = total + wx * F.cross_entropy(net.heads[j](hx[j]), y)
        total = total + wy * _hpff_cl(net, kind, j, cascade(j), y, image01, lambdas, patches)
    zy = cascade(J - 1)
    with _batch_statistics_only(net):
        final_y = F.cross_entropy(net.classifier(zy), y)
    return total + wx * F.cross_entropy(net.classifier(hx[J - 1]), y) + wy * final_y


def _local_loss_sum(net, kind, x, y, image01, lambdas, hpff=None):
    """Every module's loss of a local step, summed: the inputs are detached, so each module's
    gradient is that of its own loss only."""
    if kind.startswith("hpff"):
        return _hpff_local_sum(net, kind, x, y, image01, lambdas, hpff)
    J = len(net.blocks)
    h, total = x, 0.0
    for j in range(J):
        h = net.blocks[j](h.detach())
        if j < J - 1:
            total = total + _local_loss(net, kind, j, h, y, image01, lambdas)
        else:
            total = total + F.cross_entropy(net.classifier(h), y)
    return total


def _global_loss_sum(net, kind, x, y, image01, lambdas, heads, hpff=None):
    J = len(net.blocks)
    h, total = x, 0.0
    for j in range(J):
        h = net.blocks[j](h)
        if j < J - 1 and heads:
            total = total + _local_loss(net, kind, j, h.detach(), y, image01, lambdas, hpff)
    return total + F.cross_entropy(net.classifier(h), y)


def _sgd(params, grads, bufs, lr, momentum, wd):
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            d = g + wd * p
            b = bufs.setdefault(p, torch.zeros_like(p))
            b.mul_(momentum).add_(d)
            p.sub_(lr * (d + momentum * b))


def _ema_update(net, m):
    with torch.no_grad():
        for j in range(len(net.ema_blocks)):
            theta = net.units[net.ranges[j + 1][0]].parameters()
            for e, t in zip(net.ema_blocks[j].parameters(), theta):
                e.copy_(m * e + (1 - m) * t)


def train(net, steps, *, phases, kind, heads, lambdas, lr, momentum, wd, bn_local="full", bn_global="full",
          shards=(3, 2), man_momentum=None, hpff=None):
    """Trains ``net`` (in place) on ``steps`` (a list of (x, y, image01) whole batches), step i in
    ``phases[i]`` ("local" or "global"); ``kind``: "ce" (DGL), "infopro", "man_ce" / "man_infopro"
    (MAN over either, EMA momentum ``man_momentum``) or "hpff_ce" / "hpff_infopro" (HPFF over either,
    ``hpff`` = (wx, wy, patches)); ``heads``: whether aux heads exist."""
    net.train()
    # MAN's EMA copies take no gradient
    params = [p for p in net.parameters() if p.requires_grad]
    bufs: dict = {}
    for (x, y, image01), phase in zip(steps, phases):
        bn = bn_local if phase == "local" else bn_global

        def loss_of(xs, ys, ims):
            if phase == "local":
                return _local_loss_sum(net, kind, xs, ys, ims, lambdas, hpff)
            return _global_loss_sum(net, kind, xs, ys, ims, lambdas, heads, hpff)

        rank0 = None
        if bn == "full":
            loss = loss_of(x, y, image01)
        else:
            n = x.shape[0]
            loss = 0.0
            for r, (xs, ys, ims) in enumerate(zip(x.split(list(shards)), y.split(list(shards)),
                                                  image01.split(list(shards)))):
                loss = loss + loss_of(xs, ys, ims) * (xs.shape[0] / n)
                if r == 0 and bn == "rank0":
                    rank0 = [b.detach().clone() for b in net.buffers()]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if rank0 is not None:
            # the later shards' running statistics belong to the other ranks: put back shard 0's
            # (only now: the backward of batch norm reads the running statistics it saved)
            with torch.no_grad():
                for b, v in zip(net.buffers(), rank0):
                    b.copy_(v)
        if kind.startswith("man"):
            _ema_update(net, man_momentum)  # from module j+1's parameters before this step's update
        _sgd(params, grads, bufs, lr, momentum, wd)
    return net
