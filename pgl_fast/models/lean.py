"""Lean BasicBlock: the same function and gradients as ``models.BasicBlock``, with less memory held
for (and during) the backward. ``--lean-blocks``.

An eager BasicBlock keeps five block-sized tensors for its backward (input, conv1 output,
BN1/ReLU output, conv2 output, block output) and its backward allocates two more. At the
stage-1 blocks that dominate a local step's peak, that is 7 x 16 MiB at batch 256. The lean block:

- saves only the input, the conv2 output and the block output (which is alive anyway: it is the
  next module's input), plus per-channel batch statistics; conv1's output is recomputed from the
  input inside the backward (one extra 3x3 conv per block), after conv2's output is released;
- runs the ReLU and batch-norm backwards in place on the incoming gradient, with the BN input
  gradient written as a per-channel affine combination ``A*g + B*c + C`` (no normalised copy);
- recomputes the BN1/ReLU output only for conv2's weight gradient and frees it before conv2's
  input gradient is allocated; masks and reductions run in batch chunks, so their temporaries are
  a fraction of a tensor.

Forward values and running-statistics updates are exactly those of the eager block (the same ATen
calls); gradients agree to rounding (``tests/models/test_lean.py`` compares them in float64). fp32 only:
the hand-written BN backward is not meant for reduced precision, so ``--lean-blocks`` with
``--amp`` is refused by the config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CHUNKS = 8  # batch chunks for reductions and masks: temporaries are 1/8 of a tensor


def _chunks(n: int):
    step = max(1, -(-n // _CHUNKS))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _bn_forward(c: torch.Tensor, bn: nn.BatchNorm2d):
    """Training-mode BN through the same ATen op as nn.BatchNorm2d: (out, mean, invstd); updates the
    running statistics in place."""
    if bn.num_batches_tracked is not None and bn.momentum != 0.0:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return torch.native_batch_norm(c, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, momentum, bn.eps)


def _bn_backward_inplace(g: torch.Tensor, c: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                         weight: torch.Tensor):
    """Overwrite ``g`` (grad of the BN output) with the grad of the BN input ``c``; returns
    (grad weight, grad bias). dc = A*g + B*c + C per channel, with
    A = w*i, B = -w*i^2*dgamma/N, C = -w*i*dbeta/N + w*i^2*mean*dgamma/N."""
    n = c.numel() // c.shape[1]
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gc = torch.zeros_like(sum_g)
    for a, b in _chunks(g.shape[0]):
        sum_gc += (g[a:b] * c[a:b]).sum(dim=(0, 2, 3))
    dgamma = invstd * (sum_gc - mean * sum_g)
    A = weight * invstd
    B = -weight * invstd * invstd * dgamma / n
    C = -A * sum_g / n + weight * invstd * invstd * mean * dgamma / n
    shape = (1, -1, 1, 1)
    g.mul_(A.view(shape)).addcmul_(c, B.view(shape)).add_(C.view(shape))
    return dgamma, sum_g


def _relu_mask_inplace(g: torch.Tensor, pre: torch.Tensor) -> None:
    """g = g * (pre > 0), chunk by chunk."""
    for a, b in _chunks(g.shape[0]):
        g[a:b].masked_fill_(pre[a:b] <= 0, 0)


def _relu_mask_affine_inplace(g: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """g = g * (c*scale + shift > 0): the BN1+ReLU mask recomputed from BN1's input, chunk by chunk."""
    shape = (1, -1, 1, 1)
    for a, b in _chunks(g.shape[0]):
        g[a:b].masked_fill_(torch.addcmul(shift.view(shape), c[a:b], scale.view(shape)) <= 0, 0)


class _LeanBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, *params):
        s = block.stride
        c1 = F.conv2d(x, block.conv1.weight, stride=s, padding=1)
        r1, m1, i1 = _bn_forward(c1, block.bn1)
        del c1  # recomputed in the backward
        r1.relu_()
        c2 = F.conv2d(r1, block.conv2.weight, padding=1)
        del r1
        out, m2, i2 = _bn_forward(c2, block.bn2)
        if block.downsample is not None:
            cd = F.conv2d(x, block.downsample[0].weight, stride=s)
            sc, md, id_ = _bn_forward(cd, block.downsample[1])
            out.add_(sc)
            del sc
            ctx.cd, ctx.dstats = cd, (md, id_)
        else:
            out.add_(x)
            ctx.cd, ctx.dstats = None, None
        out.relu_()
        ctx.block = block
        ctx.stats = (m1, i1, m2, i2)
        ctx.c2 = c2  # an intermediate: held on ctx so the backward can drop it early
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out = ctx.saved_tensors
        blk = ctx.block
        m1, i1, m2, i2 = ctx.stats
        c2, cd, dstats = ctx.c2, ctx.cd, ctx.dstats
        ctx.c2 = ctx.cd = None
        need_x = ctx.needs_input_grad[0]
        s = blk.stride
        w1, w2 = blk.conv1.weight, blk.conv2.weight
        # The incoming gradient is owned by this backward (the block output feeds one consumer), so
        # it is overwritten in place: ReLU, then BN2.
        g = g.contiguous()
        _relu_mask_inplace(g, out)
        gx = None
        grads_ds = (None, None, None)
        if cd is not None:  # projection shortcut: BN_d and the 1x1 conv, before g is overwritten
            gd = g.clone()
            dgd, dbd = _bn_backward_inplace(gd, cd, dstats[0], dstats[1], blk.downsample[1].weight)
            del cd
            wd = blk.downsample[0].weight
            gx_d, dwd, _ = torch.ops.aten.convolution_backward(
                gd, x, wd, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1, [need_x, True, False])
            del gd
            grads_ds = (dwd, dgd, dbd)
            gx = gx_d
        elif need_x:
            gx = g.clone()
        dg2, db2 = _bn_backward_inplace(g, c2, m2, i2, blk.bn2.weight)
        del c2
        # conv1's output and the BN1/ReLU output, recomputed now that c2 is gone
        c1 = F.conv2d(x, w1, stride=s, padding=1)
        scale1 = blk.bn1.weight * i1
        shift1 = blk.bn1.bias - m1 * scale1
        r1 = torch.addcmul(shift1.view(1, -1, 1, 1), c1, scale1.view(1, -1, 1, 1)).relu_()
        _, dw2, _ = torch.ops.aten.convolution_backward(
            g, r1, w2, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
        del r1
        g1 = torch.nn.grad.conv2d_input(c1.shape, w2, g, stride=1, padding=1)
        _relu_mask_affine_inplace(g1, c1, scale1, shift1)
        dg1, db1 = _bn_backward_inplace(g1, c1, m1, i1, blk.bn1.weight)
        del c1
        gx1, dw1, _ = torch.ops.aten.convolution_backward(
            g1, x, w1, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, [need_x, True, False])
        if need_x:
            gx = gx1 if gx is None else gx.add_(gx1)
        grads = [dw1, dg1, db1, dw2, dg2, db2]
        if blk.downsample is not None:
            grads += list(grads_ds)
        return (gx, None, *grads)


def lean_block_params(block) -> list[torch.Tensor]:
    ps = [block.conv1.weight, block.bn1.weight, block.bn1.bias, block.conv2.weight, block.bn2.weight, block.bn2.bias]
    if block.downsample is not None:
        ps += [block.downsample[0].weight, block.downsample[1].weight, block.downsample[1].bias]
    return ps


def lean_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    return _LeanBlockFn.apply(x, block, *lean_block_params(block))
