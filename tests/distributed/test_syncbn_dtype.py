"""AllReduceBatchNorm computes its statistics in the input's precision: float64 stays float64
(exact), half inputs (autocast's fp16 / bf16) get fp32 statistics as batch norm's kernels keep them.

The synchronised path runs in this process on a one-rank gloo group (its all-reduces are then the
identity), with the shard weight and global count of a one-rank step: the output must be plain batch
norm of the batch, written here with autograd ops."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pgl_fast.distributed.sync_bn import AllReduceBatchNorm, BNSync


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def synced_bn(C: int, dtype) -> AllReduceBatchNorm:
    # world_size 2 takes the synchronised path; set_step(n, n) makes this rank the whole batch
    sync = BNSync(group=None, world_size=2)
    bn = AllReduceBatchNorm(C, sync=sync, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, C))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, C))
    return bn


def plain_bn(x: torch.Tensor, weight, bias, eps=1e-5):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), mean.flatten()


def test_float64_statistics_are_float64(one_rank_group, one_thread):
    x = (torch.randn(5, 3, 4, 4, dtype=torch.float64) * 3 + 1e3)  # a large mean: fp32 statistics lose digits
    bn = synced_bn(3, torch.float64)
    bn.sync.set_step(5, 5)
    got = bn(x)
    want, mean = plain_bn(x, bn.weight.detach(), bn.bias.detach())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=0, atol=1e-11)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_inputs_get_fp32_statistics(one_rank_group, one_thread, half):
    x = (torch.randn(5, 3, 4, 4) * 3 + 10).to(half)
    bn = synced_bn(3, torch.float32)
    bn.sync.set_step(5, 5)
    got = bn(x)
    want, mean = plain_bn(x.double(), bn.weight.detach().double(), bn.bias.detach().double())
    assert got.dtype == half
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-2)  # the output's rounding to half
    # the statistics themselves: fp32 sums of the half values, far finer than a half mean
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, rtol=0, atol=1e-5)
