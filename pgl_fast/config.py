"""The one typed training config. argparse is generated from its fields, so every flag is defined
once; ``__post_init__`` validates everything that can be checked before any work starts, with
one-line messages naming the flag and what is allowed. The resolved config is written to
``config.json`` and into every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

from . import data as data_mod
from .runtime.compile import COMPILE_MODES, CUDAGRAPH_MODES
from .models.heads import AUX_CONFIGS, HEADS
from .models.cifar_resnet import blocks_per_stage
from .core.methods import HPFF_LAMBDAS, METHODS as METHOD_CLASSES, local_objectives
from .errors import UserError
from .jsonio import write_json_atomic
from .argparsing import DefaultsHelpFormatter, OneLineParser, add_fields, flag_of
from .models.splits import SPLIT_KINDS, imagenet_infopro_cuts, resolve_split

METHODS = tuple(METHOD_CLASSES)
# --pgl-local: every registered method whose epochs are all local
PGL_LOCALS = tuple(local_objectives())
MAN_BASES = ("dgl", "infopro")
# --global-memory-factor's default. Predicted for resnet32 with 1c2f heads: at J=4 coarse comes to
# 0.97x the local peak, at J=8 modules to 1.13x (coarse 1.42x), at J=16 the smallest is modules at
# 1.62x. 1.25 takes the segmentation that gets near the local peak wherever one does, and refuses a
# faster one that gives back much of the saving (coarse at J=8); where nothing fits, the smallest runs.
DEFAULT_FACTOR = 1.25
# the data sets and recipes the flags name: the data module's own tables (one registry each)
DATASETS = data_mod.DATASETS
RECIPES = tuple(data_mod.RECIPES)
PIPELINES = ("auto", "resident", "stream")

# InfoPro's per-run lambda endpoints (ixx_1, ixy_1, ixx_2, ixy_2), as its published run commands set
# them per data set, network, J and balanced-memory split.
INFOPRO_LAMBDAS = {
    ("cifar10", "resnet32", 2, False): (5, 1, 0, 0),
    ("cifar10", "resnet32", 4, False): (6, 0, 1, 2),
    ("cifar10", "resnet32", 8, False): (5, 0, 0, 2),
    ("cifar10", "resnet32", 16, False): (5, 0.05, 0.2, 0.5),
    ("cifar10", "resnet110", 2, False): (5, 0.5, 0, 0),
    ("cifar10", "resnet110", 4, False): (1, 0, 0, 1),
    ("cifar10", "resnet110", 8, False): (5, 0, 0, 1),
    ("cifar10", "resnet110", 16, False): (5, 0, 0.5, 1),
    ("cifar10", "resnet110", 2, True): (5, 0.1, 0, 0),
    ("cifar10", "resnet110", 3, True): (5, 0, 5, 0.1),
    ("cifar10", "resnet110", 4, True): (5, 0, 5, 0.1),
    ("stl10", "resnet110", 2, False): (10, 1, 0, 0),
    ("stl10", "resnet110", 4, False): (20, 0.2, 5, 2),
    ("stl10", "resnet110", 8, False): (20, 0.2, 5, 1),
    ("stl10", "resnet110", 16, False): (20, 0.5, 10, 0.1),
    ("stl10", "resnet110", 2, True): (20, 1, 0, 0),
    ("stl10", "resnet110", 3, True): (20, 0.5, 5, 2),
    ("stl10", "resnet110", 4, True): (20, 0.5, 10, 1),
    ("svhn", "resnet110", 2, False): (1, 0.1, 0, 0),
    ("svhn", "resnet110", 4, False): (5, 0, 0.5, 1),
    ("svhn", "resnet110", 8, False): (5, 0, 0.5, 2),
    ("svhn", "resnet110", 16, False): (5, 0.2, 0.5, 1),
}


def _f(default, help: str, *, flags: tuple[str, ...] = (), group: str = "training", choices=None, metavar=None):
    return field(default=default, metadata={"help": help, "flags": flags, "group": group,
                                            "choices": choices, "metavar": metavar})


@dataclass(kw_only=True)
class TrainConfig:
    # -- data
    dataset: str = _f("cifar10", "data set", group="data", choices=DATASETS)
    data_dir: str = _f("./data", "data folder (torchvision download target, or an ImageFolder tree with train/ and test/, or a .tar.gz/.tgz/.tar archive of one, unpacked once into ~/.cache/pgl_fast/archives)", group="data")
    recipe: str = _f("cifar10", "augmentation/normalisation recipe for --dataset imagefolder (and the split table key for --split balanced)", group="data", choices=RECIPES)
    train_subset: int | None = _f(None, "train on a seeded random subset of N images", group="data", metavar="N")
    test_subset: int | None = _f(None, "evaluate on a seeded random subset of N test images", group="data", metavar="N")
    no_download: bool = _f(False, "never try to download a torchvision data set", group="data")
    cache_dir: str | None = _f(None, "where decoded uint8 tensors are cached (default <data-dir>/.pgl_cache)", group="data")
    drop_last: bool = _f(False, "drop the last partial training batch (InfoPro keeps it)", group="data")
    synthetic_train: int = _f(512, "training images of --dataset synthetic", group="data")
    synthetic_test: int = _f(256, "test images of --dataset synthetic", group="data")
    data_pipeline: str = _f("auto", "resident: decode the whole set once and keep it on the device; stream: DataLoader workers decode each batch from the files (ImageFolder trees); auto: stream for --recipe imagenet or when the decoded set would exceed --resident-budget, else resident", group="data", choices=PIPELINES)
    workers: int = _f(2, "with --data-pipeline stream: DataLoader worker processes decoding files (0: in the training process)", group="data", metavar="N")
    image_size: int | None = _f(None, "with --data-pipeline stream: the crop size the network sees (default: the recipe's, 224 for imagenet)", group="data", metavar="PX")
    skip_bad_images: bool = _f(False, "with --data-pipeline stream: decode every file once before training and leave out the ones that fail (counted in header.json) instead of stopping at the first", group="data")
    resident_budget: float = _f(4096.0, "with --data-pipeline auto: the most MiB a decoded ImageFolder may take to be kept resident", group="data", metavar="MiB")

    # -- model and split
    arch: str = _f("resnet32", "CIFAR ResNet-(6n+2) (resnet20, resnet32, resnet56, resnet110, ...) or torchvision:<name> (e.g. torchvision:resnet18, torchvision:vgg11_bn, torchvision:mobilenet_v2; cut with --cuts)", group="model")
    model: str | None = _f(None, "a user's network instead of --arch: package.module:factory, called as factory(num_classes=N), returning an nn.Module whose top-level children run in order (or an nn.Sequential); cut with --cuts", group="model", metavar="MODULE:FACTORY")
    cuts: str | None = _f(None, "with --arch torchvision:<name> or --model: comma-separated children to cut after (child names such as layer1,layer2,layer3, features.7 inside a Sequential child, or indices of an nn.Sequential); J = cuts + 1", group="model")
    cifar_stem: bool = _f(False, "with --arch torchvision:<ResNet>: replace the stem by a 3x3 stride-1 conv without max-pool, the usual change for 32x32 inputs", group="model")
    modules: int = _f(16, "J, the number of local modules (InfoPro: --local_module_num)", flags=("-J", "--modules"), group="model", metavar="J")
    split: str = _f("auto", "how the network is cut: InfoPro's tables, balanced-memory (InfoPro*), layerwise or even", group="model", choices=SPLIT_KINDS)
    droprate: float = _f(0.0, "dropout inside BasicBlocks (InfoPro uses 0)", group="model")

    # -- method
    method: str = _f("pgl", "training method", group="method", choices=METHODS)
    aux: str = _f("1c2f", "aux head (InfoPro: --aux_net_config); adapt = AUX-ADAPT", group="method", choices=AUX_CONFIGS)
    aux_widen: float = _f(1.0, "aux head width multiplier (InfoPro: --aux_net_widen)", group="method")
    aux_feature_dim: int = _f(128, "aux head hidden/feature dim (InfoPro: --aux_net_feature_dim)", group="method")
    period: int = _f(10, "PGL: P local epochs per cycle", flags=("-P", "--period"), group="method", metavar="P")
    duration: int = _f(2, "PGL: Q global epochs after every P local ones", flags=("-Q", "--duration"), group="method", metavar="Q")
    pgl_local: str = _f("dgl", "PGL: the local objective of its local epochs (and of the heads in its global ones)", group="method", choices=PGL_LOCALS)
    man_momentum: float = _f(0.995, "MAN: momentum of the EMA copy of module j+1's first block on module j's aux path (MAN's published runs: 0.995)", group="method")
    man_base: str = _f("dgl", "MAN: the loss on its aux path: dgl = cross-entropy head (DGL+MAN), infopro = InfoPro's (InfoPro+MAN; InfoPro's flags apply)", group="method", choices=MAN_BASES)
    infopro_loss: str = _f("contrast", "InfoPro's task term (InfoPro: --local_loss_mode): contrast = SupCon, softmax = CE. InfoPro published lambda defaults only for contrast; softmax reuses that table unless --ixx-*/--ixy-* are given (the lambdas used are recorded in header.json)", group="method", choices=("contrast", "softmax"))
    ixx_1: float | None = _f(None, "InfoPro lambda_1 (reconstruction) of the first local module (default: InfoPro's per-run value, published for the contrast loss only)", group="method")
    ixy_1: float | None = _f(None, "InfoPro lambda_2 (task) of the first local module", group="method")
    ixx_2: float | None = _f(None, "InfoPro lambda_1 of module J-1", group="method")
    ixy_2: float | None = _f(None, "InfoPro lambda_2 of module J-1", group="method")
    hpff_base: str = _f("infopro", "HPFF: the loss of its cascade path: infopro (softmax task term of a second head plus patch-decoded reconstruction, lambdas --ixx-*/--ixy-*, default HPFF's published 5, 0.5 -> 0, 0) or dgl (cross-entropy of the second head)", group="method", choices=("infopro", "dgl"))
    hpff_wx: float = _f(0.001, "HPFF: weight of the independent path's loss (each module on its detached input)", group="method")
    hpff_wy: float = _f(0.999, "HPFF: weight of the cascade path's loss (modules j-1 and j together)", group="method")
    hpff_patches: int = _f(2, "HPFF: the patch decoders cut features and image into N x N tiles", group="method", metavar="N")

    # -- optimisation
    epochs: int = _f(160, "training epochs", group="optimisation")
    batch_size: int | None = _f(None, "batch size (default 1024; 128 for stl10)", flags=("-b", "--batch-size"), group="optimisation")
    test_batch_size: int | None = _f(None, "evaluation batch size (default: --batch-size)", group="optimisation")
    lr: float | None = _f(None, "initial learning rate (default 0.8; 0.1 for stl10)", group="optimisation")
    momentum: float = _f(0.9, "SGD momentum", group="optimisation")
    no_nesterov: bool = _f(False, "plain momentum instead of Nesterov", group="optimisation")
    weight_decay: float = _f(1e-4, "L2 weight decay (on every parameter, as InfoPro)", group="optimisation")
    sched: str = _f("cosine", "LR schedule, set once per epoch; infopro-cosine = InfoPro's exact formula (last epoch at lr 0)", group="optimisation", choices=("cosine", "infopro-cosine", "step", "constant"))
    warmup_epochs: int = _f(0, "InfoPro warm-up epochs for cosine (InfoPro's --cos_lr uses 10)", group="optimisation")
    warmup_lr: float = _f(0.01, "learning rate the warm-up starts from", group="optimisation")

    # -- runtime
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", group="runtime")
    amp: bool = _f(False, "autocast (bf16 by default) with fp32 BN statistics", group="runtime")
    amp_dtype: str = _f("bf16", "autocast dtype", group="runtime", choices=("bf16", "fp16"))
    channels_last: bool = _f(False, "channels-last memory format", group="runtime")
    cuda_graphs: bool = _f(False, "capture local steps in CUDA graphs (GPU only)", group="runtime")
    compile: bool = _f(False, "torch.compile (Inductor) each module's forward and local loss, and the global step's segments and losses; evaluation stays eager", group="runtime")
    compile_mode: str = _f("default", "torch.compile mode with --compile (reduce-overhead and max-autotune capture CUDA graphs themselves)", group="runtime", choices=COMPILE_MODES)
    head_kernels: str = _f("auto", "aux head conv path: fused Triton kernels or eager PyTorch (auto = triton on CUDA)", group="runtime", choices=("auto", "triton", "eager"))
    cpu_tune: str = _f("auto", "on the CPU, pick the thread count, channels-last, the optimizer kernel and --compile by timing this run's step at start-up, when the run is long enough for that to pay (cached per machine and shape; the decision and timings in header.json; a resume keeps the recorded choice); a forced --threads/--channels-last/--optimizer-kernel/--compile wins; off: torch's defaults, eager", group="runtime", choices=("off", "auto"))
    optimizer_kernel: str = _f("auto", "torch's SGD kernel: fused or foreach (auto = fused, or measured with --cpu-tune auto)", group="runtime", choices=("auto", "fused", "foreach"))
    threads: int = _f(0, "intra-op CPU threads (0 = torch's default, or measured with --cpu-tune auto)", group="runtime", metavar="N")
    checkpoint_global: bool = _f(False, "checkpointed autograd at module boundaries in global epochs (bp and PGL's global phase)", flags=("--checkpoint-global",), group="runtime")
    sync_bn: bool = _f(False, "under torchrun (data parallel): batch-norm statistics over the global batch (an all-reduce batch norm on every device, exact for unequal shards) instead of per rank", group="distributed")
    pipeline: int = _f(1, "under torchrun with S ranks: pipeline the J modules over S stages (1: off); local steps as in one process, global steps a synchronous GPipe forward/backward", group="distributed", metavar="S")
    pipeline_balance: str = _f("even", "modules per stage with --pipeline: even (equal counts), auto (by each module's measured local-step time) or counts a,b,... summing to J", group="distributed", metavar="even|auto|a,b,...")
    pipeline_depth: int = _f(2, "with --pipeline: batches in flight between neighbouring stages (bounds the activation memory queued per rank)", group="distributed", metavar="D")
    pipeline_micro_batches: int = _f(1, "with --pipeline: GPipe micro-batches per global step (1: exactly the single-process step; more: batch norm per micro-batch)", group="distributed", metavar="M")
    pipeline_timeout: float = _f(300.0, "with --pipeline: seconds a stage waits for a neighbour before the run stops with an error", group="distributed", metavar="SECONDS")
    lean_blocks: bool = _f(False, "memory-lean BasicBlock backward (recomputes conv1, in-place BN/ReLU backward): same gradients, less memory held; fp32 only", group="runtime")
    global_segments: str = _f("modules", "checkpoint segments of global steps with --checkpoint-global: one per module, per unit, ~sqrt(units) coarse ones, or auto (the planner's smallest predicted peak)", group="runtime", choices=("modules", "units", "coarse", "auto"))
    memory_budget: float | None = _f(None, "memory budget in MiB: the planner picks the fastest global-step checkpointing that fits (among none, coarse, modules, units, or those --global-memory / --checkpoint-global name), from measured predictions", group="runtime", metavar="MiB")
    global_memory: str = _f("auto", "checkpointing of global steps: auto = for pgl the fastest segmentation whose predicted peak stays within --global-memory-factor x the local-step peak (bp: none); or exactly none / modules / units / coarse", group="runtime", choices=("auto", "none", "modules", "units", "coarse"))
    global_memory_factor: float = _f(DEFAULT_FACTOR, "with --global-memory auto: how far above the predicted local-step peak PGL's global steps may go", group="runtime", metavar="F")
    plan: bool = _f(False, "print the memory plan (predicted peak per phase and checkpoint choice) and exit", group="output")
    seed: int = _f(0, "random seed", group="runtime")
    deterministic: bool = _f(False, "deterministic algorithms (slower)", group="runtime")

    # -- output
    output_dir: str = _f("runs/pgl", "where config.json, metrics.jsonl and summary.json go", flags=("-o", "--output-dir"), group="output")
    describe: bool = _f(False, "print the module table and exit", group="output")
    progress: str = _f("auto", "progress bar within epochs (auto = only on a terminal)", group="output", choices=("auto", "on", "off"))
    no_head_eval: bool = _f(False, "skip scoring each aux head on the test set every epoch", group="output")
    resume: str | None = _f(None, "resume from a checkpoint file, or 'auto': the newest complete one in --output-dir", group="output", metavar="PATH|auto")
    overwrite: bool = _f(False, "start a new run into an --output-dir that holds one, removing the earlier run's files (config, header, metrics, summary, checkpoints; nothing else)", group="output")
    allow_schedule_change: bool = _f(False, "let --resume continue with another --epochs/--lr/--sched/--warmup-*/-P/-Q than the checkpoint's (recorded in header.json)", group="output")
    save_every: int = _f(0, "also checkpoint every N training steps inside an epoch (0: only at epoch ends)", group="output", metavar="N")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep", group="output", metavar="K")
    heartbeat: float = _f(60.0, "without a progress bar (no terminal, or --progress off): print a progress line every SECONDS inside an epoch (0: never)", group="output", metavar="SECONDS")

    # ------------------------------------------------------------------------------------------
    def _check_pipeline(self, bad) -> None:
        """--pipeline and its companions (J is resolved by now)."""
        if self.pipeline < 1:
            bad("--pipeline", f"must be >= 1 stages, got {self.pipeline}")
        if self.pipeline_depth < 1:
            bad("--pipeline-depth", f"must be >= 1, got {self.pipeline_depth}")
        if self.pipeline_micro_batches < 1:
            bad("--pipeline-micro-batches", f"must be >= 1, got {self.pipeline_micro_batches}")
        if not self.pipeline_timeout > 0:
            bad("--pipeline-timeout", f"must be > 0 seconds, got {self.pipeline_timeout}")
        b = self.pipeline_balance
        if b not in ("even", "auto"):
            try:
                counts = [int(c) for c in b.split(",")]
            except ValueError:
                bad("--pipeline-balance", f"{b!r} is not even, auto or comma-separated module counts (e.g. 2,2)")
            if self.pipeline > 1 and (len(counts) != self.pipeline or min(counts) < 1 or sum(counts) != self.modules):
                bad("--pipeline-balance", f"{b!r}: needs {self.pipeline} counts >= 1 summing to J={self.modules}")
        if self.pipeline == 1:
            return
        S = self.pipeline
        if S > self.modules:
            bad("--pipeline", f"{S} stages for J={self.modules} modules: each stage needs at least one (S <= J)")
        if self.compile:
            bad("--pipeline", "runs eager steps; drop --compile")
        if self.cuda_graphs:
            bad("--pipeline", "runs eager steps; drop --cuda-graphs")
        if self.checkpoint_global or self.global_memory not in ("auto", "none"):
            bad("--pipeline", "global steps are not checkpointed in a pipeline (each stage holds only its own "
                "modules' graphs); drop --checkpoint-global / use --global-memory none")
        if self.memory_budget is not None:
            bad("--pipeline", "--memory-budget plans single-process global-step checkpointing; drop it")
        if self.amp and self.amp_dtype == "fp16":
            bad("--pipeline", "fp16 autocast needs a gradient scaler across stages; use --amp-dtype bf16")
        if self.sync_bn:
            bad("--pipeline", "--sync-bn is for data parallel, which --pipeline does not combine with; drop it")
        if self.lean_blocks:
            bad("--pipeline", "runs the standard blocks; drop --lean-blocks")
        if self.pipeline_balance == "auto" and self.custom_model:
            bad("--pipeline-balance", "auto measures the CIFAR ResNet presets; give counts a,b,... for this model")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(flag: str, msg: str) -> None:
            raise UserError(f"{flag}: {msg}")

        if self.method not in METHODS:
            bad("--method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        if self.dataset not in DATASETS:
            bad("--dataset", f"{self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.aux not in AUX_CONFIGS:
            bad("--aux", f"{self.aux!r} is not one of {', '.join(AUX_CONFIGS)}")
        if self.model is not None and self.arch.startswith("torchvision:"):
            bad("--model", f"names a network, and so does --arch {self.arch}; give one of them")
        if self.cifar_stem and not self.arch.startswith("torchvision:"):
            bad("--cifar-stem", "changes the stem of a torchvision ResNet: use it with --arch torchvision:<name>")
        if self.custom_model:
            if self.arch.startswith("torchvision:") and not self.arch.split(":", 1)[1]:
                bad("--arch", "torchvision: needs a model name, e.g. torchvision:resnet18")
            if self.split == "infopro" and self.model is None:
                if self.cuts is not None:
                    bad("--cuts", "and --split infopro both set the cuts; give one of them")
                # the ImageNet ResNets' module split as a --cuts list (J is checked there)
                self.cuts = ",".join(imagenet_infopro_cuts(self.arch.split(":", 1)[1], self.modules))
                self.split = "auto"
            if not self.cut_list:
                bad("--cuts", "is required with --arch torchvision:<name> or --model: name the children to cut "
                    "after, e.g. --cuts layer1,layer2,layer3")
            if self.modules not in (16, len(self.cut_list) + 1):
                bad("-J/--modules", f"--cuts makes {len(self.cut_list) + 1} modules; -J {self.modules} disagrees "
                    "(drop -J)")
            self.modules = len(self.cut_list) + 1
            if self.split != "auto":
                bad("--split", "chooses among the CIFAR ResNets' split tables; --cuts sets the split of this model")
            if self.lean_blocks:
                bad("--lean-blocks", "is the CIFAR ResNets' BasicBlock backward; it has no effect on other models")
        else:
            if self.cuts is not None:
                bad("--cuts", f"applies to --arch torchvision:<name> and --model; {self.arch} is cut by -J and --split")
            try:
                blocks_per_stage(self.arch)
            except ValueError as e:
                raise UserError(str(e) + " or torchvision:<name>") from None
            if self.modules < 1:
                bad("-J/--modules", f"must be >= 1, got {self.modules}")
            resolve_split(self.arch, self.modules, self.split, self.split_recipe)
        if self.pgl_local not in PGL_LOCALS:
            bad("--pgl-local", f"{self.pgl_local!r} is not one of {', '.join(PGL_LOCALS)}")
        if self.man_base not in MAN_BASES:
            bad("--man-base", f"{self.man_base!r} is not one of {', '.join(MAN_BASES)}")
        if not 0.0 <= self.man_momentum <= 1.0:
            bad("--man-momentum", f"must be in [0, 1], got {self.man_momentum}")
        if self.method != "bp" and self.modules < 2:
            bad("-J/--modules", f"--method {self.method} needs at least 2 modules (J=1 is end-to-end: use --method bp)")
        self._check_pipeline(bad)
        if self.uses_infopro and not HEADS[self.aux].infopro:
            *first, last = [name for name, head in HEADS.items() if head.infopro]
            bad("--aux", f"InfoPro uses InfoPro's AuxClassifier heads: {', '.join(first)} or {last}")
        if self.period < 1:
            bad("-P/--period", f"must be >= 1, got {self.period}")
        if self.duration < 0:
            bad("-Q/--duration", f"must be >= 0, got {self.duration}")
        if self.epochs < 1:
            bad("--epochs", f"must be >= 1, got {self.epochs}")
        if self.workers < 0:
            bad("--workers", f"must be >= 0, got {self.workers}")
        if self.image_size is not None and self.image_size < 8:
            bad("--image-size", f"must be >= 8 pixels, got {self.image_size}")
        if self.resident_budget <= 0:
            bad("--resident-budget", f"must be > 0 MiB, got {self.resident_budget}")
        if self.data_pipeline == "stream" and DATASETS[self.dataset].reads != "imagefolder":
            bad("--data-pipeline", f"stream reads ImageFolder trees; --dataset {self.dataset} is decoded whole "
                "(use resident or auto)")
        if (self.data_pipeline == "resident" and DATASETS[self.dataset].reads == "imagefolder"
                and self.recipe == "imagenet"):
            bad("--data-pipeline", "resident cannot train --recipe imagenet: its random resized crops need the "
                "full-size images; use stream or auto")
        if self.batch_size is None:
            self.batch_size = data_mod.run_defaults(self.dataset, self.recipe).batch_size
        if self.lr is None:
            self.lr = data_mod.run_defaults(self.dataset, self.recipe).lr
        if not 1 <= self.batch_size <= 65536:
            bad("-b/--batch-size", f"must be in 1..65536, got {self.batch_size}")
        if self.test_batch_size is None:
            self.test_batch_size = self.batch_size
        if self.test_batch_size < 1:
            bad("--test-batch-size", f"must be >= 1, got {self.test_batch_size}")
        if not (0.0 < self.lr <= 100.0):
            bad("--lr", f"must be in (0, 100], got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            bad("--momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            bad("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            bad("--warmup-epochs", f"must be in 0..epochs-1, got {self.warmup_epochs}")
        if self.aux_widen <= 0:
            bad("--aux-widen", f"must be > 0, got {self.aux_widen}")
        if self.aux_feature_dim < 1:
            bad("--aux-feature-dim", f"must be >= 1, got {self.aux_feature_dim}")
        for flag, v in (("--train-subset", self.train_subset), ("--test-subset", self.test_subset)):
            if v is not None and v < 1:
                bad(flag, f"must be >= 1, got {v}")
        if self.synthetic_train < 1 or self.synthetic_test < 1:
            bad("--synthetic-train/--synthetic-test", "must be >= 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("--device", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if not 0.0 <= self.droprate < 1.0:
            bad("--droprate", f"must be in [0, 1), got {self.droprate}")
        if self.lean_blocks and self.amp:
            bad("--lean-blocks", "supports fp32 training only; drop --amp or --lean-blocks")
        if self.lean_blocks and self.droprate > 0:
            bad("--lean-blocks", "does not implement dropout; use --droprate 0")
        if self.compile_mode not in COMPILE_MODES:
            bad("--compile-mode", f"{self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and not self.compile:
            bad("--compile-mode", "only applies with --compile; add --compile")
        if self.threads < 0:
            bad("--threads", f"must be >= 0 (0: torch's default or measured), got {self.threads}")
        if self.cuda_graphs and self.optimizer_kernel == "foreach":
            bad("--optimizer-kernel", "foreach turns the lr tensor into a host number every step; --cuda-graphs "
                "needs fused (or auto)")
        if self.compile and self.cuda_graphs and self.compile_mode in CUDAGRAPH_MODES:
            bad("--compile-mode", f"{self.compile_mode} captures CUDA graphs itself, as does --cuda-graphs; use "
                "--compile-mode default or max-autotune-no-cudagraphs with --cuda-graphs, or drop --cuda-graphs")
        if self.sync_bn and self.lean_blocks:
            bad("--sync-bn", "--lean-blocks computes batch norm without calling it, so it would not synchronise; "
                "drop one of them")
        if self.sync_bn and self.compile:
            bad("--sync-bn", "is not traced by --compile; drop one of them")
        if self.compile and self.lean_blocks:
            bad("--compile", "does not trace --lean-blocks (a hand-written backward with in-place updates); "
                "drop one of them")
        if self.compile and self.head_kernels == "triton":
            bad("--head-kernels", "triton kernels are not traced by --compile (Inductor fuses the heads itself); "
                "use --head-kernels auto or eager")
        if self.memory_budget is not None and self.memory_budget <= 0:
            bad("--memory-budget", f"must be > 0 MiB, got {self.memory_budget}")
        if self.global_memory != "auto" and self.checkpoint_global:
            bad("--global-memory", f"{self.global_memory} and --checkpoint-global both set the global-step "
                "checkpointing; give one of them")
        if not self.global_memory_factor > 0:
            bad("--global-memory-factor", f"must be > 0, got {self.global_memory_factor}")
        if self.save_every < 0:
            bad("--save-every", f"must be >= 0, got {self.save_every}")
        if self.keep_checkpoints < 1:
            bad("--keep-checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        if self.overwrite and self.resume is not None:
            bad("--overwrite", "starts a new run and --resume continues one: give one of them")
        if self.resume is not None and not self.resume.strip():
            bad("--resume", "needs a checkpoint file or 'auto'")
        if not self.heartbeat >= 0:
            bad("--heartbeat", f"must be >= 0 seconds (0: off), got {self.heartbeat}")
        # what the run's local objectives refuse (the methods' own list, pgl_fast.core.methods)
        for on, flag, option in ((self.pipeline > 1, "--pipeline", "pipeline"), (self.compile, "--compile", "compile"),
                                 (self.cuda_graphs, "--cuda-graphs", "cuda_graphs")):
            for name in self.local_objectives if on else ():
                why = METHOD_CLASSES[name].refuses.get(option)
                if why:
                    bad(flag, f"is not supported with {name.upper()}: {why}; drop {flag}")
        if self.uses_infopro:
            self._resolve_lambdas(bad)
        if self.uses_hpff:
            self._check_hpff(bad)

    @property
    def local_objectives(self) -> tuple[str, ...]:
        """The local objectives this run trains with: ``--method``'s own, PGL's ``--pgl-local``, and
        under MAN its ``--man-base`` (empty for bp)."""
        name = self.pgl_local if self.method == "pgl" else self.method
        if name == "bp":
            return ()
        return (name, self.man_base) if name == "man" else (name,)

    @property
    def uses_infopro(self) -> bool:
        return "infopro" in self.local_objectives

    @property
    def uses_infopro_lambdas(self) -> bool:
        """InfoPro's lambdas (--ixx-*/--ixy-*) weigh a loss of this run: InfoPro's own, or the
        InfoPro base of HPFF's cascade (whose task term is always softmax: ``uses_infopro`` stays
        False there, so InfoPro's other flags and head limits do not apply)."""
        return self.uses_infopro or self.uses_hpff and self.hpff_base == "infopro"

    @property
    def uses_man(self) -> bool:
        return "man" in self.local_objectives

    @property
    def custom_model(self) -> bool:
        """A torchvision model or a user's factory, cut by --cuts (not a CIFAR ResNet preset)."""
        return self.model is not None or self.arch.startswith("torchvision:")

    @property
    def cut_list(self) -> list[str]:
        return [c.strip() for c in (self.cuts or "").split(",") if c.strip()]

    @property
    def recipe_name(self) -> str:
        return DATASETS[self.dataset].recipe or self.recipe

    @property
    def split_recipe(self) -> str:
        return data_mod.run_defaults(self.dataset, self.recipe).split_table

    @property
    def nesterov(self) -> bool:
        return not self.no_nesterov and self.momentum > 0

    @property
    def uses_hpff(self) -> bool:
        """HPFF is the local objective: ``--method hpff``, or PGL over it."""
        return "hpff" in self.local_objectives

    def _check_hpff(self, bad) -> None:
        if not (self.hpff_wx >= 0 and self.hpff_wy >= 0 and self.hpff_wx + self.hpff_wy > 0):
            bad("--hpff-wx/--hpff-wy", f"must be >= 0 and not both 0, got {self.hpff_wx} and {self.hpff_wy}")
        if self.hpff_patches < 1:
            bad("--hpff-patches", f"must be >= 1, got {self.hpff_patches}")
        if self.hpff_base == "infopro":
            for name, v in zip(("ixx_1", "ixy_1", "ixx_2", "ixy_2"), HPFF_LAMBDAS):
                if getattr(self, name) is None:
                    setattr(self, name, float(v))

    def _resolve_lambdas(self, bad) -> None:
        given = [self.ixx_1, self.ixy_1, self.ixx_2, self.ixy_2]
        if all(v is not None for v in given):
            return
        key = (self.recipe_name, self.arch, self.modules, self.split == "balanced")
        table = INFOPRO_LAMBDAS.get(key)
        if table is None:
            bad("--ixx-1/--ixy-1/--ixx-2/--ixy-2",
                f"InfoPro has no lambda defaults for {key[1]} J={key[2]} on {key[0]}"
                f"{' (balanced)' if key[3] else ''}; pass all four")
        for name, v in zip(("ixx_1", "ixy_1", "ixx_2", "ixy_2"), table):
            if getattr(self, name) is None:
                setattr(self, name, float(v))

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
        return {"endpoints": dict(zip(("ixx_1", "ixy_1", "ixx_2", "ixy_2"), ends)), "source": source,
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


def _no_global_epochs(c: TrainConfig) -> str | None:
    if c.method not in ("bp", "pgl"):
        return f"with --method {c.method} (it has no global epochs)"
    if c.method == "pgl" and c.duration == 0:
        return "with -Q 0 (no global epochs)"
    return None


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
     lambda c: f"with --dataset {c.dataset} (only {', '.join(n for n, d in DATASETS.items() if d.recipe is None)} "
     "takes a recipe)" if DATASETS[c.dataset].recipe is not None else None),
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
