"""What a run shows while it trains: a progress bar per epoch (tqdm, on a terminal), heartbeat
lines where no bar is drawn (a log file), and the whole run's ETA from the epochs timed so far."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def progress_bar(mode: str, total: int, desc: str):
    enabled = mode == "on" or (mode == "auto" and sys.stderr.isatty())
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def format_duration(seconds: float) -> str:
    """Compact wall time: 45s, 12m05s, 3h10m, 2d04h."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def run_eta(phases: list[str], done: list[tuple[str, float]], next_epoch: int) -> float | None:
    """Seconds left for epochs ``next_epoch ..`` of a run whose epoch phases are ``phases``, from the
    wall times ``done`` = [(phase, seconds)] of epochs timed so far: every remaining epoch costs the
    mean time of the timed epochs of its own phase (PGL's global epochs cost more than its local
    ones), or the mean of all timed epochs while its phase has none yet. None before any epoch."""
    if not done:
        return None
    overall = sum(t for _, t in done) / len(done)
    by_phase: dict[str, list[float]] = {}
    for ph, t in done:
        by_phase.setdefault(ph, []).append(t)
    mean = {ph: sum(ts) / len(ts) for ph, ts in by_phase.items()}
    return sum(mean.get(ph, overall) for ph in phases[next_epoch:])


class Heartbeat:
    """Progress lines inside an epoch where no progress bar is drawn (a log file, nohup): at most
    one every ``every`` seconds. It only reads the host clock, never the device, so it adds no
    synchronisation; on CUDA the rate it reports is the rate batches are queued, which the bounded
    launch queue keeps close to the rate they run."""

    def __init__(self, every: float, epoch: int, epochs: int, steps: int, batch: int, *, clock=time.monotonic,
                 first_step: int = 0, out=None):
        self.every, self.epoch, self.epochs, self.steps, self.batch = every, epoch, epochs, steps, batch
        self.clock, self.out = clock, out
        self.t0 = self.last = clock()
        self.first_step = first_step

    def step(self, done: int) -> str | None:
        """Call after step ``done`` (1-based) finished; returns the line it printed, if any."""
        now = self.clock()
        if now - self.last < self.every:
            return None
        self.last = now
        ran = done - self.first_step
        per_step = (now - self.t0) / max(ran, 1)
        rate = ran * self.batch / max(now - self.t0, 1e-9)
        line = (f"epoch {self.epoch + 1}/{self.epochs} step {done}/{self.steps}, {rate:.1f} img/s, "
                f"epoch ETA {format_duration(per_step * (self.steps - done))}")
        print(line, file=self.out or sys.stdout, flush=True)
        return line
