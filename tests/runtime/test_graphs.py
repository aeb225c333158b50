"""CUDA-graph local steps. On the CPU: the warm-up-and-undo machinery the capture relies on. On a
GPU (marked `cuda`): N graphed local steps give the same losses and parameters as N eager steps."""

import copy

import pytest
import torch

from pgl_fast.core.learner import StepStats
from pgl_fast.core.methods import PGL
from pgl_fast.runtime.graphs import InPlaceSnapshot, training_state_tensors

from helpers import tiny_learner, tiny_resnet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")


def _setup(device="cpu", aux="1c2f", amp=None, seed=0, cuda_graphs=False):
    net = tiny_resnet(4, seed=seed, image_size=16, split="layerwise", aux=aux, device=device)
    learner = tiny_learner(net, PGL(1, 1), amp=amp, cuda_graphs=cuda_graphs)
    return net, learner, learner.stats


def _batches(n, device, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(n)]


def test_warmup_is_undone_in_place():
    net, learner, stats = _setup()
    ref_net, ref_learner, ref_stats = _setup()
    batches = _batches(3, "cpu")
    learner.local_step(*batches[0])  # momentum buffers non-trivial before the snapshot
    ref_learner.local_step(*batches[0])
    tensors = training_state_tensors(learner, stats)
    ptrs = [t.data_ptr() for t in tensors]
    snap = InPlaceSnapshot(tensors)
    for _ in range(2):  # the "warm-up"
        learner.local_step(*batches[1])
    snap.restore()
    assert [t.data_ptr() for t in training_state_tensors(learner, stats)] == ptrs  # same tensors, same memory
    learner.local_step(*batches[2])
    ref_learner.local_step(*batches[2])
    for (n, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        assert torch.equal(p, q), n
    for (n, b), (_, c) in zip(net.named_buffers(), ref_net.named_buffers()):
        assert torch.equal(b, c), n
    assert stats.read() == ref_stats.read()


def test_step_statistics_have_no_host_side_counters():
    """Replays of a captured step only update tensors, in place: every counter the step touches must
    be one of StepStats' tensors, still at the same address afterwards, holding the right values."""
    net, learner, stats = _setup()
    ref_net = copy.deepcopy(net)
    x, y = _batches(1, "cpu")[0]
    fields = vars(stats)
    before = {k: (v.data_ptr(), v.clone()) for k, v in fields.items()}
    assert set(fields) == set(StepStats._FIELDS) and all(torch.is_tensor(v) for v in fields.values())
    # independent reference: module j's loss is computed before any module's update (inputs are
    # detached and module j's parameters are only stepped after its own backward)
    with torch.no_grad():
        h, want = x, []
        for j in range(net.J):
            h = ref_net.blocks[j](h)
            out = ref_net.heads[j](h) if j < net.J - 1 else ref_net.classifier(h)
            want.append(torch.nn.functional.cross_entropy(out, y).item())
        correct = int((out.argmax(1) == y).sum())
    learner.local_step(x, y)
    after = vars(stats)
    assert set(after) == set(before)
    for k, (ptr, old) in before.items():
        assert torch.is_tensor(after[k]) and after[k].data_ptr() == ptr, f"{k} was replaced, not updated in place"
        assert after[k].dtype == old.dtype and after[k].shape == old.shape, k
    assert stats.loss_sum.tolist() == pytest.approx([w * 8 for w in want], rel=1e-5)
    assert int(stats.samples_t) == 8 and int(stats.step_t) == 1
    assert int(stats.final_correct) == correct
    assert stats.first_bad.tolist() == stats.first_bad_grad.tolist() == [-1] * net.J
    assert stats.read()["samples"] == 8


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("amp,tol", [(None, 1e-5), (torch.bfloat16, 2e-2)])
def test_graphed_local_steps_match_eager(amp, tol):
    from pgl_fast.runtime.graphs import GraphedLocalSteps

    net, learner, stats = _setup("cuda", amp=amp, cuda_graphs=True)
    ref_net, ref_learner, ref_stats = _setup("cuda", amp=amp)
    assert isinstance(learner.graphed, GraphedLocalSteps) and ref_learner.graphed is None
    batches = _batches(6, "cuda") + _batches(2, "cuda", batch=5, seed=7)  # and a partial batch shape
    for x, y in batches:
        learner.local_step(x, y)  # replays the captured graph
        ref_learner.local_step(x, y)
    torch.cuda.synchronize()
    assert learner.graphed.captures == 2
    got, ref = stats.read(), ref_stats.read()
    assert got["samples"] == ref["samples"] == 46
    assert got["losses"] == pytest.approx(ref["losses"], rel=tol, abs=tol)
    for (n, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=n)


def _fake_cuda_counters(monkeypatch, allocated, reserved, segments=()):
    """The allocator's counters as a graphed epoch leaves them, on a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *a, **k: list(segments))


def _graphs_after_capture(capture_peaks: dict, outside=(0, 0), pool=(0, 7)):
    """A GraphedLocalSteps as its captures leave it (the capture itself needs a GPU)."""
    from pgl_fast.runtime.graphs import GraphedLocalSteps

    g = object.__new__(GraphedLocalSteps)
    g.pool = pool
    g.capture_peak_bytes = dict(capture_peaks)
    g.capture_reserved_bytes = {k: v + 2**20 for k, v in capture_peaks.items()}
    g._replayed, g._outside_peak = set(), outside
    return g


def test_pool_reserved_bytes_counts_only_the_graph_pool(monkeypatch):
    from pgl_fast.runtime.graphs import pool_reserved_bytes

    segs = [{"segment_pool_id": (0, 7), "total_size": 2 * 2**20}, {"segment_pool_id": (0, 0), "total_size": 2**30},
            {"segment_pool_id": [0, 7], "total_size": 2**20}]
    _fake_cuda_counters(monkeypatch, 0, 0, segs)
    assert pool_reserved_bytes((0, 7)) == 3 * 2**20


def test_graphed_epoch_reports_the_capture_peak(monkeypatch):
    from pgl_fast.training.metrics import PeakMemory

    mib = 2**20
    # replays never allocate: the counter saw only 100 MiB, the capture of batch 64 held 700 MiB
    _fake_cuda_counters(monkeypatch, 100 * mib, 150 * mib, [{"segment_pool_id": (0, 7), "total_size": 600 * mib}])
    graphs = _graphs_after_capture({64: 700 * mib, 10: 200 * mib}, outside=(120 * mib, 130 * mib))
    memory = PeakMemory(torch.device("cuda"), graphs=graphs)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    memory.reset()
    assert graphs._outside_peak == (0, 0)
    graphs._replayed.add(10)  # only the partial-batch graph replayed in this window
    r = memory.read()
    assert r["kind"] == "cuda_allocated+graph_capture_peak"
    assert r["peak_mib"] == 200 and r["peak_reserved_mib"] == 201 and r["graph_pool_mib"] == 600
    graphs._replayed.add(64)
    graphs._outside_peak = (900 * mib, 0)  # a peak before a capture's reset erased it from the counter
    assert memory.read()["peak_mib"] == 900
    memory.reset()  # a global (eager) epoch: no replay, the plain counter
    r = memory.read()
    assert r["kind"] == "cuda_allocated" and r["peak_mib"] == 100 and r["graph_pool_mib"] is None
