"""What ``--plan`` prints is what a run executes and what ``header.json`` records, for every way of
choosing the global-step checkpointing; and PGL's default keeps its global steps near the local
steps' peak while ``bp`` stays plain backprop.

The network is resnet8 cut layerwise into J=4 one-unit modules, so the segmentations are known by
hand: ``modules`` = ``units`` = one segment per unit, ``coarse`` = two segments of two units. What
runs is observed, not asked: the learner the run builds is captured, and every call of
``torch.utils.checkpoint`` in the global steps is counted (one per segment per step).
"""
import json
import re

import pytest

import pgl_fast.core.learner as learner_mod
import pgl_fast.train as train_mod
from pgl_fast.memory import planner
from pgl_fast.memory.profile import build_step, measure_step
from pgl_fast.train import main

from helpers import tiny_cli_args

ARGS = tiny_cli_args() + ["--no-head-eval"]
PGL = ["--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2"]  # epoch 1 local, epoch 2 global
BP = ["--method", "bp", "--epochs", "1"]
GLOBAL_STEPS = 2  # 32 images / batch 16, in the one global epoch of either
SEGMENTS = {"none": None, "modules": [[0, 1], [1, 2], [2, 3], [3, 4]], "units": [[0, 1], [1, 2], [2, 3], [3, 4]],
            "coarse": [[0, 2], [2, 4]]}
FACTOR = 1.25  # the documented default of --global-memory-factor


pytestmark = pytest.mark.usefixtures("one_thread")


def observed_run(monkeypatch, args):
    """Run the CLI; return (learner it trained with, checkpoint calls made by its steps)."""
    built, calls = [], [0]
    real_build, real_checkpoint = train_mod.build_learner, learner_mod.checkpoint

    def build(*a, **k):
        learner = real_build(*a, **k)
        built.append(learner)
        calls[0] = 0  # count only the steps of the learner built last
        return learner

    def counting_checkpoint(*a, **k):
        calls[0] += 1
        return real_checkpoint(*a, **k)

    monkeypatch.setattr(train_mod, "build_learner", build)
    monkeypatch.setattr(learner_mod, "checkpoint", counting_checkpoint)
    assert main(args) == 0
    # the planner's measuring steps all run before the run's learner is built (and build through
    # pgl_fast.config.build directly), so the count is of the run's own steps
    return built[-1], calls[0]


def planned_choice(args, capsys):
    assert main(args + ["--plan"]) == 0
    out = capsys.readouterr().out
    marked = [m.group(1) for m in re.finditer(r"global steps, checkpoint (\w+) .*<- will run", out)]
    assert len(marked) == 1, out
    return marked[0], out


@pytest.mark.parametrize("extra, expected", [
    (PGL, "modules"),  # default: none is 1.45x and coarse 1.27x the local peak here, modules 1.14x
    (BP, "none"),
    (PGL + ["--checkpoint-global"], "modules"),
    (PGL + ["--checkpoint-global", "--memory-budget", "100000"], "modules"),
    (PGL + ["--memory-budget", "100000"], "none"),
    (PGL + ["--checkpoint-global", "--global-segments", "units"], "units"),
    (PGL + ["--global-memory", "coarse"], "coarse"),
    (PGL + ["--global-memory", "none"], "none"),
    (BP + ["--checkpoint-global", "--global-segments", "coarse"], "coarse"),
], ids=["pgl-default", "bp-default", "checkpoint-global", "checkpoint-global+budget", "budget", "units",
        "global-memory-coarse", "global-memory-none", "bp-coarse"])
def test_plan_header_and_learner_agree(tmp_path, monkeypatch, capsys, extra, expected):
    choice, out = planned_choice(ARGS + extra, capsys)
    assert choice == expected, out
    for other in planner.CANDIDATES:  # and says how to get each of the others
        if other != expected:
            assert re.search(rf"checkpoint {other} .*select: --global-memory {other}", out), (other, out)
    run_dir = tmp_path / "run"
    learner, calls = observed_run(monkeypatch, ARGS + extra + ["-o", str(run_dir)])
    header = json.loads((run_dir / "header.json").read_text())
    segs = SEGMENTS[expected]
    assert header["global_memory"] == expected
    assert header["global_segments"] == segs
    assert header["memory_plan"]["choice"] == expected and header["memory_plan"]["segments"] == segs
    assert (None if learner.segments is None else [list(s) for s in learner.segments]) == segs
    assert calls == (0 if segs is None else len(segs) * GLOBAL_STEPS)


def _direct_peak(kind, segments, batch):
    """The tracker's peak of one step at the run's own batch, measured directly."""
    setup = build_step(kind, arch="resnet8", J=4, aux="1c2f", batch=batch, split="layerwise", device="cpu",
                       head_kernels="eager")
    if kind != "local":
        setup.executor.segments = None if segments is None else [tuple(s) for s in segments]
    setup.warm_up(2)
    return measure_step(setup, steps=1, measure="tracker")["peak_bytes"]


def test_pgl_default_stays_within_factor_of_local_peak(tmp_path, monkeypatch):
    run_dir = tmp_path / "pgl"
    observed_run(monkeypatch, ARGS + PGL + ["-o", str(run_dir)])
    plan = json.loads((run_dir / "header.json").read_text())["memory_plan"]
    assert plan["factor"] == FACTOR and plan["selected_by"] == "--global-memory auto"
    choice, pred = plan["choice"], plan["predicted"]
    assert choice != "none"
    assert pred["global_mib"][choice] <= FACTOR * pred["local_mib"]
    # measured directly at batch 16 (not extrapolated from the planner's small batch)
    local = _direct_peak("local", None, 16)
    peaks = {c: _direct_peak("global", SEGMENTS[c], 16) for c in planner.COST_ORDER}
    assert peaks[choice] <= FACTOR * local
    # the cheapest that fits: every faster candidate is over the factor (plain BP's memory among them)
    faster = planner.COST_ORDER[:planner.COST_ORDER.index(choice)]
    assert faster and all(peaks[c] > FACTOR * local for c in faster), (choice, peaks, local)


def own_phases_only(monkeypatch, candidates, local):
    """planner.predict may run only for summary.json's prediction of the run's own phases (no
    alternatives measured to choose among); returns the list of its calls."""
    real, seen = planner.predict, []

    def predict(**kw):
        seen.append(kw)
        assert tuple(kw["candidates"]) == candidates and kw["local"] == local, kw
        return real(**kw)

    monkeypatch.setattr(planner, "predict", predict)
    return seen


def test_bp_default_is_plain_backprop_and_plans_nothing(tmp_path, monkeypatch):
    seen = own_phases_only(monkeypatch, ("none",), False)
    run_dir = tmp_path / "bp"
    learner, calls = observed_run(monkeypatch, ARGS + BP + ["-o", str(run_dir)])
    header = json.loads((run_dir / "header.json").read_text())
    assert header["global_segments"] is None and learner.segments is None and calls == 0
    assert header["memory_plan"]["predicted"] is None
    assert len(seen) == 1 and set(header["memory_prediction_mib"]) == {"bp"}


def test_no_global_epoch_plans_nothing(tmp_path, monkeypatch, capsys):
    seen = own_phases_only(monkeypatch, (), True)
    run_dir = tmp_path / "local-only"
    # -P 2 over 2 epochs: both local
    observed_run(monkeypatch, ARGS + ["--method", "pgl", "-P", "2", "-Q", "1", "--epochs", "2", "-o", str(run_dir)])
    header = json.loads((run_dir / "header.json").read_text())
    assert header["global_segments"] is None and header["memory_plan"]["global_steps"] is False
    assert "reaches no global epoch" in capsys.readouterr().out
    assert len(seen) == 1 and set(header["memory_prediction_mib"]) == {"local"}


@pytest.mark.parametrize("extra, flag", [
    (["--global-memory", "units", "--checkpoint-global"], "--global-memory"),
    (["--global-memory-factor", "0"], "--global-memory-factor"),
    (["--global-memory", "all"], "--global-memory"),
])
def test_bad_global_memory_flags(tmp_path, capsys, extra, flag):
    try:
        rc = main(ARGS + extra + ["-o", str(tmp_path / "x")])
    except SystemExit as e:  # argparse's own choices check
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1, err


def test_plan_of_an_imagefolder_tree_is_the_runs_plan(tmp_path, monkeypatch, capsys):
    """16x16 images in 3 classes: ``--plan`` must measure the network the run trains, not a
    CIFAR-shaped one."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in ("ant", "bee", "cat"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / split / c / f"{i}.png")
    args = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "tree"), "--cache-dir", str(tmp_path / "cache"),
            "--arch", "resnet8", "-J", "2", "--split", "even", "-b", "6", "--lr", "0.05", "--progress", "off",
            "--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2"]
    assert main(args + ["--plan"]) == 0
    printed = re.findall(r"(local steps|checkpoint \w+) +([\d.]+) MiB", capsys.readouterr().out)
    observed_run(monkeypatch, args + ["-o", str(tmp_path / "run")])
    pred = json.loads((tmp_path / "run" / "header.json").read_text())["memory_plan"]["predicted"]
    recorded = [("local steps", f"{pred['local_mib']:.1f}")] + [
        (f"checkpoint {c}", f"{pred['global_mib'][c]:.1f}") for c in planner.COST_ORDER]
    assert printed == recorded
