"""--cpu-tune auto: choices follow the timings, forced flags win and are never measured, results are
cached per machine and shape, the run's random streams are untouched, and header.json records
the choice with every timing while the learner trains with it."""
import json

import pytest
import torch

from pgl_fast.build import build_learner
from pgl_fast.config import TrainConfig
from pgl_fast.errors import UserError
from pgl_fast.runtime import autotune
from pgl_fast.train import main

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = {"arch": "resnet8", "J": 4}


def _tiny():
    cfg = TrainConfig(arch="resnet8", modules=4, split="layerwise", method="dgl", batch_size=8, lr=0.05)
    from pgl_fast.build import build_model

    return cfg, build_model(cfg, 10, 16)


def _tune(tmp_path, monkeypatch, forced=None, shape=SHAPE, built=None):
    monkeypatch.setenv("PGL_FAST_CACHE_DIR", str(tmp_path))
    cfg, net = built or _tiny()

    def build(n, cl):
        learner = build_learner(TrainConfig(**{**cfg.__dict__, "channels_last": cl}), n)
        learner.start_epoch(0)
        return learner

    def make_opt(ps, kernel):
        return torch.optim.SGD(ps, lr=0.1, fused=kernel == "fused", foreach=kernel == "foreach" or None)

    return autotune.tune(net=net, build=build, make_optimizer=make_opt, shape=shape, batch=8, image_size=16,
                         forced=forced or {})


def fake_timings(monkeypatch, steps: dict, opt: dict):
    calls = []

    def time_steps(make_learner, variants, x, y, rounds=3):
        calls.append(sorted(variants))
        return {k: steps[k] for k in variants}

    monkeypatch.setattr(autotune, "time_steps", time_steps)
    monkeypatch.setattr(autotune, "time_optimizer_kernels", lambda params, make, rounds=20: dict(opt))
    monkeypatch.setattr(autotune, "thread_candidates", lambda: [1, 2])
    return calls


def test_choice_is_the_fastest_of_each(tmp_path, monkeypatch):
    fake_timings(monkeypatch, {"1": 2.0, "2": 1.0, "contiguous": 0.5, "channels_last": 0.7},
                 {"fused": 3e-4, "foreach": 1e-4})
    out = _tune(tmp_path, monkeypatch)
    assert out["choice"] == {"threads": 2, "channels_last": False, "optimizer_kernel": "foreach"}
    assert out["timings_s"]["channels_last"] == {"contiguous": 0.5, "channels_last": 0.7}
    assert not out["cached"] and out["forced"] == []


def test_forced_flags_are_not_measured_and_win(tmp_path, monkeypatch):
    calls = fake_timings(monkeypatch, {"1": 2.0, "2": 1.0, "contiguous": 0.5, "channels_last": 0.7},
                         {"fused": 3e-4, "foreach": 1e-4})
    out = _tune(tmp_path, monkeypatch, forced={"threads": 1, "optimizer_kernel": "fused"})
    assert out["choice"] == {"threads": 1, "channels_last": False, "optimizer_kernel": "fused"}
    assert calls == [["channels_last", "contiguous"]]  # only the free factor was timed
    assert set(out["timings_s"]) == {"channels_last"}


def test_cached_per_machine_and_shape(tmp_path, monkeypatch):
    calls = fake_timings(monkeypatch, {"1": 2.0, "2": 1.0, "contiguous": 0.5, "channels_last": 0.7},
                         {"fused": 3e-4, "foreach": 1e-4})
    first = _tune(tmp_path, monkeypatch)
    again = _tune(tmp_path, monkeypatch)
    assert len(calls) == 2 and again["cached"] and again["choice"] == first["choice"]
    # a forced flag wins over the cached measurement too
    assert _tune(tmp_path, monkeypatch, forced={"channels_last": True})["choice"]["channels_last"] is True
    _tune(tmp_path, monkeypatch, shape={**SHAPE, "J": 8})  # another shape: measured anew
    assert len(calls) == 4


def test_real_measurement_keeps_random_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "ROUNDS", 1)
    monkeypatch.setattr(autotune, "OPT_ROUNDS", 2)
    built = _tiny()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    out = _tune(tmp_path, monkeypatch, built=built)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(out["timings_s"]["optimizer_kernel"]) == {"fused", "foreach"}
    assert all(t > 0 for t in out["timings_s"]["optimizer_kernel"].values())
    assert torch.get_num_threads() == 1  # the measurement leaves the thread count as it found it


def test_negative_threads_is_a_user_error():
    with pytest.raises(UserError, match="--threads: must be >= 0"):
        TrainConfig(threads=-1)


def test_cli_records_choice_and_trains_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PGL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    fake_timings(monkeypatch, {"1": 1.0, "2": 2.0, "contiguous": 0.9, "channels_last": 0.3},
                 {"fused": 3e-4, "foreach": 1e-4})
    import pgl_fast.train as train_mod

    built = []
    real = train_mod.build_learner
    monkeypatch.setattr(train_mod, "build_learner", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    args = ["--dataset", "synthetic", "--synthetic-train", "16", "--synthetic-test", "8", "--arch", "resnet8",
            "-J", "4", "--split", "layerwise", "-b", "8", "--lr", "0.05", "--progress", "off", "--no-head-eval",
            "--method", "dgl", "--epochs", "1", "--cpu-tune", "auto", "-o", str(tmp_path / "run")]
    assert main(args) == 0
    header = json.loads((tmp_path / "run" / "header.json").read_text())
    tune = header["cpu_tune"]
    assert tune["choice"] == {"threads": 1, "channels_last": True, "optimizer_kernel": "foreach"}
    assert tune["timings_s"]["channels_last"] == {"contiguous": 0.9, "channels_last": 0.3}
    learner = built[-1]
    assert learner.channels_last and all(o.kernel == "foreach" for o in learner.optimizers)
    assert header["config"]["channels_last"] is False and header["config"]["optimizer_kernel"] == "auto"
