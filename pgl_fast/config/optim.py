"""How the parameters are optimised: epochs, batch size, SGD and its learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass

from .base import _f, bad


@dataclass(kw_only=True)
class OptimConfig:
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the optimisation fields alone decide. The batch size's and learning rate's
        defaults depend on the data set: a ``None`` left here is resolved by the composed config,
        and checked where it is given."""
        if self.epochs < 1:
            bad("--epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size is not None and not 1 <= self.batch_size <= 65536:
            bad("-b/--batch-size", f"must be in 1..65536, got {self.batch_size}")
        if self.test_batch_size is None:
            self.test_batch_size = self.batch_size
        if self.test_batch_size is not None and self.test_batch_size < 1:
            bad("--test-batch-size", f"must be >= 1, got {self.test_batch_size}")
        if self.lr is not None and not (0.0 < self.lr <= 100.0):
            bad("--lr", f"must be in (0, 100], got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            bad("--momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            bad("--weight-decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            bad("--warmup-epochs", f"must be in 0..epochs-1, got {self.warmup_epochs}")

    @property
    def nesterov(self) -> bool:
        return not self.no_nesterov and self.momentum > 0
