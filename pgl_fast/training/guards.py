"""The training loop's guards: a stop on the first non-finite loss or gradient (before anything
poisoned is saved), SIGINT/SIGTERM turned into a checkpoint and a clean exit, and the test hooks
that deliver a signal or a SIGKILL at a known step."""
from __future__ import annotations

import os
import signal
import threading


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the last checkpoint is intact."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training, after the mid-epoch checkpoint was written. A
    ``KeyboardInterrupt``, as the Ctrl-C it stands for: a caller's ``except Exception:`` around
    ``fit()`` does not swallow it. ``code``: the exit status a process ends with (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Interrupts:
    """SIGINT and SIGTERM handlers for the training loop: the first signal is recorded and acted on
    at the next step boundary (a checkpoint, then a clean exit); a second one exits at once. Every
    checkpoint is written to a temporary file and renamed, so exiting at any instant never leaves a
    half-written one under a final name."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the defaults stay
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now; the newest complete checkpoint "
                        "is intact\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: stopping at the next step boundary with a checkpoint "
                    "(send it again to exit at once)\n".encode())


def check_finite(tr: dict, epoch: int, phase: str, J: int, *, partial: bool = False) -> None:
    """Raise NonFiniteError naming the *first* non-finite event (loss or gradient) of the epoch:
    epoch, step, phase and module."""
    events = [(s, order, j, what) for order, (key, what) in enumerate((("first_bad", "loss"), ("first_bad_grad", "gradient")))
              for j, s in enumerate(tr[key]) if s >= 0]
    if events:
        s, _, j, what = min(events)
        kind = "final loss" if j == J - 1 else "local loss"
        raise NonFiniteError(
            f"non-finite {what} at epoch {epoch + 1}, step {s + 1}, phase {phase}, module {j} ({kind})"
            f"{' (found before a mid-epoch checkpoint)' if partial else ''}")


def signal_hook(epoch: int, step) -> None:
    """Test hook: ``PGL_FAST_SIGNAL_AT=epoch:step:SIG[,epoch:step:SIG...]`` (1-based epoch,
    completed steps of it; SIG one of INT, TERM) sends this process that signal right there, once
    per entry, so that interrupt handling is tested at a known step."""
    spec = os.environ.get("PGL_FAST_SIGNAL_AT")
    if not spec:
        return
    for entry in spec.split(","):
        e, s, name = entry.split(":")
        if f"{e}:{s}" == f"{epoch + 1}:{step}":
            os.kill(os.getpid(), getattr(signal, "SIG" + name))


def kill_hook(epoch: int, step) -> None:
    """Test hook: ``PGL_FAST_KILL_AT=epoch:step`` (1-based epoch, completed steps of it, or ``end``
    once the epoch's checkpoint and metrics line are written) SIGKILLs this process right there, to
    test resume from a real, abrupt death."""
    spec = os.environ.get("PGL_FAST_KILL_AT")
    if spec and spec == f"{epoch + 1}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
