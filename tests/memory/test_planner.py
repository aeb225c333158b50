"""The memory planner: its extrapolated predictions against direct measurements, its choice under a
budget, and the CLI around it."""
import json

import pytest

from pgl_fast.memory import planner
from pgl_fast.errors import UserError
from pgl_fast.memory.profile import build_step, measure_step
from pgl_fast.train import main

KW = dict(arch="resnet14", J=7, aux="1c2f", image_size=16, split="layerwise")


pytestmark = pytest.mark.usefixtures("one_thread")


def _direct(kind, seg, batch):
    setup = build_step(kind, batch=batch, device="cpu", head_kernels="eager", **KW)
    if seg is not None:
        setup.executor.segments = planner.candidate_segments(seg, setup.net)
    setup.warm_up(2)
    return measure_step(setup, steps=1, measure="tracker")["peak_bytes"]


def test_predictions_match_direct_measurement():
    batch = 48
    pred = planner.predict(method="pgl", batch=batch, **KW)
    # never under by more than 2%; over by at most 8% (parameter gradients are counted as batch-sized
    # backward temporaries for the instant before they are accumulated: a safe, shrinking overshoot)
    direct = _direct("local", None, batch)
    assert 0.98 * direct <= pred["local"] <= 1.08 * direct
    for cand in planner.CANDIDATES:
        direct = _direct("global", cand, batch)
        assert 0.98 * direct <= pred["global"][cand] <= 1.08 * direct, (cand, pred["global"][cand], direct)
    # checkpointing must pay off at all
    assert min(pred["global"][c] for c in ("modules", "units", "coarse")) < 0.7 * pred["global"]["none"]


def test_choice_under_budgets():
    pred = {"batch": 8, "local": 50 * 2**20,
            "global": {"none": 400 * 2**20, "modules": 120 * 2**20, "units": 110 * 2**20, "coarse": 150 * 2**20}}
    assert planner.choose(pred, None)[0] == "units"
    assert planner.choose(pred, 500)[0] == "none"
    # the fastest that fits: coarse when it does, modules before units
    assert planner.choose(pred, 160)[0] == "coarse"
    assert planner.choose(pred, 130)[0] == "modules"
    assert planner.choose(pred, 115)[0] == "units"
    with pytest.raises(UserError, match="smallest predicted global-step peak is 110 MiB"):
        planner.choose(pred, 100)
    with pytest.raises(UserError, match="even the local steps"):
        planner.choose(pred, 40)


def test_choice_within_factor_of_local_peak():
    M = 2**20
    pred = {"batch": 8, "local": 100 * M,
            "global": {"none": 300 * M, "modules": 120 * M, "units": 110 * M, "coarse": 124 * M}}
    assert planner.choose(pred, factor=1.25)[0] == "coarse"   # 124 <= 125: the fastest that fits
    assert planner.choose(pred, factor=1.2)[0] == "modules"   # coarse over, modules 120 <= 120
    assert planner.choose(pred, factor=3.0)[0] == "none"
    choice, why = planner.choose(pred, factor=1.05)           # nothing fits: the smallest
    assert choice == "units" and "nothing fits" in why
    # equal predictions (modules = units where every module is one unit): the faster one
    tie = dict(pred, **{"global": {"none": 300 * M, "modules": 110 * M, "units": 110 * M, "coarse": 150 * M}})
    assert planner.choose(tie, factor=1.0)[0] == "modules" and planner.choose(tie)[0] == "modules"
    # a budget is absolute and wins over the factor
    assert planner.choose(pred, 1000, factor=1.25)[0] == "none"


def test_predictions_are_cached_per_configuration():
    kw = dict(method="pgl", arch="resnet8", J=2, aux="1c2f", split="even", candidates=("none",))
    a = planner.predict(batch=16, **kw)
    a["global"]["none"] = -1  # a caller's changes never reach the cache
    b = planner.predict(batch=16, **kw)
    assert b["global"]["none"] > 0
    c = planner.predict(batch=32, **kw)
    assert c["global"]["none"] > b["global"]["none"] and c["local"] > b["local"]


def test_coarse_segments_cover_all_units_in_order():
    from pgl_fast.models.presets import cifar_resnet

    segs = planner.coarse_segments(cifar_resnet("resnet110", 1, aux=None))
    assert segs[0][0] == 0 and segs[-1][1] == 55
    assert all(a < b for a, b in segs) and all(segs[i][1] == segs[i + 1][0] for i in range(len(segs) - 1))
    assert 5 <= len(segs) <= 9


def test_plan_flag_and_budget_run(tmp_path, capsys):
    base = ["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16", "--arch", "resnet8",
            "-J", "4", "--split", "layerwise", "-b", "16", "--lr", "0.05", "--method", "pgl", "-P", "1", "-Q", "1"]
    assert main(base + ["--plan"]) == 0
    out = capsys.readouterr().out
    assert "local steps" in out and "checkpoint modules" in out and out.count("<- will run") == 1
    assert main(base + ["--memory-budget", "0.01", "-o", str(tmp_path / "x")]) == 2
    assert "--memory-budget" in capsys.readouterr().err
    assert main(base + ["--memory-budget", "100000", "--epochs", "2", "-o", str(tmp_path / "ok")]) == 0
    header = json.loads((tmp_path / "ok" / "header.json").read_text())
    assert header["memory_plan"]["choice"] == "none" and header["global_segments"] is None
    assert header["memory_plan"]["budget_mib"] == 100000
