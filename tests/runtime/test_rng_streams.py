"""Dropout's random stream in every combination (pgl_fast.runtime.rng).

On the CPU: per-rank seeds are distinct and reproducible; the CUDA-graph warm-up (device-generic
part, run eagerly) leaves the CPU generator and the training state as they were, so the next step
draws the eager step's masks; a checkpoint restores each rank's own stream. On a GPU (marked
`cuda`): a graphed run with dropout equals the eager run, step for step."""
import copy

import pytest
import torch

from pgl_fast.core.methods import DGL
from pgl_fast.runtime.graphs import warm_up
from pgl_fast.runtime.rng import preserved_rng, rank_seed
from pgl_fast.training.checkpoint import restore_rank_rng
from pgl_fast.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")


def _batch(device="cpu", n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def test_rank_seeds_are_distinct_and_reproducible():
    seeds = [rank_seed(0, r) for r in range(64)]
    assert len(set(seeds)) == 64 and 0 not in seeds  # no rank keeps the shared seed's stream
    assert seeds == [rank_seed(0, r) for r in range(64)]
    assert rank_seed(1, 0) != rank_seed(0, 0) and rank_seed(0, 1, 2, 3) != rank_seed(0, 1, 2, 4)
    assert all(0 <= s < 2 ** 64 for s in seeds)
    torch.manual_seed(seeds[-1])  # a valid seed for torch's generators


def test_preserved_rng_undoes_dropout_draws():
    before = torch.get_rng_state()
    with preserved_rng(torch.device("cpu")):
        torch.nn.functional.dropout(torch.ones(100), 0.5)
    assert torch.equal(torch.get_rng_state(), before)


def test_graph_warm_up_leaves_stream_and_state_as_eager(tiny_model, tiny_learner):
    """The warm-up run before a capture (here on the CPU, no side stream) must be invisible: the next
    step's dropout masks, parameters and statistics are those of a learner that never warmed up."""
    learner, ref = (tiny_learner(tiny_model(3, droprate=0.5), DGL()) for _ in range(2))
    x, y = _batch()
    # both learners draw from the one default generator: each step starts from the same state
    torch.manual_seed(5)
    learner.run_local_step(x, y)  # a step in, with momentum buffers and a moved stream
    torch.manual_seed(5)
    ref.run_local_step(x, y)
    rng = torch.get_rng_state()
    warm_up(learner, learner.stats, x, y, None, 3)
    assert torch.equal(torch.get_rng_state(), rng), "the warm-up advanced the generator"
    x2, y2 = _batch(seed=2)
    learner.run_local_step(x2, y2)  # draws from wherever the warm-up left the generator
    torch.set_rng_state(rng)
    ref.run_local_step(x2, y2)
    for (n, p), (_, q) in zip(learner.model.named_parameters(), ref.model.named_parameters()):
        assert torch.equal(p, q), n
    assert learner.stats.read() == ref.stats.read()


def test_each_rank_restores_its_own_stream():
    """A checkpoint's per-rank states: rank r gets rank r's, whatever rank 0 saved."""
    states = []
    for r in range(2):
        torch.manual_seed(100 + r)
        torch.rand(3)
        states.append(ckpt.rng_state())
    want = [copy.deepcopy(s["torch"]) for s in states]
    state = {"rng": states[0], "rng_ranks": states, "epoch": 1, "step": 0}
    for r in range(2):
        torch.manual_seed(7)
        assert restore_rank_rng(state, r, 2, seed=0) is None
        assert torch.equal(torch.get_rng_state(), want[r])
    # one process: the one state saved
    torch.manual_seed(7)
    restore_rank_rng({"rng": states[1], "rng_ranks": None, "epoch": 1, "step": 0}, 0, 1, seed=0)
    assert torch.equal(torch.get_rng_state(), want[1])


def test_checkpoint_from_another_world_size_gives_ranks_distinct_streams():
    state = {"rng": ckpt.rng_state(), "rng_ranks": None, "epoch": 3, "step": 5}
    got = []
    for r in range(2):
        note = restore_rank_rng(state, r, 2, seed=0)
        assert "(seed, rank, epoch, step)" in note
        got.append(torch.rand(4))
    assert not torch.equal(got[0], got[1])
    torch.manual_seed(rank_seed(0, 1, 3, 5))
    assert torch.equal(got[1], torch.rand(4))


@cuda
@pytest.mark.cuda
def test_graphed_dropout_run_equals_eager(tiny_model, tiny_learner):
    """Two batch sizes (two captures, the second mid-run): every replay draws the eager step's masks."""
    graphed, eager = (tiny_learner(tiny_model(3, droprate=0.5, device="cuda"), DGL(), cuda_graphs=g) for g in (True, False))
    batches = [_batch("cuda", seed=s) for s in range(4)] + [_batch("cuda", n=3, seed=9)] + [_batch("cuda", seed=5)]
    torch.cuda.manual_seed(123)
    for x, y in batches:
        graphed.local_step(x, y)
    state_after_graphed = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(123)
    for x, y in batches:
        eager.local_step(x, y)
    torch.cuda.synchronize()
    assert graphed.graphed.captures == 2
    assert torch.equal(torch.cuda.get_rng_state(), state_after_graphed)  # same Philox offset reached
    assert graphed.stats.read()["losses"] == pytest.approx(eager.stats.read()["losses"], rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(graphed.model.named_parameters(), eager.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
