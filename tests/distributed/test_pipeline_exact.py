"""The pipeline's global steps: an order of point-to-point operations that cannot deadlock on NCCL,
failure detection that does not trust NCCL's non-blocking ``wait``, and InfoPro's heads on every
stage in global epochs.

The deadlock check is a little rendezvous simulator written here: every rank runs its posted
operations in order, and an operation completes only when the neighbour has reached the matching
one (a send to rank b pairs with b's receive from rank a, in order). That is the worst case of
NCCL's point-to-point: one in-order stream per pair, a send past the buffer size blocking until its
receive is posted. A schedule that completes under it completes under any weaker blocking."""
from __future__ import annotations

import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pgl_fast.distributed.pipeline import PipelineError, build_stage, p2p_order, poll_works, run_local_group

from test_pipeline import ARCH, IMG, J, SIZES, _ok, snapshot

LAMBDAS = [(1.0, 0.5), (0.5, 0.8), (0.2, 1.0)]


# ---------------------------------------------------------------------------------------------
# the rendezvous simulator
# ---------------------------------------------------------------------------------------------
def rendezvous(seqs: dict) -> dict:
    """``seqs[rank]``: the rank's operations in posted order, each ``(kind, peer, payload...)``.
    Runs them with blocking rendezvous semantics; returns ``{rank: operation it is stuck at}``
    (empty: every rank finished). Paired operations must carry the same payload."""
    pos = {r: 0 for r in seqs}
    moved = True
    while moved:
        moved = False
        for a, seq in seqs.items():
            if pos[a] == len(seq) or seq[pos[a]][0] != "send":
                continue
            b = seq[pos[a]][1]
            other = seqs[b]
            if pos[b] < len(other) and other[pos[b]][:2] == ("recv", a):
                assert seq[pos[a]][2:] == other[pos[b]][2:], (a, seq[pos[a]], b, other[pos[b]])
                pos[a] += 1
                pos[b] += 1
                moved = True
    return {r: seq[pos[r]] for r, seq in seqs.items() if pos[r] < len(seq)}


def old_order(stage, S, M):
    """The order the pipeline used before: the last stage sent gradient m before receiving
    micro-batch m+1, while its predecessor posted every forward send before its first gradient
    receive."""
    first, last = stage == 0, stage == S - 1
    ops = []
    for m in range(M):
        if not first:
            ops.append(("recv", stage - 1, "act", m))
        if last and not first:
            ops.append(("send", stage - 1, "grad", m))
        elif not last:
            ops.append(("send", stage + 1, "act", m))
    if not last:
        for m in range(M):
            ops.append(("recv", stage + 1, "grad", m))
            if not first:
                ops.append(("send", stage - 1, "grad", m))
    return ops


def test_rendezvous_simulator_hand_cases():
    # a pair that both send first is stuck; send-then-receive against receive-then-send is not
    assert rendezvous({0: [("send", 1), ("recv", 1)], 1: [("send", 0), ("recv", 0)]}) == {0: ("send", 1),
                                                                                       1: ("send", 0)}
    assert rendezvous({0: [("send", 1), ("recv", 1)], 1: [("recv", 0), ("send", 0)]}) == {}
    # the old schedule deadlocks as soon as there are two micro-batches: the simulator sees it
    for S in (2, 3, 4):
        assert rendezvous({s: old_order(s, S, 1) for s in range(S)}) == {}
        for M in (2, 3, 4):
            assert rendezvous({s: old_order(s, S, M) for s in range(S)}) != {}, (S, M)


@pytest.mark.parametrize("S", [2, 3, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_pipeline_p2p_order_has_no_cycle(S, M):
    seqs = {s: p2p_order(s, S, M) for s in range(S)}
    assert rendezvous(seqs) == {}
    # every message is posted once on each side: M activations and M gradients per pair
    for s in range(S - 1):
        assert sum(op[:2] == ("send", s + 1) for op in seqs[s]) == M
        assert sum(op[:2] == ("send", s) for op in seqs[s + 1]) == M


# ---------------------------------------------------------------------------------------------
# ranks: the posted order recorded at the transport, InfoPro's global steps in float64
# ---------------------------------------------------------------------------------------------
def make_learner64(seed: int):
    """PGL with InfoPro's local loss, in float64."""
    from pgl_fast.core.learner import LocalLearner
    from pgl_fast.core.methods import PGL, InfoPro
    from pgl_fast.models.presets import cifar_resnet
    from pgl_fast.runtime.optim import sgd

    torch.manual_seed(seed)
    net = cifar_resnet(ARCH, J, image_size=IMG, split="even", aux="1c2f", decoders=True).double()
    learner = LocalLearner(net, PGL(1, 1, local=InfoPro(lambdas=LAMBDAS)),
                           optimizer=sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    return net, learner


def batches64(sizes=SIZES, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, IMG, IMG, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g),
             torch.rand(n, 3, IMG, IMG, generator=g, dtype=torch.float64)) for n in sizes]


def _record_p2p(trace: list):
    """Wraps the transport call: each batch of point-to-point operations as it is posted."""
    real = dist.batch_isend_irecv

    def recording(ops):
        kinds = {("send" if op.op is dist.isend else "recv", op.peer) for op in ops}
        assert len(kinds) == 1, kinds  # one message = one peer, one direction
        trace.append((*kinds.pop(), tuple(tuple(op.tensor.shape) for op in ops)))
        return real(ops)

    return mock.patch.object(dist, "batch_isend_irecv", recording)


def _global_worker(rank, world, plan, infopro64):
    """Global epochs of ``plan`` (micro-batch counts); the owned state after each and the
    operations each posted."""
    if infopro64:
        net, exe = make_learner64(0)
        data = batches64()
    else:
        from test_pipeline import batches, make_learner

        net, exe = make_learner(0, "dgl")
        data = batches([6, 6])
    runner = build_stage(exe, world, input_shape=(3, IMG, IMG), timeout_s=30)
    out = []
    for M in plan:
        runner.micro_batches = M
        trace: list = []
        with _record_p2p(trace):
            runner.train_epoch("global", [len(b[1]) for b in data], (lambda t: data[t]) if runner.first else None)
        out.append({"state": snapshot(net, runner.modules), "trace": trace})
    return out


def _check_traces(outs, plan, sizes):
    S = len(outs)
    for i, M in enumerate(plan):
        seqs = {r: o[i]["trace"] for r, o in enumerate(outs)}
        assert rendezvous(seqs) == {}, f"M={M}: the posted operations wait in a cycle"
        for r in range(S):  # and it is the documented order, step after step
            want = [op[:2] for n in sizes for op in p2p_order(r, S, min(M, n))]
            assert [op[:2] for op in seqs[r]] == want, r


def test_pipeline_posted_order_three_stages(one_thread):
    """Three ranks (an intermediate stage), three micro-batches: the operations each rank really
    posted complete under rendezvous semantics."""
    plan = [3]
    outs = _ok(run_local_group(_global_worker, 3, plan, False, timeout_s=60))
    _check_traces(outs, plan, [6, 6])


def _reference_infopro_global(plan):
    """PGL(InfoPro) global steps written out with plain autograd, micro-batched as the pipeline cuts:
    each head and decoder on its module's detached output (reconstruction of image01 plus the
    classification loss, InfoPro's weights), the final loss through the backbone, each scaled by
    its micro-batch's share of the batch."""
    net, learner = make_learner64(0)
    states = []
    for M in plan:
        for x, y, img in batches64():
            n = x.shape[0]
            for xm, ym, im in zip(x.tensor_split(M), y.tensor_split(M), img.tensor_split(M)):
                w = xm.shape[0] / n
                h = xm
                for j in range(J):
                    h = net.blocks[j](h)
                    if j < J - 1:
                        hd = h.detach()
                        rec = F.binary_cross_entropy_with_logits(net.decoders[j].logits(hd), im)
                        task = F.cross_entropy(net.heads[j](hd), ym)
                        ((LAMBDAS[j][0] * rec + LAMBDAS[j][1] * task) * w).backward()
                (F.cross_entropy(net.classifier(h), ym) * w).backward()
            for opt in learner.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        states.append(snapshot(net))
    return states


def test_pipeline_infopro_global_epochs_float64(one_thread):
    """PGL(local=InfoPro()) global epochs on two ranks: the image travels with every micro-batch and
    the result is the single-process one (float64, one and two micro-batches). The posted order of
    both ranks is checked on the way."""
    plan = [1, 2]
    outs = _ok(run_local_group(_global_worker, 2, plan, True, timeout_s=60))
    refs = _reference_infopro_global(plan)
    for i, M in enumerate(plan):
        merged = {k: v for o in outs for k, v in o[i]["state"].items()}
        assert merged.keys() == refs[i].keys()
        assert any(k.startswith("decoders.1.") for k in merged)  # stage 1's decoders trained
        for k, v in refs[i].items():
            torch.testing.assert_close(merged[k], v, rtol=1e-12, atol=1e-12, msg=f"M={M}: {k}")
    _check_traces(outs, plan, SIZES)


# ---------------------------------------------------------------------------------------------
# waiting on NCCL-like works: completion is polled, so the deadline and peer failures engage
# ---------------------------------------------------------------------------------------------
class _GpuLikeWork:
    """What an NCCL work looks like to the host: ``wait`` returns at once (it only orders the CUDA
    stream), ``is_completed`` turns true when the transfer is done (``after`` polls; None: never)."""

    def __init__(self, after=None):
        self.after, self.polls, self.waited = after, 0, 0

    def is_completed(self):
        self.polls += 1
        return self.after is not None and self.polls > self.after

    def wait(self, *a):
        self.waited += 1
        return True


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_poll_works_waits_for_completion_not_for_wait():
    clock = _Clock()
    works = [_GpuLikeWork(after=3), _GpuLikeWork(after=0)]
    assert poll_works(works, 10.0, lambda: None, clock=clock, sleep=clock.sleep) is None
    assert works[0].polls == 4 and all(w.waited == 1 for w in works)  # waited once done: orders the stream


def test_poll_works_deadline_and_peer_failure():
    clock = _Clock()
    calls = []
    res = poll_works([_GpuLikeWork()], 2.0, lambda: calls.append(clock.t), clock=clock, sleep=clock.sleep,
                     check_every_s=0.25)
    assert res == ("timeout", None)
    assert 2.0 <= clock.t < 2.01  # the poll interval stays short (1 ms at most)
    assert 7 <= len(calls) <= 10  # the failure flag read about every quarter second, not every poll
    clock = _Clock()
    flag = iter([None, None, "pipeline stage 2 (rank 2) failed: boom"])
    res = poll_works([_GpuLikeWork()], 60.0, lambda: next(flag), clock=clock, sleep=clock.sleep)
    assert res == ("failed", "pipeline stage 2 (rank 2) failed: boom")
    assert 0.5 <= clock.t < 0.6


def _nccl_like_worker(rank, world):
    """One stage, as NCCL's backend is seen: its works are polled. A work that never completes
    hits the deadline; with a peer's failure flag set it stops with that message at once."""
    from test_pipeline import make_learner

    from pgl_fast.distributed.pipeline import FAIL_KEY

    net, exe = make_learner(0, "dgl")
    with mock.patch.object(dist, "get_backend", lambda group=None: "nccl"):
        runner = build_stage(exe, 1, input_shape=(3, IMG, IMG), timeout_s=1.0)
    out = {}
    t0 = time.monotonic()
    try:
        runner._wait([_GpuLikeWork()], "a stuck transfer")
    except PipelineError as e:
        out["timeout"] = (str(e), time.monotonic() - t0)
    done = _GpuLikeWork(after=2)
    runner._wait([done], "a transfer")
    out["done"] = (done.polls, done.waited)
    runner.store.set(FAIL_KEY, "pipeline stage 1 (rank 1) failed: boom")
    runner.timeout_s = 60.0
    t0 = time.monotonic()
    try:
        runner._wait([_GpuLikeWork()], "a stuck transfer")
    except PipelineError as e:
        out["failed"] = (str(e), time.monotonic() - t0)
    return out


def test_pipeline_nccl_like_wait_engages_timeout_and_failure_flag(one_thread):
    (out,) = _ok(run_local_group(_nccl_like_worker, 1, timeout_s=30))
    assert "timeout" in out and "failed" in out, out
    msg, took = out["timeout"]
    assert msg == "pipeline stage 0 (rank 0): no progress on a stuck transfer for 1 s (a peer hung?)"
    assert 0.9 < took < 5
    assert out["done"] == (3, 1)
    msg, took = out["failed"]
    assert msg == ("pipeline stage 0 (rank 0) stopped while waiting for a stuck transfer: "
                   "pipeline stage 1 (rank 1) failed: boom")
    assert took < 5


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA GPU and NCCL")
def test_poll_works_on_a_real_nccl_work():
    """A one-rank NCCL group: a collective queued behind a long kernel reports not completed to the
    poll (while its ``wait`` returns at once), and completes once the kernel is done."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        t = torch.ones(1 << 20, device="cuda")
        dist.all_reduce(t)  # NCCL's communicator set up outside the timing
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e9))  # about a second of GPU time on the current stream
        work = dist.all_reduce(t, async_op=True)
        t0 = time.monotonic()
        work.wait()
        assert time.monotonic() - t0 < 0.5  # the host was not blocked: why wait() alone proves nothing
        assert poll_works([work], 0.05, lambda: None) == ("timeout", None)
        assert poll_works([work], 60.0, lambda: None) is None
        assert torch.equal(t, torch.ones_like(t))
    finally:
        dist.destroy_process_group()

