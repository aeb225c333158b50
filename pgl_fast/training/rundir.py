"""The output directory of a run: what it holds, clearing it on request, and a lock for the run's
lifetime.

A directory *holds a run* when it has any of the files a training run writes (``config.json``,
``header.json``, ``metrics.jsonl``, ``summary.json``) or a checkpoint under ``checkpoints/``. Files
pgl_fast does not write (the experiment runner's ``command.txt`` and ``train.log``, a user's notes)
never count and are never removed.

The lock is ``fcntl.flock`` on ``<dir>/.lock``, held through an open descriptor until the process
ends. The kernel drops a flock when its holder dies, however it dies, so a lock left behind by a
killed run is simply taken over by the next one; the file only carries who holds it (pid, host,
command, start time) so that a refused second run can name the first.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field

from . import checkpoint as ckpt
from ..errors import UserError
from ..jsonio import JsonlWriter, read_json, tmp_path

RUN_FILES = ("config.json", "header.json", "metrics.jsonl", "summary.json")
LOCK_NAME = ".lock"
_TMP = re.compile(r"ckpt-e\d+-s\d+\.pt\.tmp$")


def check_output_path(path: str) -> None:
    """Refuse an ``--output-dir`` that can never be a directory, before anything is created: the
    path (or a folder above it) is a file, or the nearest existing folder above it is not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output-dir {path}: is a file, not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"--output-dir {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path}: not writable ({probe} does not allow writing)")


@dataclass
class RunInfo:
    """What an earlier run left in a directory."""
    path: str
    files: list[str] = field(default_factory=list)        # of RUN_FILES, present
    checkpoints: list[str] = field(default_factory=list)  # complete checkpoint files, oldest first
    epochs_done: int = 0
    steps_done: int = 0       # steps of the epoch in progress, from the newest checkpoint
    epochs_total: int | None = None
    finished: bool = False

    def describe(self) -> str:
        total = "?" if self.epochs_total is None else str(self.epochs_total)
        text = f"{self.epochs_done}/{total} epochs done"
        if self.steps_done:
            text += f" and {self.steps_done} steps of epoch {self.epochs_done + 1}"
        if self.finished:
            text += ", finished"
        elif not self.checkpoints:
            text += ", no checkpoint"
        return text


def inspect(path: str) -> RunInfo | None:
    """The run held in ``path``, or None when there is none (no directory, an empty one, or only
    files pgl_fast does not write)."""
    if not os.path.isdir(path):
        return None
    files = [f for f in RUN_FILES if os.path.isfile(os.path.join(path, f))]
    checkpoints = ckpt.list_checkpoints(path)
    if not files and not checkpoints:
        return None
    info = RunInfo(path=path, files=files, checkpoints=checkpoints, finished="summary.json" in files)
    # progress: the newest checkpoint's position, or the epochs logged if those went further (the
    # metrics line of an epoch is written just after its checkpoint)
    if checkpoints:
        m = re.search(r"ckpt-e(\d+)-s(\d+)\.pt$", checkpoints[-1])
        info.epochs_done, info.steps_done = int(m.group(1)), int(m.group(2))
    logged = [r.get("epoch") for r in JsonlWriter(os.path.join(path, "metrics.jsonl")).read()
              if r.get("event") == "epoch" and isinstance(r.get("epoch"), int)]
    if logged and max(logged) > info.epochs_done:
        info.epochs_done, info.steps_done = max(logged), 0
    cfg = read_json(os.path.join(path, "config.json"), {}) or {}
    if isinstance(cfg, dict) and isinstance(cfg.get("epochs"), int):
        info.epochs_total = cfg["epochs"]
    return info


def clear_run(path: str) -> list[str]:
    """Remove the files a training run wrote in ``path`` (RUN_FILES, their temporary files, the
    checkpoints and ``checkpoints/`` itself once empty); nothing else. Returns what was removed,
    relative to ``path``."""
    removed = []
    for name in RUN_FILES:
        for f in (name, tmp_path(name)):
            if os.path.isfile(os.path.join(path, f)):
                os.remove(os.path.join(path, f))
                removed.append(f)
    d = ckpt.checkpoint_dir(path)
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if ckpt._NAME.fullmatch(f) or _TMP.fullmatch(f):
                os.remove(os.path.join(d, f))
                removed.append(os.path.join("checkpoints", f))
        try:
            os.rmdir(d)
        except OSError:  # something else lives there: leave it
            pass
    return removed


def summarize_removed(removed: list[str]) -> str:
    n_ckpt = sum(1 for f in removed if f.startswith("checkpoints" + os.sep) and f.endswith(".pt"))
    names = [f for f in removed if not f.startswith("checkpoints" + os.sep)]
    if n_ckpt:
        names.append(f"{n_ckpt} checkpoint{'s' if n_ckpt != 1 else ''}")
    return ", ".join(names) or "nothing"


class DirLock:
    """An exclusive lock on an output directory for as long as this object (or the process) lives."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: str, command: str) -> "DirLock":
        lock_path = os.path.join(path, LOCK_NAME)
        # no O_TRUNC: the current holder's record must survive a refused attempt
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{path} is in use by {describe_holder(lock_path)}; wait for it to end or "
                              "use another --output-dir") from None
        except OSError as e:  # e.g. a file system without locks
            os.close(fd)
            raise UserError(f"--output-dir {path}: cannot lock {lock_path} ({e.strerror or e})") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def describe_holder(lock_path: str) -> str:
    """'pid 1234 on host (python -m pgl_fast.train ...) since <time>', from the lock file."""
    try:
        with open(lock_path) as f:
            rec = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        rec = {}
    if not isinstance(rec, dict) or "pid" not in rec:
        return "another process (it has not recorded itself yet)"
    return f"pid {rec['pid']} on {rec.get('host', '?')} ({rec.get('command', '?')}) since {rec.get('since', '?')}"


def check_output_dir(path: str) -> None:
    """Refuse an --output-dir that can never work, before anything is created."""
    check_output_path(path)


def prepare_output_dir(path: str, command: str) -> "DirLock":
    """Create the output dir and lock it for this run's lifetime. Nothing in it is touched before
    the lock is held, so what it holds is inspected under the lock."""
    check_output_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
        return DirLock.acquire(path, command)
    except OSError as e:
        raise UserError(f"--output-dir {path}: not writable ({e.strerror or e})") from None


def claim_output_dir(out: str, resume: str | None, overwrite: bool, config: dict,
                     allow_schedule_change: bool = False) -> tuple[dict | None, str | None]:
    """Decide, under the lock, what to do with what ``--output-dir`` already holds: continue it
    (``--resume``), clear it (``--overwrite``, or ``--resume auto`` over a start that never reached
    a checkpoint), or refuse. Returns (checkpoint state for ``--resume auto`` or None, a line to
    print or None)."""
    info = inspect(out)
    if resume == "auto":
        state = ckpt.find_resume("auto", out, config, allow_schedule_change)
        if state is not None:
            return state, None
        note = f"--resume auto: no checkpoint in {ckpt.checkpoint_dir(out)}; starting a new run"
        if info is not None:
            # an earlier start that died before its first checkpoint: its files hold nothing a
            # restart could continue from, and would otherwise sit beside the new run's
            note += f" (removed the files of an earlier start that has none: {summarize_removed(clear_run(out))})"
        return None, note
    if resume is not None:
        inside = os.path.dirname(os.path.abspath(resume)) == os.path.abspath(ckpt.checkpoint_dir(out))
        if info is not None and not inside:
            raise UserError(f"--resume {resume}: {out} holds another run ({info.describe()}); resume into "
                            "an empty --output-dir, or use --resume auto to continue the run that is there")
        return None, None
    if info is None:
        return None, None
    if not overwrite:
        raise UserError(f"{out} holds a run: {info.describe()}; use --resume auto, another --output-dir, "
                        "or --overwrite")
    return None, f"--overwrite: removed the earlier run in {out} ({info.describe()}): " \
                 f"{summarize_removed(clear_run(out))}"
