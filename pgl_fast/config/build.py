"""From a :class:`~pgl_fast.config.TrainConfig` to the objects a run trains: the device, the
:class:`~pgl_fast.models.local_model.LocalModel` (a CIFAR ResNet preset, a torchvision model or a
user's factory, split as the flags say), the method object and the
:class:`~pgl_fast.core.learner.LocalLearner`. The CLI, the profiler and the planner all build
through here, so a step measured is a step trained."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import MethodConfig, ModelConfig, TrainConfig
from ..core.learner import LocalLearner
from ..core.methods import MAN, METHODS, InfoPro, Method, from_name
from ..core.schedule import lr_at_epoch
from ..distributed import DataParallelLearner
from ..errors import UserError
from ..models.heads import HEADS
from ..models.local_model import LocalModel
from ..models.presets import cifar_resnet, factory_model, torchvision_model
from ..models.split import split
from ..runtime.head_select import configure_head_kernels
from ..runtime.optim import sgd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA GPU is available here; use --device cpu or auto")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {cfg.device}: only {torch.cuda.device_count()} GPU(s) visible")
    if cfg.cuda_graphs and dev.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU (device here: cpu); drop the flag to train eagerly")
    if cfg.amp and cfg.amp_dtype == "fp16" and dev.type != "cuda":
        raise UserError("--amp-dtype fp16 needs a CUDA GPU; use the default bf16 on the CPU")
    return dev


def resolve_head_kernels(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the fused head kernels may run at all. With ``--head-kernels auto`` on CUDA the
    choice per head is then measured (``head_select.configure_head_kernels``); on the CPU ``auto``
    is eager, since Triton runs there only under its interpreter."""
    method = method_of(cfg)
    if cfg.head_kernels == "eager" or not method.has_heads or cfg.compile:  # --compile: Inductor fuses the heads
        return False
    why = method.refusal("fused_heads")
    if why:
        if cfg.head_kernels == "triton":
            raise UserError(f"--head-kernels triton: {why}; use --head-kernels auto or eager")
        return False
    if cfg.head_kernels == "auto" and device.type != "cuda":
        return False
    if not HEADS[cfg.aux].fused_kernel:
        if cfg.head_kernels == "triton":
            raise UserError(f"--head-kernels triton: the {cfg.aux} head has no fused kernel; use --head-kernels eager")
        return False
    from ..kernels import triton_available  # optional: Triton's pieces load only where heads may run fused

    ok, reason = triton_available(device)
    if not ok:
        if cfg.head_kernels == "triton":
            raise UserError(f"--head-kernels triton: {reason}")
        return False
    return True


def method_of(cfg: TrainConfig) -> Method:
    """The method object ``--method`` names, configured by its flags: each registered method builds
    itself (``Method.from_config``), and a base or local objective it names (``--pgl-local``,
    ``--man-base``) is built from the same flags."""
    def objective(name: str) -> Method:
        return from_name(name) if name not in METHODS else METHODS[name].from_config(cfg, objective)

    return objective(cfg.method)


def build_model(cfg: TrainConfig, num_classes: int, image_size: int) -> LocalModel:
    """The network of ``cfg``, split into its local modules, with aux heads unless the method has none."""
    method = method_of(cfg)
    aux = cfg.aux if method.has_heads else None
    if cfg.custom_model:
        if cfg.model:
            net = factory_model(cfg.model, num_classes)
        else:
            net = torchvision_model(cfg.arch.split(":", 1)[1], num_classes, cifar_stem_=cfg.cifar_stem)
        cuts = [int(c) if isinstance(net, torch.nn.Sequential) and c.lstrip("-").isdigit() else c
                for c in cfg.cut_list]
        return _with_aux_path(method, split(net, cuts, aux=aux, input_shape=(3, image_size, image_size),
                                            num_classes=num_classes))
    objective = method.objective
    objective = objective.base if isinstance(objective, MAN) else objective
    infopro = isinstance(objective, InfoPro)
    model = cifar_resnet(
        # bp keeps the J-module split too: it only sets the checkpoint segments (--checkpoint-global)
        cfg.arch, cfg.modules, num_classes=num_classes, image_size=image_size, split=cfg.split,
        split_recipe=cfg.split_recipe, aux=aux, aux_widen=cfg.aux_widen, aux_feature_dim=cfg.aux_feature_dim,
        head_out_dim=cfg.aux_feature_dim if infopro and objective.contrast else None,
        decoders=infopro, droprate=cfg.droprate,
    )
    return _with_aux_path(method, model)


def _with_aux_path(method: Method, model: LocalModel) -> LocalModel:
    """The networks a method adds beyond the plain heads exist from here on -- MAN's aux path (its
    copies, and heads at the copied unit's shape), HPFF's second head set and patch decoders -- so
    the module table, the planner and the profiler see what the run trains. The other methods are
    prepared by the learner, as before (their random streams are unchanged)."""
    if not method.plain_heads or method.reach > 1:
        method.prepare(model)
    return model


def lr_schedule(cfg: TrainConfig):
    def lr(epoch: int) -> float:
        return lr_at_epoch(epoch, base_lr=cfg.lr, epochs=cfg.epochs, sched=cfg.sched,
                           warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                           milestones=(cfg.epochs // 2, cfg.epochs * 3 // 4))

    return lr


def build_learner(cfg: TrainConfig, model: LocalModel, plan=None, *, cuda_graphs: bool | None = None,
                  ctx=None) -> LocalLearner:
    """The learner a run of ``cfg`` trains ``model`` with (also used by the profiler). With a
    :class:`~pgl_fast.memory.planner.MemoryPlan` its global steps checkpoint exactly the plan's segments
    (None: not at all); without one (the profiler's fixed step kinds), ``--checkpoint-global``
    alone means one segment per module."""
    if plan is not None:
        checkpoint_global = plan.segments if plan.segments is not None else False
    else:
        checkpoint_global = bool(cfg.checkpoint_global)
    kw = dict(
        optimizer=sgd(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                      kernel="fused" if cfg.optimizer_kernel == "auto" else cfg.optimizer_kernel),
        amp=cfg.amp_dtype if cfg.amp else None, compile=cfg.compile_mode if cfg.compile else None,
        cuda_graphs=cfg.cuda_graphs if cuda_graphs is None else cuda_graphs,
        checkpoint_global=checkpoint_global, lr_schedule=lr_schedule(cfg), channels_last=cfg.channels_last)
    if ctx is not None and ctx.distributed:
        return DataParallelLearner(model, method_of(cfg), ctx=ctx, sync_bn=cfg.sync_bn, **kw)
    if cfg.sync_bn:
        raise UserError("--sync-bn synchronises batch norm across the ranks of a torchrun launch; this run has one "
                        "process (start it with torchrun --nproc_per_node=N, or drop --sync-bn)")
    return LocalLearner(model, method_of(cfg), **kw)


@dataclass(frozen=True, eq=False)
class StepFactory:
    """Builds, for one step kind, a fresh network and learner of a run: what the planner and the
    profiler measure. The network is the run's (its model config, its heads and its method's aux
    networks); the step is ``bp`` (end-to-end, no heads) for the kinds ``bp``/``bp_ckpt``, else
    PGL's over the run's local objective, whose local and global steps are the ones a local method
    and PGL train. Made from a run by :func:`step_factory`, or by the profiler from its flags."""

    model: ModelConfig
    method: MethodConfig
    lean_blocks: bool = False
    num_classes: int = 10
    image_size: int = 32

    @property
    def bp(self) -> bool:
        """The run trains end to end: its only step is ``bp``."""
        return self.method.method == "bp"

    @property
    def key(self) -> tuple:
        """Everything the built steps depend on, hashable (the planner caches by it)."""
        return (dataclasses.astuple(self.model), dataclasses.astuple(self.method), self.lean_blocks,
                self.num_classes, self.image_size)

    def config(self, kind: str, *, batch: int, dtype: str, device: torch.device, head_kernels: str,
               channels_last: bool, seed: int) -> TrainConfig:
        """The config a step of ``kind`` trains with on ``device``: eager, one process."""
        if kind.startswith("bp"):
            method = {"method": "bp", "aux": self.method.aux}
        else:
            objective = self.method.local_objectives[0] if self.method.local_objectives else "dgl"
            method = dict(dataclasses.asdict(self.method), method="pgl", pgl_local=objective)
        return TrainConfig(**dataclasses.asdict(self.model), **method, batch_size=batch, lr=0.05,
                           device=str(device), amp=dtype != "fp32", amp_dtype="fp16" if dtype == "fp16" else "bf16",
                           checkpoint_global=kind.endswith("_ckpt"), channels_last=channels_last,
                           head_kernels=head_kernels, seed=seed)

    def __call__(self, kind: str, *, batch: int, dtype: str = "fp32", device: torch.device = torch.device("cpu"),
                 head_kernels: str = "eager", channels_last: bool = False, seed: int = 0):
        """(network, learner) of a fresh step of ``kind``, seeded by ``seed``."""
        cfg = self.config(kind, batch=batch, dtype=dtype, device=device, head_kernels=head_kernels,
                          channels_last=channels_last, seed=seed)
        use_kernels = resolve_head_kernels(cfg, device)
        torch.manual_seed(seed)
        net = build_model(cfg, self.num_classes, self.image_size).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        # the same per-head choice a training run makes (on CUDA, auto measures fused against eager)
        configure_head_kernels(net, head_kernels, use_kernels, batch=batch, device=device,
                               channels_last=channels_last, dtype=DTYPES[dtype])
        # --lean-blocks applies to the local-learning kinds; bp stays the plain eager baseline
        net.set_lean_blocks(self.lean_blocks and not kind.startswith("bp"))
        net.train()
        return net, build_learner(cfg, net, cuda_graphs=False)


def step_factory(cfg: TrainConfig, num_classes: int, image_size: int) -> StepFactory:
    """The steps of the run ``cfg`` on images of ``image_size`` with ``num_classes`` classes."""
    return StepFactory(model=cfg.component(ModelConfig), method=cfg.component(MethodConfig),
                       lean_blocks=cfg.lean_blocks, num_classes=num_classes, image_size=image_size)
