"""How a step executes on one device: device and precision, compilation and CUDA graphs, kernels,
threads, and the memory trade-offs of the global steps (checkpointing, lean blocks)."""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.compile import COMPILE_MODES, CUDAGRAPH_MODES
from .base import _f, bad

# --global-memory-factor's default. Predicted for resnet32 with 1c2f heads: at J=4 coarse comes to
# 0.97x the local peak, at J=8 modules to 1.13x (coarse 1.42x), at J=16 the smallest is modules at
# 1.62x. 1.25 takes the segmentation that gets near the local peak wherever one does, and refuses a
# faster one that gives back much of the saving (coarse at J=8); where nothing fits, the smallest runs.
DEFAULT_FACTOR = 1.25


@dataclass(kw_only=True)
class RuntimeConfig:
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
    lean_blocks: bool = _f(False, "memory-lean BasicBlock backward (recomputes conv1, in-place BN/ReLU backward): same gradients, less memory held; fp32 only", group="runtime")
    global_segments: str = _f("modules", "checkpoint segments of global steps with --checkpoint-global: one per module, per unit, ~sqrt(units) coarse ones, or auto (the planner's smallest predicted peak)", group="runtime", choices=("modules", "units", "coarse", "auto"))
    memory_budget: float | None = _f(None, "memory budget in MiB: the planner picks the fastest global-step checkpointing that fits (among none, coarse, modules, units, or those --global-memory / --checkpoint-global name), from measured predictions", group="runtime", metavar="MiB")
    global_memory: str = _f("auto", "checkpointing of global steps: auto = for pgl the fastest segmentation whose predicted peak stays within --global-memory-factor x the local-step peak (bp: none); or exactly none / modules / units / coarse", group="runtime", choices=("auto", "none", "modules", "units", "coarse"))
    global_memory_factor: float = _f(DEFAULT_FACTOR, "with --global-memory auto: how far above the predicted local-step peak PGL's global steps may go", group="runtime", metavar="F")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the runtime fields alone decide."""
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("--device", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.lean_blocks and self.amp:
            bad("--lean-blocks", "supports fp32 training only; drop --amp or --lean-blocks")
        if self.threads < 0:
            bad("--threads", f"must be >= 0 (0: torch's default or measured), got {self.threads}")
        self._check_compile()
        if self.memory_budget is not None and self.memory_budget <= 0:
            bad("--memory-budget", f"must be > 0 MiB, got {self.memory_budget}")
        if self.global_memory != "auto" and self.checkpoint_global:
            bad("--global-memory", f"{self.global_memory} and --checkpoint-global both set the global-step "
                "checkpointing; give one of them")
        if not self.global_memory_factor > 0:
            bad("--global-memory-factor", f"must be > 0, got {self.global_memory_factor}")

    def _check_compile(self) -> None:
        """--compile, --cuda-graphs and the kernels they can run together with."""
        if self.compile_mode not in COMPILE_MODES:
            bad("--compile-mode", f"{self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and not self.compile:
            bad("--compile-mode", "only applies with --compile; add --compile")
        if self.cuda_graphs and self.optimizer_kernel == "foreach":
            bad("--optimizer-kernel", "foreach turns the lr tensor into a host number every step; --cuda-graphs "
                "needs fused (or auto)")
        if self.compile and self.cuda_graphs and self.compile_mode in CUDAGRAPH_MODES:
            bad("--compile-mode", f"{self.compile_mode} captures CUDA graphs itself, as does --cuda-graphs; use "
                "--compile-mode default or max-autotune-no-cudagraphs with --cuda-graphs, or drop --cuda-graphs")
        if self.compile and self.lean_blocks:
            bad("--compile", "does not trace --lean-blocks (a hand-written backward with in-place updates); "
                "drop one of them")
        if self.compile and self.head_kernels == "triton":
            bad("--head-kernels", "triton kernels are not traced by --compile (Inductor fuses the heads itself); "
                "use --head-kernels auto or eager")
