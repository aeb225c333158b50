"""What a run is as a job: its output folder, resuming and checkpointing, seeding, what it prints,
and the modes that only describe or plan it."""
from __future__ import annotations

from dataclasses import dataclass

from .base import _f, bad


@dataclass(kw_only=True)
class RunConfig:
    plan: bool = _f(False, "print the memory plan (predicted peak per phase and checkpoint choice) and exit", group="output")
    seed: int = _f(0, "random seed", group="runtime")
    deterministic: bool = _f(False, "deterministic algorithms (slower)", group="runtime")
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the run fields alone decide."""
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
