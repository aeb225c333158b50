"""The component configs: each validates its own fields alone with the message the CLI gives for
the same bad flag, the checks that join components fire only from the composed TrainConfig, and
the composed config still reads the flat config.json of committed runs."""
import dataclasses
import glob
import json
import os

import pytest

from pgl_fast.config import (COMPONENTS, DataConfig, MethodConfig, ModelConfig, OptimConfig, RunConfig,
                             RuntimeConfig, StrategyConfig, TrainConfig, config_from_args, config_from_dict)
from pgl_fast.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (component, its bad keyword, the same value as a command line, the message written out by hand)
ALONE = [
    (DataConfig, {"workers": -1}, ["--workers", "-1"], "--workers: must be >= 0, got -1"),
    (ModelConfig, {"droprate": 1.0}, ["--droprate", "1"], "--droprate: must be in [0, 1), got 1.0"),
    (ModelConfig, {"arch": "resnet8", "cuts": "layer1"}, ["--arch", "resnet8", "--cuts", "layer1"],
     "--cuts: applies to --arch torchvision:<name> and --model; resnet8 is cut by -J and --split"),
    (MethodConfig, {"period": 0}, ["-P", "0"], "-P/--period: must be >= 1, got 0"),
    (MethodConfig, {"method": "infopro", "aux": "mlpsr"}, ["--method", "infopro", "--aux", "mlpsr"],
     "--aux: InfoPro uses InfoPro's AuxClassifier heads: 0c1f, 0c2f, 1c1f, 1c2f, 1c3f or 2c2f"),
    (OptimConfig, {"lr": -1.0}, ["--lr", "-1"], "--lr: must be in (0, 100], got -1.0"),
    (OptimConfig, {"epochs": 4, "warmup_epochs": 4}, ["--epochs", "4", "--warmup-epochs", "4"],
     "--warmup-epochs: must be in 0..epochs-1, got 4"),
    (RuntimeConfig, {"threads": -2}, ["--threads", "-2"],
     "--threads: must be >= 0 (0: torch's default or measured), got -2"),
    (RuntimeConfig, {"compile_mode": "reduce-overhead"}, ["--compile-mode", "reduce-overhead"],
     "--compile-mode: only applies with --compile; add --compile"),
    (StrategyConfig, {"pipeline_depth": 0}, ["--pipeline-depth", "0"], "--pipeline-depth: must be >= 1, got 0"),
    (StrategyConfig, {"pipeline_balance": "2,x"}, ["--pipeline-balance", "2,x"],
     "--pipeline-balance: '2,x' is not even, auto or comma-separated module counts (e.g. 2,2)"),
    (RunConfig, {"keep_checkpoints": 0}, ["--keep-checkpoints", "0"], "--keep-checkpoints: must be >= 1, got 0"),
]


@pytest.mark.parametrize("cls, kwargs, argv, message", ALONE, ids=[f"{a[0].__name__}-{a[2][-2]}" for a in ALONE])
def test_component_validates_alone_as_the_cli_does(cls, kwargs, argv, message):
    with pytest.raises(UserError) as alone:
        cls(**kwargs)
    with pytest.raises(UserError) as cli:
        config_from_args(argv)
    assert str(alone.value) == message
    assert str(cli.value) == message


# (what each component accepts alone, the message only the composed config gives)
JOINED = [
    ({"droprate": 0.1}, {"lean_blocks": True}, "--lean-blocks: does not implement dropout; use --droprate 0"),
    ({"method": "dgl"}, {"modules": 1},
     "-J/--modules: --method dgl needs at least 2 modules (J=1 is end-to-end: use --method bp)"),
    ({"pipeline": 4}, {"arch": "resnet8", "modules": 2, "split": "even"},
     "--pipeline: 4 stages for J=2 modules: each stage needs at least one (S <= J)"),
    ({"pipeline": 2}, {"compile": True}, "--pipeline: runs eager steps; drop --compile"),
    ({"method": "infopro"}, {"arch": "resnet8", "modules": 4, "split": "layerwise"},
     "--ixx-1/--ixy-1/--ixx-2/--ixy-2: InfoPro has no lambda defaults for resnet8 J=4 on cifar10; pass all four"),
]


def _owner(name):
    return next(c for c in COMPONENTS if name in {f.name for f in dataclasses.fields(c)})


@pytest.mark.parametrize("a, b, message", JOINED)
def test_cross_component_checks_fire_only_from_train_config(a, b, message):
    for part in (a, b):  # each half is valid in the components that own its fields
        for cls in {_owner(k) for k in part}:
            cls(**{k: v for k, v in part.items() if _owner(k) is cls})
    with pytest.raises(UserError) as composed:
        TrainConfig(**a, **b)
    assert str(composed.value) == message


def test_component_of_a_run_holds_its_resolved_fields():
    cfg = TrainConfig(arch="torchvision:resnet18", cuts="layer1,layer2", lr=0.3, epochs=5, momentum=0.5)
    optim = cfg.component(OptimConfig)
    assert type(optim) is OptimConfig
    assert (optim.lr, optim.epochs, optim.momentum, optim.batch_size, optim.test_batch_size) == (0.3, 5, 0.5, 1024, 1024)
    model = cfg.component(ModelConfig)
    assert (model.arch, model.cuts, model.modules) == ("torchvision:resnet18", "layer1,layer2", 3)
    # a component's own resolution, alone: J from the cuts; the optimiser's defaults stay open
    assert ModelConfig(arch="torchvision:resnet18", cuts="layer1,layer2").modules == 3
    assert (OptimConfig().batch_size, OptimConfig().lr) == (None, None)
    with pytest.raises(TypeError):
        cfg.component(TrainConfig)


def _committed_configs():
    return sorted(glob.glob(os.path.join(REPO, "docs", "results", "experiments", "*", "*", "config.json")))


def test_committed_flat_config_json_loads_and_every_field_has_one_component():
    paths = _committed_configs()
    assert paths, "no committed run's config.json found"
    d = json.load(open(paths[0]))
    cfg = config_from_dict(d)
    out = cfg.to_dict()
    assert {k: out[k] for k in d if k in out} == {k: d[k] for k in d if k in out}
    # the flat file's keys, each owned by exactly one component (none lost, none duplicated)
    owners = {k: [c for c in COMPONENTS if k in {f.name for f in dataclasses.fields(c)}] for k in out}
    assert all(len(v) == 1 for v in owners.values()), {k: v for k, v in owners.items() if len(v) != 1}
    assert set(d) <= set(out)


def test_planner_measures_the_runs_own_head_width(one_thread):
    """The planner builds the run's network from its config: wider aux heads are measured as
    wider (a config re-packed field by field measured the default width)."""
    from pgl_fast.memory import planner
    from pgl_fast.config.build import build_model

    def local_peak(**kw):
        cfg = TrainConfig(arch="resnet8", modules=2, split="even", batch_size=8, method="dgl", plan=True, **kw)
        return planner.plan_run(cfg, build_model(cfg, 10, 8), 8, 10).prediction["local"]

    assert local_peak(aux_widen=2.0) > local_peak()
