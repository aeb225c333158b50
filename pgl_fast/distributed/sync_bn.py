"""Batch norm whose training statistics span every rank's shard (``--sync-bn``).

Every device uses :class:`AllReduceBatchNorm`, CUDA included, and not ``torch.nn.SyncBatchNorm``:
torch's backward all-reduces the per-rank gradient sums unweighted, which is the gradient of the
whole run only when every rank holds the same number of samples. The engine weights rank r's
gradients by n_r / N (below), so with unequal shards -- a global batch that does not divide by
the world size: 3 or 6 GPUs, an odd batch, an epoch's last batch -- torch's module gives a wrong
gradient, and it refuses CPU input anyway. One implementation everywhere also means the
arithmetic a GPU run does is the one the CPU tests check. The price on CUDA is a few unfused
kernels and four small all-reduces per batch norm and step instead of two.
:class:`AllReduceBatchNorm` computes batch norm over the union batch from plain autograd ops and
all-reduces:

    mean = sum over all ranks of x / N            (N: samples x spatial positions, all ranks)
    var  = sum over all ranks of (x - mean)^2 / N (two-pass, like the single-process kernel)
    y    = (x - mean) / sqrt(var + eps) * weight + bias

so the forward is, up to floating-point summation order, batch norm over the union batch, and
autograd differentiates through the two all-reduces. The backward of an all-reduce must hand
each rank the gradient of the *objective of the whole run* with respect to its share of the
statistics. Ranks' gradients are later combined as ``sum_r w_r g_r`` with ``w_r = n_r / N`` (the
engine's gradient sync, exact also for a last batch that does not split evenly), so the
all-reduce's backward returns ``(sum_r w_r dL_r/dS) / w_q`` on rank q: multiplied by ``w_q`` in
the gradient sync it contributes exactly its share. With equal shards (``w = 1/world``) this is a
plain sum, which is what ``torch.nn.SyncBatchNorm``'s backward does for any shards.

Statistics are computed in the input's dtype (float64 stays float64), and in fp32 for half
inputs (fp16 / bf16 under autocast), as batch norm's own kernels keep them.

Running statistics are updated on every rank from the global mean and the unbiased global
variance (N / (N - 1)), as ``nn.BatchNorm`` and ``SyncBatchNorm`` do, so they stay identical
across ranks. ``momentum = 0`` (``frozen_bn_stats`` in a checkpoint recomputation) leaves them
untouched, ``momentum=None`` is the cumulative average, and eval mode uses the running
statistics without any collective.

The modules read the current shard weight and global sample count from a shared :class:`BNSync`
that the data-parallel executor sets before every step; in the single-process context they are
plain batch norm. Memory: the decomposed ops keep a few more tensors alive for the backward than
the fused kernel.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError


class BNSync:
    """What every synchronised batch norm of one network needs to know about the current step."""

    def __init__(self, group=None, world_size: int = 1):
        self.group = group
        self.world_size = world_size
        self.weight = 1.0 / world_size   # this rank's share of the global batch, n_local / n_global
        self.global_samples: int | None = None  # samples in the global batch (None: n_local * world)

    def set_step(self, n_local: int, n_global: int) -> None:
        self.weight = n_local / n_global
        self.global_samples = n_global


class _WeightedAllReduce(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: ``(sum_r w_r g_r) / w_q`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group, weight: float) -> torch.Tensor:
        ctx.group, ctx.weight = group, weight
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.mul(ctx.weight)
        dist.all_reduce(g, group=ctx.group)
        return g.div_(ctx.weight), None, None


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the union of all ranks' batches, for any input ``[N, C, *]`` (1d, 2d, 3d)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, sync: BNSync | None = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.sync = sync

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        sync = self.sync
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or sync is None or sync.world_size == 1:
            return super().forward(x)  # eval (running statistics) or nothing to synchronise with
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # fp32 statistics for half inputs (autocast), as the fused kernels keep them; float32 and
        # float64 inputs keep their own precision
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        spatial = xf[0, 0].numel() if x.dim() > 2 else 1
        n_global = sync.global_samples if sync.global_samples is not None else x.shape[0] * sync.world_size
        count = float(n_global * spatial)
        mean = _WeightedAllReduce.apply(xf.sum(dims), sync.group, sync.weight) / count
        d = xf - mean.view(shape)
        var = _WeightedAllReduce.apply((d * d).sum(dims), sync.group, sync.weight) / count
        y = d * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats and factor != 0.0:
            with torch.no_grad():
                unbiased = var.detach() * (count / max(count - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y.to(x.dtype)

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm, sync: BNSync) -> "AllReduceBatchNorm":
        """The same parameters and buffers (the very tensors: an optimizer built on the old module
        keeps working) behind a synchronised forward."""
        return _adopt(cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, sync=sync,
                          device=_device_of(bn)), bn)


def _adopt(new: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """``new`` takes over ``bn``'s very parameter and buffer tensors and its training mode."""
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _device_of(m: nn.Module):
    for t in [*m.parameters(), *m.buffers()]:
        return t.device
    return None


def convert_sync_bn(model: nn.Module, ctx, impl: str = "auto") -> BNSync:
    """Make every batch norm of ``model`` synchronised across ``ctx``'s ranks, in place.

    ``impl``: ``auto`` or ``allreduce``, both :class:`AllReduceBatchNorm` on every device (see the
    module docstring for why not ``torch.nn.SyncBatchNorm``). Returns the :class:`BNSync` the
    executor updates every step."""
    if impl not in ("auto", "allreduce"):
        raise UserError(f"sync_bn_impl must be auto or allreduce (exact for any shard sizes), got {impl!r}")
    sync = BNSync(group=None, world_size=ctx.world_size)
    _replace_bn(model, lambda bn: AllReduceBatchNorm.from_bn(bn, sync))
    return sync


def _replace_bn(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        # a model's own nn.SyncBatchNorm is replaced too: its backward is inexact for unequal shards
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, AllReduceBatchNorm):
            setattr(module, name, make(child))
        else:
            _replace_bn(child, make)


def bypassed_bn(net: nn.Module) -> list[str]:
    """Parts of ``net`` that would skip a synchronised batch norm: those that read their batch
    norms' parameters directly instead of calling them (``--lean-blocks``, the fused head kernels),
    and units of a :class:`~pgl_fast.models.local_model.LocalModel` (what global steps run) that
    reach a batch norm which is not in the registered module tree (a swap made in the tree, as
    :func:`convert_sync_bn`'s, never reaches it)."""
    found = []
    for name, m in net.named_modules():
        if getattr(m, "lean", False):
            found.append(f"{name} (--lean-blocks)")
        if getattr(m, "use_kernels", False):
            found.append(f"{name} (fused head kernels)")
    registered = {id(m) for m in net.modules()}
    for i, u in enumerate(getattr(net, "units", ())):
        for m in u.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in registered:
                found.append(f"units[{i}] ({type(m).__name__} outside the module tree)")
    return found
