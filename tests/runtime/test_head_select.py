"""``--head-kernels auto``: the per-head choice by measurement (pgl_fast.runtime.head_select).

The check runs the real fused kernels (the Triton interpreter on the CPU) against float64 eager
heads; the timings are injected (a fake clock charged per call of each path), so the choice is
decided by known costs and the tests do not depend on how fast the interpreter is.
"""
import importlib.util
import json
import os

import pytest
import torch

from pgl_fast.runtime import head_select as hs
from pgl_fast.models.heads import AuxClassifier

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _needs_triton():
    pytest.importorskip("triton")
    from pgl_fast.kernels import triton_available

    ok, why = triton_available(DEVICE)
    if not ok:
        pytest.skip(why)


class FakeClock:
    """Charges ``cost[path]`` seconds per call of the fused or eager stack."""

    def __init__(self, fused_cost: float, eager_cost: float, fused_fn=hs.fused_stack):
        self.now, self.calls = 0.0, {"fused": 0, "eager": 0}
        self._fused_fn = fused_fn
        self.cost = {"fused": fused_cost, "eager": eager_cost}

    def fused(self, head, x):
        self.now += self.cost["fused"]
        self.calls["fused"] += 1
        return self._fused_fn(head, x)

    def eager(self, head, x):
        self.now += self.cost["eager"]
        self.calls["eager"] += 1
        return hs.eager_stack(head, x)

    def timer(self, step, device):
        t0 = self.now
        step()
        return self.now - t0


def _head(config="1c2f", c=16):
    torch.manual_seed(0)
    return AuxClassifier(config, c, 10).to(DEVICE)


def test_tolerances_are_the_kernel_tests_tolerances():
    path = os.path.join(REPO, "tests", "kernels", "test_conv_bn_relu.py")
    spec = importlib.util.spec_from_file_location("_kernel_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.TOLERANCES is hs.TOLERANCES  # one table, not two copies


@pytest.mark.parametrize("config,dtype", [("1c2f", torch.float32), ("2c2f", torch.bfloat16)])
def test_real_fused_head_passes_its_check(config, dtype):
    check = hs.check_fused(_head(config), (2, 16, 8, 8), dtype, DEVICE)
    assert check["error"] is None and check["ok"], check
    # every ConvBN of the stack is compared: output, input gradient and all parameter gradients
    n = 2 if config == "2c2f" else 1
    assert len(check["errors"]) == 5 * n
    assert all(v <= hs.TOLERANCES[dtype][0] for v in check["errors"].values())


@pytest.mark.parametrize("fused_cost,want", [(0.5, "triton"), (2.0, "eager")])
def test_faster_correct_path_is_chosen_and_both_timings_recorded(fused_cost, want):
    head = _head()
    clock = FakeClock(fused_cost, 1.0)
    before = [t.clone() for t in list(head.parameters()) + list(head.buffers())]
    rng = torch.get_rng_state()
    rec = hs.select_head(head, (2, 16, 8, 8), torch.float32, DEVICE, fused_fn=clock.fused, eager_fn=clock.eager,
                         timer=clock.timer)
    assert rec["check"]["ok"]
    assert rec["choice"] == want
    assert rec["fused_ms"] == pytest.approx(fused_cost * 1e3)
    assert rec["eager_ms"] == pytest.approx(1e3)
    assert rec["in_shape"] == [16, 8, 8] and rec["batch"] == 2 and rec["dtype"] == "float32"
    json.dumps(rec)  # goes into header.json as is
    # measured on copies with a private generator: the model and the global RNG are untouched
    for a, b in zip(before, list(head.parameters()) + list(head.buffers())):
        assert torch.equal(a, b)
    assert torch.equal(rng, torch.get_rng_state())


def test_wrong_fused_result_is_rejected_loudly():
    wrong = FakeClock(0.1, 1.0, fused_fn=lambda h, x: hs.fused_stack(h, x) * 1.001)
    with pytest.warns(UserWarning, match=r"1c2f head on input 16x8x8 \(batch 2, float32"):
        rec = hs.select_head(_head(), (2, 16, 8, 8), torch.float32, DEVICE, fused_fn=wrong.fused,
                             eager_fn=wrong.eager, timer=wrong.timer)
    assert not rec["check"]["ok"]
    assert rec["choice"] == "eager"  # although the wrong path was the faster one
    assert "disagree" in rec["reason"] and "convs.0" in rec["reason"]
    assert rec["fused_ms"] == pytest.approx(100) and rec["eager_ms"] == pytest.approx(1e3)


def test_fused_path_that_raises_is_rejected_loudly():
    def broken(head, x):
        raise RuntimeError("operation not permitted\nmore detail")

    clock = FakeClock(0.1, 1.0, fused_fn=broken)
    with pytest.warns(UserWarning, match="1c2f head on input 16x8x8.*RuntimeError: operation not permitted"):
        rec = hs.select_head(_head(), (2, 16, 8, 8), torch.float32, DEVICE, fused_fn=clock.fused,
                             eager_fn=clock.eager, timer=clock.timer)
    assert rec["choice"] == "eager" and rec["fused_ms"] is None and rec["eager_ms"] == pytest.approx(1e3)


def test_choice_is_per_head_shape_and_cached(tiny_model):
    # resnet8 layerwise J=4 at 8 px, AUX-ADAPT heads: two 2c2f heads on 16x8x8 share one
    # measurement, the 1c3f head on 32x4x4 gets its own; the fused path is wrong on 32 channels only
    net = tiny_model(4, split="layerwise", aux="adapt", device=DEVICE)

    def fused(head, x):
        out = hs.fused_stack(head, x)
        return out * 1.01 if head.config == "1c3f" else out

    clock = FakeClock(0.5, 1.0, fused_fn=fused)
    cache = {}
    with pytest.warns(UserWarning, match="1c3f head on input 32x4x4"):
        recs = hs.select_for_net(net, batch=2, dtype=torch.float32, device=DEVICE, fused_fn=clock.fused,
                                 eager_fn=clock.eager, timer=clock.timer, cache=cache)
    by_heads = {tuple(r["heads"]): r for r in recs}
    assert set(by_heads) == {(0, 1), (2,)}
    assert by_heads[(0, 1)]["choice"] == "triton" and by_heads[(0, 1)]["in_shape"] == [16, 8, 8]
    assert by_heads[(2,)]["choice"] == "eager" and by_heads[(2,)]["in_shape"] == [32, 4, 4]
    assert [h.use_kernels for h in net.heads] == [True, True, False]
    calls = dict(clock.calls)
    net.set_head_kernels(False)
    with pytest.warns(UserWarning, match="1c3f head on input 32x4x4"):  # the fallback is said again
        again = hs.select_for_net(net, batch=2, dtype=torch.float32, device=DEVICE, fused_fn=clock.fused,
                                  eager_fn=clock.eager, timer=clock.timer, cache=cache)
    assert clock.calls == calls  # nothing measured twice
    assert all(r["cached"] for r in again)
    assert [h.use_kernels for h in net.heads] == [True, True, False]


def test_forced_modes_and_cpu_auto(tiny_model):
    net = tiny_model(2)
    cpu = torch.device("cpu")
    kw = dict(batch=2, dtype=torch.float32, device=cpu)
    assert hs.configure_head_kernels(net, "triton", True, **kw) == {"mode": "triton", "resolved": "triton",
                                                                     "selection": None}
    assert net.heads[0].use_kernels
    assert hs.configure_head_kernels(net, "eager", False, **kw)["resolved"] == "eager"
    assert not net.heads[0].use_kernels


def test_auto_on_cpu_trains_eager_without_measuring(cli, monkeypatch):
    def never(*a, **k):
        raise AssertionError("auto measured on the CPU")

    monkeypatch.setattr(hs, "select_head", never)
    header = cli("--method", "dgl", "--epochs", "1", "--device", "cpu", "--head-kernels", "auto", train=16, test=8,
                 J=2, split="even", batch=8, progress=None).header
    assert header["head_kernels"] == "eager" and header["head_kernels_mode"] == "auto"
    assert header["head_kernel_selection"] is None


def test_cached_failure_still_warns(tiny_model):
    net = tiny_model(2, device=DEVICE)
    clock = FakeClock(0.5, 1.0, fused_fn=lambda h, x: hs.fused_stack(h, x) + 1.0)
    cache = {}
    kw = dict(batch=2, dtype=torch.float32, device=DEVICE, fused_fn=clock.fused, eager_fn=clock.eager,
              timer=clock.timer, cache=cache)
    with pytest.warns(UserWarning, match="failed its check"):
        hs.select_for_net(net, **kw)
    with pytest.warns(UserWarning, match="failed its check"):
        (rec,) = hs.select_for_net(net, **kw)
    assert rec["cached"] and rec["choice"] == "eager" and not net.heads[0].use_kernels
