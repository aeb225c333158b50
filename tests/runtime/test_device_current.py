"""``--device cuda:N`` with N >= 1 in one process: the engine makes device N current wherever it
launches work (streams, events, graph capture and replay, Triton follow the current device).

On the CPU ``torch.cuda.device`` is replaced by a recorder, so what is checked is which device the
engine makes current around each launch site. On a machine with >= 2 GPUs (marked `cuda`): a
graphed run on cuda:1 equals the eager run there, and the caller's current device is left alone."""
import contextlib
import types

import pytest
import torch

from pgl_fast.core.methods import DGL
from pgl_fast.runtime import head_select as hs
from pgl_fast.runtime.device import device_context
from pgl_fast.runtime.graphs import GraphedLocalSteps

pytestmark = pytest.mark.usefixtures("one_thread")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


class CurrentDevice:
    """Stands in for ``torch.cuda.device``: records the stack of devices made current."""

    def __init__(self):
        self.stack, self.entered = [], []

    def __call__(self, index):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.stack.append(index)
                rec.entered.append(index)

            def __exit__(self, *exc):
                rec.stack.pop()

        return _Ctx()

    @property
    def current(self):
        return self.stack[-1] if self.stack else None


@pytest.fixture
def cur(monkeypatch):
    rec = CurrentDevice()
    monkeypatch.setattr(torch.cuda, "device", rec)
    return rec


def test_context_for_each_kind_of_device(cur):
    assert isinstance(device_context(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device_context("cuda"), contextlib.nullcontext)  # the current device, whichever it is
    with device_context("cuda:1"):
        assert cur.current == 1
    with device_context(torch.device("cuda", 0)):
        assert cur.current == 0
    assert cur.stack == []


def test_learner_steps_run_with_the_models_device_current(cur, tiny_model, tiny_learner):
    net = tiny_model(2)
    learner = tiny_learner(net, DGL())
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    seen = []
    unit = net.units[0]  # local steps call it through its block, global steps directly
    orig = unit.forward
    unit.forward = lambda h: (seen.append(cur.current), orig(h))[1]
    learner.device = torch.device("cuda", 1)  # the tensors stay on the CPU; only the context is checked
    learner.step(x, y)
    learner.global_step(x, y)
    assert seen == [1, 1], "a step ran with another device current than the model's"
    assert cur.stack == []  # and the caller's current device was given back


def test_graph_capture_and_head_timing_run_on_the_devices_own_context(cur, monkeypatch):
    dev1 = torch.device("cuda", 1)
    graphed = GraphedLocalSteps.__new__(GraphedLocalSteps)
    graphed._capture_on_device = lambda x, y, img: cur.current
    assert graphed._capture(types.SimpleNamespace(device=dev1), None, None) == 1

    seen = {}
    monkeypatch.setattr(hs, "check_fused", lambda *a, **k: (seen.setdefault("check", cur.current),
                                                             {"ok": True, "error": None, "errors": {},
                                                              "tolerance": [0, 0]})[1])
    monkeypatch.setattr(hs, "time_stack", lambda head, shape, dtype, device, fn, **k: (seen.setdefault(fn.__name__, cur.current),
                                                               1.0 if fn is hs.eager_stack else 2.0)[1])
    head = types.SimpleNamespace(config="1c2f")
    rec = hs.select_head(head, (2, 16, 8, 8), torch.float32, dev1)
    assert rec["choice"] == "eager"
    assert seen == {"check": 1, "eager_stack": 1, "fused_stack": 1}


@two_gpus
@pytest.mark.cuda
def test_graphed_steps_on_the_second_gpu_equal_eager_and_leave_device_0_current(tiny_model, tiny_learner):
    torch.cuda.set_device(0)
    runs = []
    for graphs in (True, False):
        net = tiny_model(3, device="cuda:1")
        learner = tiny_learner(net, DGL(), cuda_graphs=graphs)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            learner.local_step(torch.randn(4, 3, 8, 8, generator=g).to("cuda:1"),
                               torch.randint(0, 10, (4,), generator=g).to("cuda:1"))
        learner.evaluate([(torch.randn(4, 3, 8, 8).to("cuda:1"), torch.randint(0, 10, (4,)).to("cuda:1"))])
        assert torch.cuda.current_device() == 0
        runs.append(learner)
    torch.cuda.synchronize(1)
    for (n, p), (_, q) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
