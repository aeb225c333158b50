"""``--head-kernels auto`` on CUDA chooses fused or eager heads by timing; timing differs from start
to start and from rank to rank. These tests fix the measurement to give a different winner on
every call and check that a run's choice is nevertheless made once: a resumed run reuses its
checkpoint's choice, ranks take rank 0's, and ``--deterministic`` never times at all.

No GPU is needed: the device passed is ``cuda`` (what selects measuring), the measurement itself
is the fake, and the heads actually trained run eager on the CPU."""
import json
import os

import pytest
import torch

from pgl_fast.core.methods import DGL
from pgl_fast.runtime import head_select as hs
from pgl_fast.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.device("cuda")


class AlternatingMeasure:
    """Stands in for the measurement: winner ``eager`` on odd calls, ``triton`` on even ones."""

    def __init__(self):
        self.calls = 0

    def __call__(self, net, **kw):
        self.calls += 1
        choice = "eager" if self.calls % 2 else "triton"
        return [{"heads": [j for j, h in enumerate(net.heads) if hs.has_fused_convs(h)], "choice": choice}]


@pytest.fixture
def measure(monkeypatch):
    m = AlternatingMeasure()
    monkeypatch.setattr(hs, "select_for_net", m)
    return m


def _configure(net, **kw):
    return hs.configure_head_kernels(net, "auto", True, batch=4, dtype=torch.float32, device=CUDA, **kw)


def _flags(net):
    return [h.use_kernels for h in net.heads]


def test_resume_reuses_the_checkpoints_choice(measure, tmp_path, tiny_model, tiny_learner):
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    first = tiny_model(3)
    rec = _configure(first)
    assert _flags(first) == [False, False] and measure.calls == 1  # the first start measured: eager
    out = str(tmp_path / "run")
    learner = tiny_learner(first, DGL(), lr=0.05)
    Trainer(learner, data, None, epochs=1, batch_size=4, output_dir=out, progress="off", heartbeat=0,
            header={"head_kernels": rec["resolved"]}).fit()

    again = tiny_model(3)
    rec = _configure(again)
    assert _flags(again) == [True, True] and measure.calls == 2  # this start's timing says fused
    Trainer(tiny_learner(again, DGL(), lr=0.05), data, None, epochs=1, batch_size=4,
            output_dir=out, resume="auto", progress="off", heartbeat=0, header={"head_kernels": rec["resolved"]}).fit()
    assert _flags(again) == [False, False], "the resumed run took this start's timing, not its checkpoint's choice"
    with open(os.path.join(out, "header.json")) as f:
        header = json.load(f)
    assert header["head_kernels"] == "eager" and header["head_kernels_reused_from"].endswith(".pt")


def test_deterministic_chooses_without_timing(measure, monkeypatch, tiny_model):
    monkeypatch.setattr(hs, "default_timer", lambda *a, **k: pytest.fail("--deterministic timed the heads"))
    for _ in range(2):
        net = tiny_model(3)
        rec = _configure(net, deterministic=True)
        assert _flags(net) == [False, False]
        assert rec["resolved"] == "eager" and rec["selection"] is None and "without timing" in rec["rule"]
    assert measure.calls == 0
    assert hs.saved_choice(net) is None  # nothing measured, nothing for a resume to reuse


class FakeCtx:
    """A rank of a 2-rank launch: ``on_main`` runs the function on rank 0 only and hands every rank
    rank 0's result (``rank0_result`` stands for what rank 0 broadcast)."""

    distributed, world_size = True, 2

    def __init__(self, rank, rank0_result=None):
        self.rank, self.rank0_result = rank, rank0_result
        self.is_main = rank == 0

    def on_main(self, fn):
        return fn() if self.is_main else self.rank0_result


def test_ranks_take_rank0s_choice(measure, tiny_model):
    rank0 = tiny_model(3)
    rec0 = _configure(rank0, ctx=FakeCtx(0))  # rank 0 measures: eager
    assert measure.calls == 1 and _flags(rank0) == [False, False]
    rank1 = tiny_model(3)
    measure.calls = 1  # rank 1's own measurement would say triton
    rec1 = _configure(rank1, ctx=FakeCtx(1, rank0_result=rec0["selection"]))
    assert measure.calls == 1, "rank 1 measured for itself"
    assert _flags(rank1) == [False, False] and rec1["selection"] == rec0["selection"]
