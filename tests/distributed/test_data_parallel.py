"""Data parallel on gloo with 2 processes, against single-process runs.

One ``torchrun --standalone --nproc_per_node=2`` launch (a free port is picked by the rendezvous)
runs every scenario of ``dp_worker.py``; the references are computed here, in this process:

- with ``--sync-bn``: N steps of 2 ranks x B/2 equal N steps of 1 process x B, for dgl, infopro,
  bp and a pgl run crossing a phase switch (one local epoch, then one global epoch), with a last
  batch of 5 that splits 3 + 2 (the unequal-shard weighting);
- without it: what runs is per-rank batch norm, checked against an independent single-process
  emulation (each shard normalised by its own statistics, gradients combined by shard size), and
  shown to differ from the synchronised run;
- evaluation: the gathered accuracy, loss and sample count equal a single-process evaluation of
  the same weights on the whole test set;
- rank 0 checkpoints, every rank restores, and the run continues exactly;
- shard arithmetic and launch-environment errors need no processes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dp_worker as W
from pgl_fast.distributed import DistContext, eval_shard, global_batches, shard_batches, shard_sizes, steps_per_epoch
from pgl_fast.core.learner import frozen_bn_stats
from pgl_fast.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOL = dict(rtol=1e-4, atol=2e-5)  # fp32: the two runs sum the same numbers in a different order


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dp_worker.py"), str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def single(method: str):
    learner = W.build(method)
    _, stats, _ = W.train(method, learner)
    return learner.model, learner, stats


def assert_states_close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == torch.int64:
            assert torch.equal(a[k], b[k]), k  # num_batches_tracked
        else:
            torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **(tol or TOL))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


# -- --sync-bn: 2 ranks x B/2 == 1 process x B -----------------------------------------------------
@pytest.mark.parametrize("method", ["dgl", "pgl", "infopro", "bp", "pgl_hpff"])
def test_sync_bn_equals_single_process(ranks, method):
    net, _, stats = single(method)
    r0, r1 = (r[f"sync/{method}"] for r in ranks)
    assert_states_close(r0["model"], r1["model"], rtol=0, atol=0)  # the replicas never drift apart
    assert_states_close(r0["model"], net.state_dict())
    # the training statistics gathered over ranks are the single-process epoch's
    assert len(r0["stats"]) == len(stats) == W.EPOCHS[method]
    for got, want in zip(r0["stats"], stats):
        assert got["samples"] == want["samples"] == W.N_TRAIN
        assert got["train_acc"] == want["train_acc"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=1e-6)
    # the run really trained: a replica that skipped the steps would still match itself
    assert max_diff(W.build(method).model.state_dict(), net.state_dict()) > 1e-3


def test_buckets_overlap_compute(ranks):
    """Local steps: module j's gradients are in flight while module j+1 runs; it steps one module
    later. Global steps: every bucket is launched inside the backward, the last module's first (its
    gradients are complete first), before any module steps."""
    local = [("reduce", 0), ("reduce", 1), ("step", 0), ("reduce", 2), ("step", 1), ("step", 2)]
    in_backward = [("reduce", 2), ("reduce", 1), ("reduce", 0), ("step", 0), ("step", 1), ("step", 2)]
    assert ranks[0]["sync/dgl"]["events"] == [local]
    assert ranks[0]["sync/pgl"]["events"] == [local, in_backward]  # with heads: theirs were ready earlier
    assert ranks[0]["sync/bp"]["events"] == [in_backward]


# -- default: per-rank batch norm ----------------------------------------------------------------------
def emulate_per_rank_bn_dgl(world: int = 2):
    """Single-process DGL where each rank's shard is normalised by its own batch statistics: per
    module, every shard's forward and loss, gradients weighted by shard size, then the step; rank
    0's shard alone moves the running statistics (the others' forwards have them frozen)."""
    import torch.nn.functional as F

    from pgl_fast.data import BatchAugmenter, epoch_batches, make_generator, normalize

    learner = W.build("dgl")
    net = learner.model
    x_all, y_all, _, _ = W.data()
    gen, augment = make_generator(7), BatchAugmenter(W.SPEC)
    learner.start_epoch(0)
    for idx in epoch_batches(W.N_TRAIN, W.BATCH, generator=gen, drop_last=False):
        x = normalize(augment(x_all[idx], gen), W.SPEC)
        hs, ys = list(x.tensor_split(world)), list(y_all[idx].tensor_split(world))
        n = idx.numel()
        for j in range(W.J):
            for s in range(world):
                with frozen_bn_stats(net) if s > 0 else torch.enable_grad():
                    h = net.blocks[j](hs[s].detach())
                    if j < W.J - 1:
                        loss = learner.local_loss(j, h, ys[s])
                    else:
                        loss = F.cross_entropy(net.classifier(h), ys[s])
                (loss * (ys[s].numel() / n)).backward()
                hs[s] = h
            learner.step_module(j)
    return net


def test_default_is_per_rank_batch_norm(ranks):
    got = ranks[0]["local_bn/dgl"]["model"]
    assert_states_close(got, ranks[1]["local_bn/dgl"]["model"], rtol=0, atol=0)  # rank 0's buffers everywhere
    assert_states_close(got, emulate_per_rank_bn_dgl().state_dict())
    # and it is not what --sync-bn computes (so the comparison above can tell the two apart)
    assert max_diff(got, ranks[0]["sync/dgl"]["model"]) > 1e-3


# -- evaluation, checkpoints, rank-0 decisions --------------------------------------------------------
def test_evaluation_gathers_the_whole_test_set(ranks):
    learner = W.build("dgl")
    learner.model.load_state_dict(ranks[0]["sync/dgl"]["model"])
    want = learner.evaluate(W.test_batches())
    for r in ranks:
        got = r["eval"]
        assert got["test_samples"] == W.N_TEST  # each image once: 6 on rank 0, 5 on rank 1
        assert got["test_acc"] == want["test_acc"]
        assert got["head_acc"] == want["head_acc"]
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-6)


def test_trainer_data_wrapper_shards_like_the_scenarios(ranks):
    """``ShardedData`` around the Trainer's own data object: the same shards, augmentation, global
    batch sizes and test slices as the hand-written loop (so the same result, bit for bit)."""
    for r in ranks:
        got = r["sharded_data/dgl"]
        assert_states_close(got["model"], ranks[0]["sync/dgl"]["model"], rtol=0, atol=0)
        assert got["stats"] == ranks[0]["sync/dgl"]["stats"]
        assert got["eval"] == ranks[0]["eval"]


def test_rank0_checkpoint_restored_on_every_rank(ranks):
    """A mid-epoch checkpoint written by rank 0 alone, restored on both ranks, continues exactly:
    the same weights and the same epoch statistics as the uninterrupted run."""
    for r in ranks:
        assert_states_close(r["resumed/pgl"]["model"], ranks[0]["sync/pgl"]["model"], rtol=0, atol=0)
        assert r["resumed/pgl"]["stats"] == ranks[0]["sync/pgl"]["stats"]


def test_rank0_decides_and_its_errors_reach_every_rank(ranks):
    for r in ranks:
        assert r["on_main_error"] == "--resume x.pt: no such checkpoint file"
        assert r["on_main_value"] == "decided by rank 0"


# -- no processes needed ---------------------------------------------------------------------------
@pytest.mark.parametrize("n, B, world", [(21, 8, 2), (50, 16, 3), (7, 7, 4), (10, 4, 3), (9, 4, 2)])
def test_shard_union_is_the_epoch(n, B, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard_batches(perm, r, world, batch_size=B) for r in range(world)]
    kept = global_batches(perm, B, world)
    assert all(len(s) == len(kept) == steps_per_epoch(n, B, world, drop_last=False) for s in shards)
    for step, g in enumerate(kept):
        # step by step the ranks' pieces, in rank order, are the global batch
        assert torch.equal(torch.cat([s[step] for s in shards]), g)
        assert [s[step].numel() for s in shards] == shard_sizes(g.numel(), world)
    union = torch.cat([torch.cat(s) for s in shards]).sort().values
    dropped = n % B if 0 < n % B < world else 0  # a last batch with fewer images than ranks
    assert torch.equal(union, torch.cat(kept).sort().values)
    assert union.numel() == n - dropped
    if not dropped:
        assert torch.equal(union, torch.arange(n))


def test_single_process_context_is_a_plain_learner(one_thread):
    """Outside torchrun the data-parallel learner is exactly the learner (bit for bit)."""
    a, b = W.build("pgl"), W.build("pgl", DistContext())
    W.train("pgl", a)
    W.train("pgl", b)
    assert_states_close(b.model.state_dict(), a.model.state_dict(), rtol=0, atol=0)


def test_sync_bn_refuses_parts_that_bypass_batch_norm():
    from pgl_fast.distributed.sync_bn import bypassed_bn

    learner = W.build("dgl")
    assert bypassed_bn(learner.model) == []
    learner.model.set_lean_blocks(True)
    assert bypassed_bn(learner.model) and all("--lean-blocks" in b for b in bypassed_bn(learner.model))


def test_eval_shards_cover_the_test_set_once():
    for n, world in [(11, 2), (10000, 3), (2, 4)]:
        ranges = [eval_shard(n, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_batch_smaller_than_world_is_a_user_error():
    with pytest.raises(UserError, match="--batch-size 2 is smaller than the 4 ranks"):
        shard_batches(torch.arange(10), 0, 4, batch_size=2)


def test_launch_environment():
    assert DistContext.from_env(device="cpu", env={}).world_size == 1  # not launched: one process
    with pytest.raises(UserError, match="LOCAL_RANK is not set"):
        DistContext.from_env(device="cpu", env={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="RANK=3 is not in 0..WORLD_SIZE-1"):
        DistContext.from_env(device="cpu", env={"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not an integer"):
        DistContext.from_env(device="cpu", env={"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        DistContext.from_env(device="cpu", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="nccl needs CUDA"):
        DistContext.from_env(device="cpu", backend="nccl",
                             env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    single = DistContext.from_env(device="cpu", env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert single.world_size == 1 and single.is_main and single.all_reduce_sum([3]) == [3.0]
