"""The run's training config, composed of one config per component (data, model, method,
optimisation, runtime, distributed strategy, run), and the training CLI generated from its fields.

Each component validates what its own fields decide; ``TrainConfig`` inherits every component's
fields (so ``cfg.lr`` and the flat ``config.json`` stay as they are), runs each component's
validation and then only the checks that need fields of two or more components. argparse is
generated from the fields, so every flag is defined once. The resolved config is written to
``config.json`` and into every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import TypeVar

from .argparsing import DefaultsHelpFormatter, OneLineParser, add_fields, flag_of
from .. import data as data_mod
from ..core.methods import HPFF_LAMBDAS, METHODS as METHOD_CLASSES
from ..jsonio import write_json_atomic
from ..models.heads import HEADS
from ..models.splits import resolve_split
from .base import bad
from .data import DATASETS, DataConfig
from .method import INFOPRO_LAMBDAS, LAMBDA_FIELDS, MethodConfig
from .model import ModelConfig
from .optim import OptimConfig
from .run import RunConfig
from .runtime import RuntimeConfig
from .strategy import StrategyConfig

# in the order their fields appear in TrainConfig, config.json and --help's groups
COMPONENTS = (DataConfig, ModelConfig, MethodConfig, OptimConfig, RuntimeConfig, StrategyConfig, RunConfig)
C = TypeVar("C")


# dataclass collects the fields of the bases last to first, so the data fields come first
@dataclass(kw_only=True)
class TrainConfig(RunConfig, StrategyConfig, RuntimeConfig, OptimConfig, MethodConfig, ModelConfig, DataConfig):
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Each component's own checks (which also resolve what they alone decide, e.g. J from
        --cuts), then the checks across components, which may rely on those being resolved."""
        for component in COMPONENTS:
            component.validate(self)
        for check in CROSS_CHECKS:
            check(self)

    def component(self, cls: type[C]) -> C:
        """This run's ``cls`` (one of ``COMPONENTS``) built from its fields, for code that needs
        only that component."""
        if cls not in COMPONENTS:
            raise TypeError(f"{cls!r} is not one of {', '.join(c.__name__ for c in COMPONENTS)}")
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def infopro_lambda_record(self) -> dict:
        """The InfoPro lambdas a run uses and where they come from, for ``header.json``."""
        ends = [self.ixx_1, self.ixy_1, self.ixx_2, self.ixy_2]
        table = INFOPRO_LAMBDAS.get((self.recipe_name, self.arch, self.modules, self.split == "balanced"))
        if self.uses_hpff and [float(v) for v in HPFF_LAMBDAS] == ends:
            source = "HPFF's published runs"
        elif table is not None and [float(v) for v in table] == ends:
            source = "InfoPro's published per-run table" + (
                "" if self.infopro_loss == "contrast"
                else " (published for its contrastive loss; reused unchanged for the softmax loss)")
        else:
            source = "given on the command line"
        return {"endpoints": dict(zip(LAMBDA_FIELDS, ends)), "source": source,
                "per_module": [list(self.infopro_lambdas(j)) for j in range(self.modules - 1)]}

    def infopro_lambdas(self, j: int) -> tuple[float, float]:
        """(lambda_1, lambda_2) of local module j = 0 .. J-2, linear between the endpoints."""
        ratio = j / (self.modules - 2) if self.modules > 2 else 0.0
        return (self.ixx_1 * (1 - ratio) + self.ixx_2 * ratio, self.ixy_1 * (1 - ratio) + self.ixy_2 * ratio)

    def no_effect_warnings(self, explicit=None) -> list[str]:
        """One ``warning: FLAG has no effect ...`` line per flag the user set that this combination
        ignores (see ``NO_EFFECT``). ``explicit`` is the set of field names given on the command line
        (``explicit_fields``); without it (a config built from Python) every field that differs from
        its default counts as set."""
        if explicit is None:
            explicit = {f.name for f in fields(self) if getattr(self, f.name) != f.default}
        out, seen = [], set()
        for names, why in NO_EFFECT:
            given = [n for n in names if n in explicit and n not in seen]
            if not given:
                continue
            reason = why(self)
            if reason is None:
                continue
            for n in given:
                seen.add(n)
                out.append(f"warning: {flag_of(TrainConfig, n)} has no effect {reason}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())


# ------------------------------------------------------------------------------------------------
# the checks across components, in the order they run (each names the components it joins)
# ------------------------------------------------------------------------------------------------
def _check_split_table(c: TrainConfig) -> None:
    """model + data: a CIFAR ResNet's split table exists for this J (the balanced tables are per
    data set)."""
    if not c.custom_model:
        resolve_split(c.arch, c.modules, c.split, c.split_recipe)


def _check_lean_blocks_model(c: TrainConfig) -> None:
    """runtime + model: --lean-blocks is the CIFAR ResNets' BasicBlock backward, without dropout."""
    if c.lean_blocks and c.custom_model:
        bad("--lean-blocks", "is the CIFAR ResNets' BasicBlock backward; it has no effect on other models")
    if c.lean_blocks and c.droprate > 0:
        bad("--lean-blocks", "does not implement dropout; use --droprate 0")


def _check_method_modules(c: TrainConfig) -> None:
    """method + model: local learning needs at least two modules."""
    if c.method != "bp" and c.modules < 2:
        bad("-J/--modules", f"--method {c.method} needs at least 2 modules (J=1 is end-to-end: use --method bp)")


def _check_pipeline_model(c: TrainConfig) -> None:
    """strategy + model: the stages cover the J modules."""
    if c.pipeline == 1:
        return
    counts = c.balance_counts()
    if counts is not None and (len(counts) != c.pipeline or min(counts) < 1 or sum(counts) != c.modules):
        bad("--pipeline-balance", f"{c.pipeline_balance!r}: needs {c.pipeline} counts >= 1 summing to J={c.modules}")
    if c.pipeline > c.modules:
        bad("--pipeline", f"{c.pipeline} stages for J={c.modules} modules: each stage needs at least one (S <= J)")
    if c.pipeline_balance == "auto" and c.custom_model:
        bad("--pipeline-balance", "auto measures the CIFAR ResNet presets; give counts a,b,... for this model")


def _check_pipeline_runtime(c: TrainConfig) -> None:
    """strategy + runtime: a pipeline runs eager, uncheckpointed, standard steps."""
    if c.pipeline == 1:
        return
    if c.compile:
        bad("--pipeline", "runs eager steps; drop --compile")
    if c.cuda_graphs:
        bad("--pipeline", "runs eager steps; drop --cuda-graphs")
    if c.checkpoint_global or c.global_memory not in ("auto", "none"):
        bad("--pipeline", "global steps are not checkpointed in a pipeline (each stage holds only its own "
            "modules' graphs); drop --checkpoint-global / use --global-memory none")
    if c.memory_budget is not None:
        bad("--pipeline", "--memory-budget plans single-process global-step checkpointing; drop it")
    if c.amp and c.amp_dtype == "fp16":
        bad("--pipeline", "fp16 autocast needs a gradient scaler across stages; use --amp-dtype bf16")
    if c.lean_blocks:
        bad("--pipeline", "runs the standard blocks; drop --lean-blocks")


def _resolve_batch_and_lr(c: TrainConfig) -> None:
    """data + optimisation: the batch size's and learning rate's defaults are the data set's."""
    if c.batch_size is None:
        c.batch_size = data_mod.run_defaults(c.dataset, c.recipe).batch_size
    if c.lr is None:
        c.lr = data_mod.run_defaults(c.dataset, c.recipe).lr
    if c.test_batch_size is None:
        c.test_batch_size = c.batch_size


def _check_sync_bn_runtime(c: TrainConfig) -> None:
    """strategy + runtime: --sync-bn needs batch norm called as a module, eagerly."""
    if c.sync_bn and c.lean_blocks:
        bad("--sync-bn", "--lean-blocks computes batch norm without calling it, so it would not synchronise; "
            "drop one of them")
    if c.sync_bn and c.compile:
        bad("--sync-bn", "is not traced by --compile; drop one of them")


def _check_refusals(c: TrainConfig) -> None:
    """method + runtime + strategy: what the run's local objectives refuse (the methods' own list,
    pgl_fast.core.methods)."""
    for on, flag, option in ((c.pipeline > 1, "--pipeline", "pipeline"), (c.compile, "--compile", "compile"),
                             (c.cuda_graphs, "--cuda-graphs", "cuda_graphs")):
        for name in c.local_objectives if on else ():
            why = METHOD_CLASSES[name].refuses.get(option)
            if why:
                bad(flag, f"is not supported with {name.upper()}: {why}; drop {flag}")


def _resolve_infopro_lambdas(c: TrainConfig) -> None:
    """method + data + model: InfoPro's default lambdas are published per data set, network, J and
    balanced split; the ones not given come from that table."""
    if not c.uses_infopro:
        return
    given = [getattr(c, name) for name in LAMBDA_FIELDS]
    if all(v is not None for v in given):
        return
    key = (c.recipe_name, c.arch, c.modules, c.split == "balanced")
    table = INFOPRO_LAMBDAS.get(key)
    if table is None:
        bad("--ixx-1/--ixy-1/--ixx-2/--ixy-2",
            f"InfoPro has no lambda defaults for {key[1]} J={key[2]} on {key[0]}"
            f"{' (balanced)' if key[3] else ''}; pass all four")
    for name, v in zip(LAMBDA_FIELDS, table):
        if getattr(c, name) is None:
            setattr(c, name, float(v))


CROSS_CHECKS = (_check_split_table, _check_lean_blocks_model, _check_method_modules, _check_pipeline_model,
                _check_pipeline_runtime, _resolve_batch_and_lr, _check_sync_bn_runtime, _check_refusals,
                _resolve_infopro_lambdas)


def _no_global_epochs(c: TrainConfig) -> str | None:
    if c.method not in ("bp", "pgl"):
        return f"with --method {c.method} (it has no global epochs)"
    if c.method == "pgl" and c.duration == 0:
        return "with -Q 0 (no global epochs)"
    return None


def _takers_of_recipe() -> str:
    """'only X takes a recipe' / 'only X and Y take a recipe': the data sets --recipe applies to."""
    names = [n for n, d in DATASETS.items() if d.recipe is None]
    if len(names) == 1:
        return f"only {names[0]} takes a recipe"
    return f"only {', '.join(names[:-1])} and {names[-1]} take a recipe"


# Which flags matter for which combination: each entry is (fields, why), and ``why(cfg)`` returns
# the reason the fields do nothing in this combination, or None when they do something. A flag the
# user gave explicitly that lands here is one warning line, printed and kept in header.json, so a
# mistyped intent (-P with dgl, --aux with bp) is visible instead of silently ignored.
NO_EFFECT: list[tuple[tuple[str, ...], object]] = [
    (("aux", "aux_widen", "aux_feature_dim", "head_kernels", "no_head_eval"),
     lambda c: "with --method bp (it has no aux heads)" if c.method == "bp" else None),
    (("cuda_graphs",), lambda c: "with --method bp (only local steps are captured)" if c.method == "bp" else None),
    (("modules", "split"),
     lambda c: "with --method bp without --checkpoint-global (end-to-end training is the same for every split)"
     if c.method == "bp" and not c.checkpoint_global and c.memory_budget is None and c.modules != 1 else None),
    (("period", "duration"),
     lambda c: f"with --method {c.method} (only pgl alternates local and global epochs)" if c.method != "pgl" else None),
    (("infopro_loss",),
     lambda c: f"with --method {c.method} (InfoPro's loss only)" if not c.uses_infopro else None),
    (("ixx_1", "ixy_1", "ixx_2", "ixy_2"),
     lambda c: None if c.uses_infopro_lambdas else
     f"with --method {c.method}{' --hpff-base dgl' if c.uses_hpff else ''} (InfoPro's loss only)"),
    (("hpff_base", "hpff_wx", "hpff_wy", "hpff_patches"),
     lambda c: None if c.uses_hpff else f"with --method {c.method} (HPFF's loss only)"),
    (("hpff_patches",),
     lambda c: "with --hpff-base dgl (no reconstruction term)" if c.uses_hpff and c.hpff_base == "dgl" else None),
    (("pgl_local",), lambda c: f"with --method {c.method} (only pgl takes a local objective)" if c.method != "pgl" else None),
    (("man_momentum", "man_base"),
     lambda c: f"with --method {c.method}{' --pgl-local ' + c.pgl_local if c.method == 'pgl' else ''} (MAN's only)"
     if not c.uses_man else None),
    (("checkpoint_global", "global_segments", "global_memory", "global_memory_factor"), _no_global_epochs),
    (("global_memory_factor",),
     lambda c: f"with --global-memory {c.global_memory} (the factor only guides auto)"
     if c.global_memory != "auto" or c.checkpoint_global else None),
    (("global_segments",),
     lambda c: "with --memory-budget (the planner chooses the checkpointing)" if c.memory_budget is not None
     else ("without --checkpoint-global" if not c.checkpoint_global else None)),
    (("aux_widen", "aux_feature_dim"),
     lambda c: f"with --aux {c.aux} ({HEADS[c.aux].fixed_width})" if HEADS[c.aux].fixed_width else None),
    (("amp_dtype",), lambda c: "without --amp" if not c.amp else None),
    (("pipeline_balance", "pipeline_depth", "pipeline_micro_batches", "pipeline_timeout"),
     lambda c: "without --pipeline S > 1" if c.pipeline == 1 else None),
    (("warmup_epochs", "warmup_lr"),
     lambda c: f"with --sched {c.sched} (warm-up blends into a cosine schedule only)"
     if c.sched in ("step", "constant") else None),
    (("warmup_lr",), lambda c: "without --warmup-epochs" if c.warmup_epochs == 0 else None),
    (("no_nesterov",), lambda c: "with --momentum 0" if c.momentum == 0 else None),
    (("recipe",),
     lambda c: f"with --dataset {c.dataset} ({_takers_of_recipe()})" if DATASETS[c.dataset].recipe is not None
     else None),
    (("synthetic_train", "synthetic_test"),
     lambda c: f"with --dataset {c.dataset}" if "synthetic_train" not in DATASETS[c.dataset].flags else None),
    (("data_dir", "cache_dir", "no_download"),
     lambda c: f"with --dataset {c.dataset} (generated in memory)" if DATASETS[c.dataset].reads == "generated" else None),
    (("no_download",),
     lambda c: f"with --dataset {c.dataset} (nothing is downloaded)"
     if DATASETS[c.dataset].reads in ("imagefolder", "files") else None),
    (("workers", "image_size", "skip_bad_images"),
     lambda c: "without streaming (--data-pipeline stream, or auto with --dataset imagefolder)"
     if DATASETS[c.dataset].reads != "imagefolder" or c.data_pipeline == "resident" else None),
    (("resident_budget",), lambda c: f"with --data-pipeline {c.data_pipeline}" if c.data_pipeline != "auto" else None),
    (("heartbeat",), lambda c: "with --progress on (the progress bar shows the same)" if c.progress == "on" else None),
]


GROUP_TITLES = {
    "data": "data", "model": "model and split", "method": "method (BP / DGL / InfoPro / MAN / PGL)",
    "optimisation": "optimisation", "runtime": "runtime and performance",
    "distributed": "distributed (under torchrun: data parallel, or --pipeline)", "output": "output",
}


def build_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """The training CLI. Prefix matching is off (``--epoch`` is an error, never ``--epochs``).
    With ``explicit_only`` every default is left out of the parsed namespace, so it holds exactly
    the flags that appeared on the command line."""
    p = OneLineParser(
        prog="python -m pgl_fast.train",
        description="Train a network with BP, DGL, InfoPro or PGL (local learning with periodic global guidance).",
        epilog="example: python -m pgl_fast.train --dataset imagefolder --data-dir .cache/cifar10-jpeg "
               "--arch resnet32 --method pgl -J 16 --aux adapt -P 10 -Q 2",
        formatter_class=DefaultsHelpFormatter,
    )
    add_fields(p, TrainConfig, groups=GROUP_TITLES, explicit_only=explicit_only)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def explicit_fields(argv: list[str] | None = None) -> set[str]:
    """Names of the fields whose flag appeared in ``argv`` (whatever value it was given)."""
    return set(vars(build_parser(explicit_only=True).parse_args(argv)))


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})
