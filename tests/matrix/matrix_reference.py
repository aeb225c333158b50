"""The float64 reference of the matrix, written from the methods' definitions with plain autograd
in one process. It uses the network's parts (blocks, aux heads, decoders, classifier) as functions
and nothing of the engine's steps, losses or optimizer.

- local step (DGL, InfoPro, PGL's local epochs): module j runs on the *detached* output of module
  j-1; modules 0..J-2 learn from their local loss (DGL: cross-entropy of the aux head; InfoPro:
  lambda_rec * BCE(decoder(h), image in [0, 1]) + lambda_task * cross-entropy of the head), the last
  module from the classifier's cross-entropy;
- global step (BP, PGL's global epochs): the network end to end; the backbone learns from the final
  cross-entropy only, each aux head (and decoder) from its local loss on detached features;
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

import torch
import torch.nn.functional as F


def _local_loss(net, kind, j, h, y, image01, lambdas):
    ce = F.cross_entropy(net.heads[j](h), y)
    if kind == "ce":
        return ce
    lam_rec, lam_task = lambdas[j]
    rec = F.binary_cross_entropy(net.decoders[j](h), image01.to(h.dtype))
    return lam_rec * rec + lam_task * ce


def _local_loss_sum(net, kind, x, y, image01, lambdas):
    """Every module's loss of a local step, summed: the inputs are detached, so each module's
    gradient is that of its own loss only."""
    J = len(net.blocks)
    h, total = x, 0.0
    for j in range(J):
        h = net.blocks[j](h.detach())
        if j < J - 1:
            total = total + _local_loss(net, kind, j, h, y, image01, lambdas)
        else:
            total = total + F.cross_entropy(net.classifier(h), y)
    return total


def _global_loss_sum(net, kind, x, y, image01, lambdas, heads):
    J = len(net.blocks)
    h, total = x, 0.0
    for j in range(J):
        h = net.blocks[j](h)
        if j < J - 1 and heads:
            total = total + _local_loss(net, kind, j, h.detach(), y, image01, lambdas)
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


def train(net, steps, *, phases, kind, heads, lambdas, lr, momentum, wd, bn_local="full", bn_global="full",
          shards=(3, 2)):
    """Trains ``net`` (in place) on ``steps`` (a list of (x, y, image01) whole batches), step i in
    ``phases[i]`` ("local" or "global"); ``kind``: "ce" (DGL) or "infopro"; ``heads``: whether aux
    heads exist."""
    net.train()
    params = list(net.parameters())
    bufs: dict = {}
    for (x, y, image01), phase in zip(steps, phases):
        bn = bn_local if phase == "local" else bn_global

        def loss_of(xs, ys, ims):
            if phase == "local":
                return _local_loss_sum(net, kind, xs, ys, ims, lambdas)
            return _global_loss_sum(net, kind, xs, ys, ims, lambdas, heads)

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
        _sgd(params, grads, bufs, lr, momentum, wd)
    return net
