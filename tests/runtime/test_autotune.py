"""--cpu-tune auto (the default): a run is tuned only when it is long enough (the threshold computed
here by hand from the number of timed steps), a short default run trains exactly as --cpu-tune off;
choices follow the timings, --compile only where its measured time saved exceeds its compile time,
forced flags win and are never measured, results are cached per machine and shape, the run's random
streams are untouched, a resume keeps the recorded choice, and header.json records the decision
with every timing while the learner trains with it."""
import json

import pytest
import torch

from pgl_fast.config.build import build_learner
from pgl_fast.config import TrainConfig
from pgl_fast.errors import UserError
from pgl_fast.runtime import autotune
from pgl_fast.train import main

from helpers import tiny_cli_args

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = {"arch": "resnet8", "J": 4}


def _tiny():
    cfg = TrainConfig(arch="resnet8", modules=4, split="layerwise", method="dgl", batch_size=8, lr=0.05)
    from pgl_fast.config.build import build_model

    return cfg, build_model(cfg, 10, 16)


def _tune(tmp_path, monkeypatch, forced=None, shape=SHAPE, built=None, steps=None, compile_blocker="not offered",
          step_kinds=1):
    monkeypatch.setenv("PGL_FAST_CACHE_DIR", str(tmp_path))
    cfg, net = built or _tiny()

    def build(n, cl, compile=False):
        assert not compile  # these tests never compile for real (a minute per network on a CPU)
        learner = build_learner(TrainConfig(**{**cfg.__dict__, "channels_last": cl}), n)
        learner.start_epoch(0)
        return learner

    def make_opt(ps, kernel):
        return torch.optim.SGD(ps, lr=0.1, fused=kernel == "fused", foreach=kernel == "foreach" or None)

    return autotune.tune(net=net, build=build, make_optimizer=make_opt, shape=shape, batch=8, image_size=16,
                         forced=forced or {}, steps=steps, compile_blocker=compile_blocker, step_kinds=step_kinds)


def fake_timings(monkeypatch, steps: dict, opt: dict, compile=None):
    calls = []

    def measure_compile(build, net, choice, b, image_size, rounds=None):
        calls.append("compile")
        return dict(compile)

    def time_steps(make_learner, variants, x, y, rounds=3):
        calls.append(sorted(variants))
        return {k: steps[k] for k in variants}

    monkeypatch.setattr(autotune, "time_steps", time_steps)
    monkeypatch.setattr(autotune, "time_optimizer_kernels", lambda params, make, rounds=20: dict(opt))
    monkeypatch.setattr(autotune, "thread_candidates", lambda: [1, 2])
    monkeypatch.setattr(autotune, "measure_compile", measure_compile)
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
    assert len(calls) == 3  # measured anew: a measurement around a forced value is not reused without it
    _tune(tmp_path, monkeypatch, shape={**SHAPE, "J": 8})  # another shape: measured anew
    assert len(calls) == 5


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


# two thread counts and two memory formats, each timed in 1 warm-up + 3 rounds at the run's batch of 8
# (under MAX_BATCH): 16 steps; two optimizer kernels, 1 + 20 steps each, counted as 42 training steps;
# a run is tuned only when what is measured is at most 0.05 of it
@pytest.mark.parametrize("forced, threshold", [
    ({}, (16 + 42) * 20),
    ({"optimizer_kernel": "fused"}, 16 * 20),
    ({"threads": 1}, (8 + 42) * 20),
    ({"threads": 1, "channels_last": True}, 42 * 20),  # only the optimizer free: its steps alone count
])
def test_short_runs_are_not_measured(tmp_path, monkeypatch, forced, threshold):
    calls = fake_timings(monkeypatch, {"1": 2.0, "2": 1.0, "contiguous": 0.5, "channels_last": 0.7},
                         {"fused": 3e-4, "foreach": 1e-4})
    monkeypatch.setattr(autotune, "ROUNDS", 3)
    monkeypatch.setattr(autotune, "OPT_ROUNDS", 20)
    monkeypatch.setattr(autotune, "FRACTION", 0.05)
    short = _tune(tmp_path, monkeypatch, steps=threshold - 1, forced=forced)
    assert not short["tuned"] and f"run too short: {threshold - 1} steps" in short["reason"]
    assert short["choice"] == forced and calls == [] and not (tmp_path / "cpu_tune.json").exists()
    long = _tune(tmp_path, monkeypatch, steps=threshold, forced=forced)
    assert long["tuned"] and (tmp_path / "cpu_tune.json").exists()


@pytest.mark.parametrize("steps, compile_s, measured, chosen", [
    (2000, 10.0, False, False),  # 2000 x 0.5 s: a compile expected at 60 s is over 0.05 of the run, not tried
    (2400, 10.0, True, True),    # 1200 s run: tried; saves 0.1 s x 2400 = 240 s > 10 s
    (2400, 150.0, True, True),   # 150 s < 240 s saved (but see the two kinds of step below)
    (2400, 250.0, True, False),  # measured but its 250 s compile outweighs the 240 s it saves
])
def test_compile_only_where_it_pays(tmp_path, monkeypatch, steps, compile_s, measured, chosen):
    calls = fake_timings(monkeypatch, {"1": 2.0, "2": 1.0, "contiguous": 0.5, "channels_last": 0.7},
                         {"fused": 3e-4, "foreach": 1e-4},
                         compile={"compile_s": compile_s, "compiled_s": 0.1, "eager_s": 0.2})
    monkeypatch.setattr(autotune, "COMPILE_PRIOR_S", 60.0)
    out = _tune(tmp_path, monkeypatch, steps=steps, compile_blocker=None)
    assert out["estimate"]["run_s"] == pytest.approx(0.5 * steps)
    assert ("compile" in calls) is measured and out["choice"]["compile"] is chosen
    if measured:
        assert out["timings_s"]["compile"]["compile_s"] == compile_s
    # a blocked or forced compile is never measured
    calls.clear()
    blocked = _tune(tmp_path / "b", monkeypatch, steps=10**6, compile_blocker="--lean-blocks")
    assert "compile" not in calls and "compile" not in blocked["choice"] and "--lean-blocks" in blocked["estimate"]["compile"]
    assert _tune(tmp_path / "f", monkeypatch, steps=10**6, forced={"compile": True})["choice"]["compile"] is True
    if measured:  # a run that compiles two kinds of step (PGL) pays two compiles: 2 x 150 s > 240 s saved
        two = _tune(tmp_path, monkeypatch, steps=steps, compile_blocker=None, step_kinds=2)
        assert two["choice"]["compile"] is (2 * compile_s < 0.1 * steps) and "compiles of {:.0f} s".format(2 * compile_s) in two["estimate"]["compile"]
    assert "compile" not in calls


ARGS = tiny_cli_args(train=16, test=8, batch=8) + ["--no-head-eval", "--method", "dgl", "--epochs", "1"]


def test_default_short_run_trains_as_cpu_tune_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PGL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    assert main(ARGS + ["-o", str(tmp_path / "default")]) == 0
    assert main(ARGS + ["--cpu-tune", "off", "-o", str(tmp_path / "off")]) == 0
    header = json.loads((tmp_path / "default" / "header.json").read_text())["cpu_tune"]
    assert header["mode"] == "auto" and header["tuned"] is False and "run too short: 2 steps" in header["reason"]
    assert header["used"] == {"threads": 1, "channels_last": False, "optimizer_kernel": "fused", "compile": False}
    assert not (tmp_path / "cache").exists()

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "loss" in k or "acc" in k} for line in lines]
    assert losses("default") == losses("off")  # bit for bit


def test_cli_records_choice_and_trains_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PGL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "FRACTION", 100.0)  # the 2-step run counts as long enough
    monkeypatch.setattr(autotune, "COMPILE_PRIOR_S", 1e9)  # but not for a compile
    fake_timings(monkeypatch, {"1": 2.0, "2": 1.0, "contiguous": 0.9, "channels_last": 0.3},
                 {"fused": 3e-4, "foreach": 1e-4})
    import pgl_fast.train as train_mod

    built = []
    real = train_mod.build_learner
    monkeypatch.setattr(train_mod, "build_learner", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    assert main(ARGS + ["-o", str(tmp_path / "run")]) == 0  # the default: --cpu-tune auto
    assert torch.get_num_threads() == 1  # the run's thread count is not left behind
    header = json.loads((tmp_path / "run" / "header.json").read_text())
    tune = header["cpu_tune"]
    assert tune["tuned"] and tune["choice"] == {"threads": 2, "channels_last": True, "optimizer_kernel": "foreach",
                                                "compile": False}
    assert tune["timings_s"]["channels_last"] == {"contiguous": 0.9, "channels_last": 0.3}
    assert tune["estimate"]["compile"].startswith("not measured") and tune["used"]["compile"] is False
    learner = built[-1]
    assert learner.channels_last and all(o.kernel == "foreach" for o in learner.optimizers)
    assert header["config"]["channels_last"] is False and header["config"]["optimizer_kernel"] == "auto"

    # the resumed run keeps the recorded choice though the timings now favour the other one
    fake_timings(monkeypatch, {"1": 1.0, "2": 2.0, "contiguous": 0.3, "channels_last": 0.9},
                 {"fused": 1e-4, "foreach": 3e-4})
    assert main(ARGS + ["-o", str(tmp_path / "run"), "--resume", "auto"]) == 0
    tune = json.loads((tmp_path / "run" / "header.json").read_text())["cpu_tune"]
    assert tune["reason"].startswith("resumed") and tune["used"]["channels_last"] is True
    assert tune["used"]["optimizer_kernel"] == "foreach" and tune["used"]["threads"] == 2
    assert built[-1].channels_last and all(o.kernel == "foreach" for o in built[-1].optimizers)
