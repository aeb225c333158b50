"""Pure schedule functions: the phase names, and the learning rate of each epoch (which phase an
epoch runs is the method's: ``pgl_fast.core.methods``).

Epochs are 0-based here (``epoch`` = 0 .. E-1); the InfoPro LR formula is written with 1-based
``e = epoch + 1``.
"""
from __future__ import annotations

import math

LOCAL, GLOBAL = "local", "global"


def lr_at_epoch(epoch: int, *, base_lr: float, epochs: int, sched: str = "cosine",
                warmup_epochs: int = 0, warmup_lr: float = 0.01,
                milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Learning rate of 0-based ``epoch``, set once per epoch as InfoPro does.

    ``cosine``: per-epoch cosine annealing from base_lr (torch's CosineAnnealingLR with
    T_max = E): lr = 0.5 * base_lr * (1 + cos(pi * epoch / E)); every epoch trains.
    ``infopro-cosine``: InfoPro's ``adjust_learning_rate`` exactly, with e = epoch + 1:
    lr = 0.5 * base_lr * (1 + cos(pi * e / E)), so the last epoch runs at exactly 0.
    For both, during ``warmup_epochs`` W the rate is blended linearly from ``warmup_lr``:
    lr = cos_part * (e - 1) / W + warmup_lr * (W + 1 - e) / W  (InfoPro: W = 10, warmup_lr = 0.01).
    ``step``: base_lr * gamma ** (number of milestones <= epoch).  ``constant``: base_lr.
    """
    e = epoch + 1
    if sched == "constant":
        return base_lr
    if sched == "step":
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    if sched not in ("cosine", "infopro-cosine"):
        raise ValueError(f"unknown schedule {sched!r}")
    t = e if sched == "infopro-cosine" else epoch
    lr = 0.5 * base_lr * (1.0 + math.cos(math.pi * t / epochs))
    if warmup_epochs > 0 and e <= warmup_epochs:
        lr = lr * (e - 1) / warmup_epochs + warmup_lr * (warmup_epochs + 1 - e) / warmup_epochs
    return lr
