"""How a run spreads over the ranks of a torchrun launch: batch-norm synchronisation under data
parallel, and the module pipeline (stages, balance, depth, micro-batches, timeout)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import _f, bad


@dataclass(kw_only=True)
class StrategyConfig:
    sync_bn: bool = _f(False, "under torchrun (data parallel): batch-norm statistics over the global batch (an all-reduce batch norm on every device, exact for unequal shards) instead of per rank", group="distributed")
    pipeline: int = _f(1, "under torchrun with S ranks: pipeline the J modules over S stages (1: off); local steps as in one process, global steps a synchronous GPipe forward/backward", group="distributed", metavar="S")
    pipeline_balance: str = _f("even", "modules per stage with --pipeline: even (equal counts), auto (by each module's measured local-step time) or counts a,b,... summing to J", group="distributed", metavar="even|auto|a,b,...")
    pipeline_depth: int = _f(2, "with --pipeline: batches in flight between neighbouring stages (bounds the activation memory queued per rank)", group="distributed", metavar="D")
    pipeline_micro_batches: int = _f(1, "with --pipeline: GPipe micro-batches per global step (1: exactly the single-process step; more: batch norm per micro-batch)", group="distributed", metavar="M")
    pipeline_timeout: float = _f(300.0, "with --pipeline: seconds a stage waits for a neighbour before the run stops with an error", group="distributed", metavar="SECONDS")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the distributed fields alone decide (J and the runtime options the pipeline
        excludes are the composed config's checks)."""
        if self.pipeline < 1:
            bad("--pipeline", f"must be >= 1 stages, got {self.pipeline}")
        if self.pipeline_depth < 1:
            bad("--pipeline-depth", f"must be >= 1, got {self.pipeline_depth}")
        if self.pipeline_micro_batches < 1:
            bad("--pipeline-micro-batches", f"must be >= 1, got {self.pipeline_micro_batches}")
        if not self.pipeline_timeout > 0:
            bad("--pipeline-timeout", f"must be > 0 seconds, got {self.pipeline_timeout}")
        self.balance_counts()
        if self.pipeline > 1 and self.sync_bn:
            bad("--pipeline", "--sync-bn is for data parallel, which --pipeline does not combine with; drop it")

    def balance_counts(self) -> list[int] | None:
        """--pipeline-balance as module counts per stage (None for even and auto)."""
        b = self.pipeline_balance
        if b in ("even", "auto"):
            return None
        try:
            return [int(c) for c in b.split(",")]
        except ValueError:
            bad("--pipeline-balance", f"{b!r} is not even, auto or comma-separated module counts (e.g. 2,2)")
