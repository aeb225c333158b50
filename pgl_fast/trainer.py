"""``Trainer``: the training loop the CLI runs, for any :class:`~pgl_fast.core.learner.LocalLearner`
and a user's own data.

``Trainer(learner, train_data, test_data, epochs=..., output_dir=...).fit()`` trains epoch by
epoch -- each epoch's phase and lr from the learner's method and schedule -- with device-resident
data and augmentation, a progress bar (or heartbeat lines in a log), ``metrics.jsonl`` (one line per
epoch), ``summary.json``, atomic checkpoints at epoch ends (and every ``save_every`` steps), exact
resume (``resume="auto"`` continues the newest complete checkpoint in ``output_dir``, mid-epoch
included), a guard that stops on the first non-finite loss or gradient before it is saved, a lock
on ``output_dir`` for the run's lifetime, and a checkpoint-then-exit on SIGINT/SIGTERM.

Data: a pair ``(x, y)`` of tensors -- uint8 images ``[N, 3, H, W]`` are normalised (and augmented
unless ``augment=False``) by ``spec`` (default: the CIFAR-10 recipe sized to the images), float
tensors are used as they are -- or any iterable of ``(x, y)`` batches such as a torch
``DataLoader`` (checkpoints then at epoch ends only: the loader's order is its own) -- or a
:class:`~pgl_fast.data_stream.StreamData` (files decoded by loader workers, mid-epoch resume exact).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import os
import signal
import sys
import time
from typing import Callable, Iterable

import torch

from . import checkpoint as ckpt
from . import data as data_mod
from . import data_stream
from . import rundir
from .core.learner import LocalLearner
from .errors import UserError
from .jsonio import JsonlWriter, write_json_atomic, write_jsonl_atomic
from .host_memory import MMAP_THRESHOLD_BYTES, huge_pages_for_torch, release_freed_memory, retain_less_memory
from .metrics import PeakMemory, memory_summary, rss_mib, run_header
from .runtime import head_select
from .runtime.device import device_context
from .runtime.rng import seed_rank_streams


def _progress(mode: str, total: int, desc: str):
    enabled = mode == "on" or (mode == "auto" and sys.stderr.isatty())
    if not enabled:
        return None
    from tqdm import tqdm

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


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_output_dir(path: str) -> None:
    """Refuse an --output-dir that can never work, before anything is created."""
    rundir.check_output_path(path)


def prepare_output_dir(path: str, command: str) -> "rundir.DirLock":
    """Create the output dir and lock it for this run's lifetime. Nothing in it is touched before
    the lock is held, so what it holds is inspected under the lock."""
    check_output_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
        return rundir.DirLock.acquire(path, command)
    except OSError as e:
        raise UserError(f"--output-dir {path}: not writable ({e.strerror or e})") from None


def claim_output_dir(out: str, resume: str | None, overwrite: bool, config: dict,
                     allow_schedule_change: bool = False) -> tuple[dict | None, str | None]:
    """Decide, under the lock, what to do with what ``--output-dir`` already holds: continue it
    (``--resume``), clear it (``--overwrite``, or ``--resume auto`` over a start that never reached
    a checkpoint), or refuse. Returns (checkpoint state for ``--resume auto`` or None, a line to
    print or None)."""
    info = rundir.inspect(out)
    if resume == "auto":
        state = ckpt.find_resume("auto", out, config, allow_schedule_change)
        if state is not None:
            return state, None
        note = f"--resume auto: no checkpoint in {ckpt.checkpoint_dir(out)}; starting a new run"
        if info is not None:
            # an earlier start that died before its first checkpoint: its files hold nothing a
            # restart could continue from, and would otherwise sit beside the new run's
            note += f" (removed the files of an earlier start that has none: {rundir.summarize_removed(rundir.clear_run(out))})"
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
                 f"{rundir.summarize_removed(rundir.clear_run(out))}"


# The CLI's flags as the Trainer's arguments: shared refusals (output dir, checkpoints) are worded
# for the command line, and a Python caller is told what to pass instead.
_API_WORDS = [
    (re.compile(r"--resume (\S+?)(:|,|;|\)|\s|$)"), r'resume="\1"\2'),
    (re.compile(r"--resume\b"), "resume"),
    (re.compile(r"--overwrite\b"), "overwrite=True"),
    (re.compile(r"--output-dir\b"), "output_dir"),
    (re.compile(r"--allow-schedule-change\b"), "allow_schedule_change=True"),
    (re.compile(r"--epochs (\d+)"), r"epochs=\1"),
    (re.compile(r"\(use the original data flags\)"), "(give the original data)"),
]


def api_wording(message: str) -> str:
    """``message`` with the CLI's flag names replaced by the Python API's arguments."""
    for pattern, repl in _API_WORDS:
        message = pattern.sub(repl, message)
    return message


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training, after the mid-epoch checkpoint was written. A
    ``KeyboardInterrupt``, as the Ctrl-C it stands for: a caller's ``except Exception:`` around
    ``fit()`` does not swallow it. ``code``: the exit status a process ends with (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Interrupts:
    """SIGINT and SIGTERM handlers for the training loop: the first signal is recorded and acted on
    at the next step boundary (a checkpoint, then a clean exit); a second one exits at once. Every
    checkpoint is written to a temporary file and renamed, so exiting at any instant never leaves a
    half-written one under a final name."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        import threading

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


def _check_finite(tr: dict, epoch: int, phase: str, J: int, *, partial: bool = False) -> None:
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


def _signal_hook(epoch: int, step) -> None:
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


def _kill_hook(epoch: int, step) -> None:
    """Test hook: ``PGL_FAST_KILL_AT=epoch:step`` (1-based epoch, completed steps of it, or ``end``
    once the epoch's checkpoint and metrics line are written) SIGKILLs this process right there, to
    test resume from a real, abrupt death."""
    spec = os.environ.get("PGL_FAST_KILL_AT")
    if spec and spec == f"{epoch + 1}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def restore_rank_rng(state: dict, rank: int, world: int, seed: int) -> str | None:
    """Put back this rank's random streams from the checkpoint ``state``: its own, saved by every
    rank (``rng_ranks``), or in a single process the one saved. A checkpoint without one state per
    rank of this run (written by another number of ranks, or before they were saved) restores the
    saved state and then gives each rank's default generators a stream of its own derived from
    (seed, rank, epoch, step); the returned line says so (None otherwise)."""
    per_rank = state.get("rng_ranks")
    if world == 1:
        ckpt.set_rng_state(state["rng"])
        return None
    if per_rank is not None and len(per_rank) == world:
        ckpt.set_rng_state(per_rank[rank])
        return None
    ckpt.set_rng_state(state["rng"])
    seed_rank_streams(seed, rank, state["epoch"], state["step"])
    saved = f"{len(per_rank)} rank(s)" if per_rank is not None else "one process (rank 0)"
    return (f"the checkpoint holds the random streams of {saved}, this run has {world} ranks: each rank's "
            "dropout stream continues from one derived from (seed, rank, epoch, step), not the saved one")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the last checkpoint is intact."""


def current_lr(learner: LocalLearner) -> float:
    group = learner.optimizers[0].param_groups[0]
    lr = group["lr"]
    return float(lr.item() if torch.is_tensor(lr) else lr)


def find_resume_state(resume: str | None, output_dir: str, config: dict, allow_schedule_change: bool = False):
    """The checkpoint state of an explicit ``resume`` file (None for None or "auto", which is
    resolved under the output dir's lock), checked against ``config``."""
    if resume is None or resume == "auto":
        return None
    return ckpt.find_resume(resume, output_dir, config, allow_schedule_change)


class _TensorData:
    """Device-resident images: whole data set on the learner's device, batches by index."""

    resumable_mid_epoch = True

    def __init__(self, train, test, spec, augment: bool, device, channels_last: bool, test_batch_size: int,
                 dtype: torch.dtype = torch.float32):
        self.train_x, self.train_y = (t.to(device) for t in train)
        self.test_x, self.test_y = (t.to(device) for t in test) if test is not None else (None, None)
        self.uint8 = self.train_x.dtype == torch.uint8
        self.notes: list[str] = []
        if self.uint8:
            if self.train_x.dim() != 4:
                raise UserError(f"train_data: uint8 images must be [N, C, H, W], got shape {tuple(self.train_x.shape)}")
            channels = int(self.train_x.shape[1])
            if spec is None:
                n_cls = int(self.train_y.max().item()) + 1
                spec = data_mod.dataset_spec("imagefolder", recipe="cifar10", num_classes=n_cls,
                                             image_size=int(self.train_x.shape[-1]))
                if channels != 3:
                    # the CIFAR-10 statistics are per colour channel: they say nothing about other images
                    spec = dataclasses.replace(spec, mean=(0.5,) * channels, std=(0.5,) * channels)
                    self.notes.append(f"warning: train_data has {channels}-channel uint8 images and no spec: "
                                      f"normalised with mean 0.5 and std 0.5 per channel (pass spec= to choose)")
            elif len(spec.mean) != channels:
                raise UserError(f"spec: {spec.name} has mean/std for {len(spec.mean)} channel(s); train_data's uint8 "
                                f"images have {channels} (shape {tuple(self.train_x.shape)})")
        self.spec = spec
        self.dtype = dtype  # uint8 images are normalised into the model's floating dtype
        self.device, self.channels_last, self.test_batch_size = device, channels_last, test_batch_size
        self.augment = data_mod.BatchAugmenter(spec, device) if self.uint8 and augment else None
        self.num_train = int(self.train_y.shape[0])
        self.num_test = int(self.test_y.shape[0]) if self.test_y is not None else 0

    def epoch_batches(self, batch_size: int, gen, drop_last: bool):
        return data_mod.epoch_batches(self.num_train, batch_size, generator=gen, drop_last=drop_last,
                                      device=self.device)

    def train_batch(self, idx, gen, needs_image: bool):
        xb = self.train_x[idx]
        if not self.uint8:
            return xb, self.train_y[idx], None
        if self.augment is not None:
            xb = self.augment(xb, gen)
        x = data_mod.normalize(xb, self.spec, self.dtype, self.channels_last)
        return x, self.train_y[idx], xb.to(self.dtype).div_(255) if needs_image else None

    def test_batches(self):
        for i in range(0, self.num_test, self.test_batch_size):
            x = self.test_x[i:i + self.test_batch_size]
            if self.uint8:
                x = data_mod.normalize(x, self.spec, self.dtype, self.channels_last)
            yield x, self.test_y[i:i + self.test_batch_size]

    def probe_batch(self):
        """Two training samples as the model will see them (no augmentation: it draws random numbers)."""
        x = self.train_x[:2]
        if self.uint8:
            x = data_mod.normalize(x, self.spec, self.dtype, self.channels_last)
        return x, f"train_data ({self.train_x.dtype} {tuple(self.train_x.shape)})"


class _LoaderBatches:
    """An epoch of a loader, read in order (the loop asks for batch 0, 1, 2, ...)."""

    def __init__(self, loader):
        self.it = iter(loader)
        self.n = len(loader)

    def __len__(self):
        return self.n

    def __getitem__(self, step):
        return next(self.it)


class _LoaderData:
    """Batches from an iterable such as a ``DataLoader``, moved to the learner's device."""

    resumable_mid_epoch = False

    def __init__(self, train, test, device, needs_image: bool):
        if needs_image:
            raise UserError("InfoPro's loss reconstructs the input image: give the training data as uint8 tensors "
                            "(x, y), not a loader of normalised batches")
        try:
            len(train)
        except TypeError:
            raise UserError("train_data: a loader must have a length (a DataLoader over a sized data set)") from None
        self.train, self.test, self.device = train, test, device
        self.num_train = len(getattr(train, "dataset", ())) or len(train)
        self.num_test = len(getattr(test, "dataset", ())) if test is not None else 0

    def epoch_batches(self, batch_size, gen, drop_last):
        return _LoaderBatches(self.train)

    def train_batch(self, batch, gen, needs_image):
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None

    def probe_batch(self):
        """The first sample of the loader's data set as a batch of one, read by index: iterating the
        loader would draw its epoch order from its generator. Random transforms of the data set
        draw from a forked random state, so the run's own draws are untouched. None where the
        loader has no indexable data set."""
        ds = getattr(self.train, "dataset", None)
        if ds is None or not hasattr(ds, "__getitem__") or isinstance(ds, torch.utils.data.IterableDataset):
            return None
        try:
            with torch.random.fork_rng(devices=[]):
                item = ds[0]
            x = item[0] if isinstance(item, (tuple, list)) else None
        except Exception:  # noqa: BLE001 - a data set without sample 0 by index: the check is skipped
            return None
        if not torch.is_tensor(x):
            return None
        return x.unsqueeze(0).to(self.device), f"train_data (samples of shape {tuple(x.shape)}, {x.dtype})"

    def _generators(self) -> list[torch.Generator]:
        """The distinct generators a DataLoader's epoch order is drawn from (the loader's, its
        sampler's, its batch sampler's sampler's)."""
        loader, found = self.train, []
        sampler = getattr(loader, "sampler", None)
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                  getattr(inner, "generator", None)):
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
        return found

    def resume_support(self) -> str | None:
        """None where an interrupted run continues on the order an uninterrupted one takes; else why not."""
        loader = self.train
        if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
            return None  # a stateful loader (torchdata's StatefulDataLoader, ...): its own state is saved
        if isinstance(loader, (list, tuple)):
            return None  # the same batches every epoch
        if not isinstance(loader, torch.utils.data.DataLoader):
            return f"a {type(loader).__name__} has no state to save"
        known = (torch.utils.data.RandomSampler, torch.utils.data.SequentialSampler)
        for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if s is not None and not isinstance(s, known + (torch.utils.data.BatchSampler,)) \
                    and not isinstance(s, torch.utils.data.dataloader._InfiniteConstantSampler):
                return f"its sampler is a {type(s).__name__}, whose state is unknown"
        if loader.batch_sampler is not None and type(loader.batch_sampler) is not torch.utils.data.BatchSampler:
            return f"its batch sampler is a {type(loader.batch_sampler).__name__}, whose state is unknown"
        # RandomSampler and the loader draw from their generators (saved here) or from torch's
        # global generator (saved with every checkpoint)
        return None

    def state_dict(self) -> dict:
        """The loader's state at an epoch end: what the next epoch's order is drawn from."""
        loader = self.train
        if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
            return {"loader": loader.state_dict()}
        return {"generators": [g.get_state() for g in self._generators()]}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        if "loader" in state:
            self.train.load_state_dict(state["loader"])
            return
        gens = self._generators()
        if len(gens) != len(state["generators"]):
            raise UserError(f"resume: the checkpoint saved {len(state['generators'])} generator(s) of train_data's "
                            f"loader; this loader has {len(gens)}: pass a loader built like the original")
        for g, st in zip(gens, state["generators"]):
            g.set_state(st)

    def test_batches(self):
        for x, y in (self.test if self.test is not None else ()):
            yield x.to(self.device), y.to(self.device)


def _is_tensor_pair(d) -> bool:
    return isinstance(d, (tuple, list)) and len(d) == 2 and all(torch.is_tensor(t) for t in d)


class Trainer:
    """Fits ``learner`` on ``train_data`` for ``epochs``, evaluating on ``test_data`` after every
    epoch and writing everything to ``output_dir`` (see the module docstring).

    ``config``: a dict describing the run, saved as ``config.json`` and in every checkpoint;
    resuming checks it against the checkpoint's (the CLI passes its resolved flags).
    ``resume``: None, "auto" or a checkpoint file. ``overwrite``: start anew in an output dir that
    holds a run. ``header``/``summary_extra``: extra fields for ``header.json``/``summary.json``."""

    def __init__(self, learner: LocalLearner, train_data, test_data=None, *, epochs: int, output_dir: str,
                 batch_size: int = 128, test_batch_size: int | None = None, spec: "data_mod.DatasetSpec | None" = None,
                 augment: bool = True, seed: int = 0, drop_last: bool = False, save_every: int = 0,
                 keep_checkpoints: int = 2, resume: str | None = None, overwrite: bool = False,
                 allow_schedule_change: bool = False, progress: str = "auto", heartbeat: float = 60.0,
                 eval_heads: bool = True, config: dict | None = None, header: dict | None = None,
                 summary_extra: dict | None = None, warnings: Iterable[str] = (), banner: Callable | None = None,
                 command: str | None = None, resume_hint: str | None = None,
                 config_writer: Callable[[str], None] | None = None, resume_state: dict | None = None,
                 pipeline=None, cli_flags: bool = False):
        if not isinstance(learner, LocalLearner):
            raise UserError(f"Trainer: learner is a {type(learner).__name__}, not a pgl_fast.LocalLearner")
        for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("keep_checkpoints", keep_checkpoints, 1),
                            ("save_every", save_every, 0)):
            if not isinstance(v, int) or v < lo:
                raise UserError(f"Trainer: {name} must be an integer >= {lo}, got {v!r}")
        if progress not in ("auto", "on", "off"):
            raise UserError(f"Trainer: progress must be auto, on or off, got {progress!r}")
        if overwrite and resume is not None:
            raise UserError("Trainer: overwrite starts a new run and resume continues one: give one of them")
        self.learner = learner
        self.epochs, self.output_dir, self.batch_size = epochs, str(output_dir), batch_size
        self.test_batch_size = test_batch_size or batch_size
        self.seed, self.drop_last, self.save_every, self.keep_checkpoints = seed, drop_last, save_every, keep_checkpoints
        self.resume, self.overwrite, self.allow_schedule_change = resume, overwrite, allow_schedule_change
        self.progress, self.heartbeat, self.eval_heads = progress, heartbeat, eval_heads
        self.config = dict(config) if config is not None else {
            "method": learner.method.name, "method_spec": learner.method.record(), "model": learner.model.name,
            "modules": learner.J, "epochs": epochs, "batch_size": batch_size, "seed": seed, "drop_last": drop_last}
        self.header = dict(header or {})
        self.summary_extra = dict(summary_extra or {})
        self.warnings = list(warnings)
        self.banner = banner or self._default_banner
        self.command = command or f"{sys.executable} (pgl_fast.Trainer.fit, pid {os.getpid()})"
        self.resume_hint = resume_hint or "the same Trainer with resume='auto'"
        self.config_writer = config_writer
        # the messages of a refusal name the CLI's flags (--resume auto) when the CLI drives this
        # Trainer, the constructor's arguments (resume="auto") otherwise
        self.cli_flags = bool(cli_flags)
        device = learner.device
        p = next((q for q in learner.model.parameters() if q.is_floating_point()), None)
        if _is_tensor_pair(train_data):
            if test_data is not None and not _is_tensor_pair(test_data):
                raise UserError("test_data: give (x, y) tensors like train_data, or None")
            self.data = _TensorData(train_data, test_data, spec, augment, device, learner.channels_last,
                                    self.test_batch_size, p.dtype if p is not None else torch.float32)
            self.warnings += self.data.notes
            if learner.method.needs_image and not (self.data.uint8 and self.data.train_x.shape[1] == 3):
                raise UserError("InfoPro's loss reconstructs the input image: give uint8 images [N, 3, H, W]")
        elif isinstance(train_data, data_stream.StreamData):
            # files decoded by loader workers, batch by batch (test_data: unused, the stream has its test split)
            self.data = data_stream.BoundStream(train_data, device, learner.channels_last, self.test_batch_size,
                                                p.dtype if p is not None else torch.float32, seed)
            if learner.method.needs_image and self.data.channels != 3:
                raise UserError("InfoPro's loss reconstructs the input image: it needs 3-channel images")
        elif isinstance(train_data, Iterable):
            if save_every:
                raise UserError("Trainer: save_every needs tensor data (x, y); a loader's order is its own, so "
                                "checkpoints are taken at epoch ends")
            self.data = _LoaderData(train_data, test_data, device, learner.method.needs_image)
            why = self.data.resume_support()
            if why is not None:
                self.warnings.append(f"warning: train_data's order cannot be saved ({why}): a resumed run continues "
                                     "on another order than an uninterrupted one would (give a DataLoader with a "
                                     "RandomSampler/generator, or a stateful loader with state_dict/load_state_dict)")
        else:
            raise UserError(f"train_data: a pair (x, y) of tensors or an iterable of (x, y) batches, "
                            f"not a {type(train_data).__name__}")
        if pipeline is None:  # a pipeline stage holds only its own modules
            self._check_input(learner.model)
        # data parallel (a DataParallelLearner under torchrun): every rank trains its shard of each
        # global batch and evaluates its slice of the test set; rank 0 alone writes the output dir
        from .distributed import DistContext, ShardedData

        self.ctx = getattr(learner, "ctx", None) or DistContext()
        if self.ctx.distributed:
            # a stream decodes only this rank's shard of each global batch itself
            self.data = self.data.shard(self.ctx, learner) if isinstance(self.data, data_stream.BoundStream) \
                else ShardedData(self.data, self.ctx, learner)
        if resume_state is None:
            with self._api_words():
                check_output_dir(self.output_dir)
                resume_state = find_resume_state(resume, self.output_dir, self.config, allow_schedule_change)
        self.resume_state = resume_state
        # --pipeline S: this rank's pgl_fast.distributed.pipeline.StageRunner (None: one process)
        self.pipeline = pipeline
        if pipeline is not None:
            if self.ctx.distributed:
                raise UserError("--pipeline S with data parallel is not supported: launch exactly S ranks "
                                "(WORLD_SIZE must equal S) with a plain LocalLearner")
            if not isinstance(self.data, _TensorData):
                raise UserError("Trainer: a pipeline needs tensor data (x, y): every rank must know the batch sizes")
            if learner.graphed is not None or learner.compiled is not None or learner.checkpoint_global:
                raise UserError("--pipeline runs eager steps: drop --cuda-graphs, --compile and global-step checkpointing")
            import torch.distributed as dist

            from .distributed import DistContext

            # the pipeline's ranks decide who writes (rank 0) and share rank 0's decisions
            self.io = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=learner.device,
                                  backend=dist.get_backend())
        else:
            self.io = self.ctx

    def _check_input(self, net) -> None:
        """One forward of a sample of the training data through the model, before anything is
        written: data the model cannot take is refused here, not inside the first step."""
        with torch.no_grad():  # a sample read for a look, never trained on
            probe = self.data.probe_batch()
        if probe is None:
            return
        x, what = probe
        was = net.training
        net.eval()  # running statistics: no batch-norm state changes
        try:
            with torch.no_grad():
                net(self.learner._input(x))
        except Exception as e:  # noqa: BLE001 - a user's model and data: say which and why
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            expects = f"input of shape {tuple(net.input_shape)} per sample" if net.input_shape else "another input"
            raise UserError(f"{what} does not fit the model {net.name}, which expects {expects} "
                            f"({x.dtype} batch of shape {tuple(x.shape)}: {reason})") from None
        finally:
            net.train(was)

    @contextlib.contextmanager
    def _api_words(self):
        """Refusals raised inside name the constructor's arguments instead of the CLI's flags."""
        try:
            yield
        except UserError as e:
            if self.cli_flags:
                raise
            raise UserError(api_wording(str(e))) from None

    def _default_banner(self, header: dict) -> list[str]:
        m = self.learner.model
        return [f"pgl_fast {header['pgl_fast']} | torch {header['torch']} | device {header['device_name']} | "
                f"{self.learner.method!r} on {m.name} J={m.J} | {self.data.num_train} train / {self.data.num_test} "
                "test images"]

    def evaluate(self) -> dict:
        if not self.data.num_test:
            return {"test_acc": float("nan"), "test_loss": float("nan"), "head_acc": None}
        return self.learner.evaluate(self.data.test_batches(), self.eval_heads)

    def fit(self) -> dict:
        """Train to ``epochs``; returns the summary (also written to ``summary.json``). The output
        dir's lock and the signal handlers end with the call."""
        cleanups: list = []
        try:
            # the loop's own launches go to the model's device too
            with self._api_words(), device_context(self.learner.device):
                return self._fit(cleanups)
        finally:
            for undo in reversed(cleanups):
                undo()

    def _fit(self, cleanups: list) -> dict:
        learner = self.learner
        net = learner.model
        device = learner.device
        data = self.data
        gen = data_mod.make_generator(self.seed, device)
        import torch.distributed as dist

        ctx = self.ctx  # data parallel (single-process otherwise): gradient and signal collectives
        io = self.io    # who writes: ctx, or the pipeline's ranks
        pipe = self.pipeline
        main = writer = io.is_main  # rank 0 owns the output dir, the metrics and the prints
        claimed = {}

        def claim():  # rank 0 locks and inspects the output dir; the others learn what it decided
            cleanups.append(prepare_output_dir(self.output_dir, self.command).release)
            claimed["state"], note = claim_output_dir(self.output_dir, self.resume, self.overwrite, self.config,
                                                      self.allow_schedule_change)
            return (claimed["state"]["path"] if claimed["state"] is not None else None), note

        # a refusal on rank 0 (locked dir, bad --resume) is re-raised on every rank: none waits forever
        auto_path, note = io.on_main(claim)
        if not main:
            note = None
        auto_state = claimed.get("state") if main else (ckpt.load_checkpoint(auto_path) if auto_path else None)
        resume_state = auto_state if self.resume == "auto" else self.resume_state
        if note:
            print(note, flush=True)

        # -- the run's state, restored from a checkpoint when resuming --------------------------------
        start_epoch, start_step = 0, 0
        schedule_log: list[dict] = []   # every --allow-schedule-change of this run, oldest first
        changed: dict = {}
        records: list[dict] = []
        best_acc, best_epoch, elapsed = -1.0, -1, 0.0
        peak_by_phase: dict[str, float] = {}
        mid_epoch = None
        if resume_state is not None:
            learner.load_state_dict(resume_state)
            if pipe is not None:  # this stage's modules, optimizers and accumulators
                pipe.load(ckpt.checkpoint_dir(self.output_dir), tag=resume_state["pipeline_tag"])
            rng_note = restore_rank_rng(resume_state, io.rank, io.world_size, self.seed)
            if rng_note and main:
                print(f"warning: {rng_note}", flush=True)
            gen.set_state(resume_state["data_generator"].to(gen.get_state().device))
            if isinstance(data, _LoaderData):
                data.load_state_dict(resume_state.get("loader_state"))
            start_epoch, start_step = resume_state["epoch"], resume_state["step"]
            records = list(resume_state["records"])
            best_acc, best_epoch = resume_state["best_acc"], resume_state["best_epoch"]
            elapsed, peak_by_phase = resume_state["elapsed"], dict(resume_state["peak_by_phase"])
            mid_epoch = resume_state.get("mid_epoch")
            schedule_log = list(resume_state.get("schedule_changes", []))
            changed = ckpt.schedule_changes(resume_state, self.config)
            if changed:  # only reachable with --allow-schedule-change
                schedule_log.append({"at_epoch": start_epoch, "at_step": start_step, "from": changed,
                                     "to": {k: self.config.get(k) for k in changed}})
                print("warning: --allow-schedule-change: the rest of this run follows a new schedule ("
                      + ", ".join(f"{k} {v!r} -> {self.config.get(k)!r}" for k, v in changed.items())
                      + f") from epoch {start_epoch + 1}{f' step {start_step + 1}' if start_step else ''} on; "
                      "recorded in header.json", flush=True)
            if main and start_epoch < self.epochs and os.path.exists(os.path.join(self.output_dir, "summary.json")):
                os.remove(os.path.join(self.output_dir, "summary.json"))  # the run is not finished any more
            print(f"resumed from {resume_state['path']}: {start_epoch} epochs"  # every rank: resumed together
                  f"{f' and {start_step} steps' if start_step else ''} done", flush=True)
        elif io.distributed:
            seed_rank_streams(self.seed, io.rank)  # every rank its own dropout stream (runtime/rng.py)
        # --head-kernels auto: a resumed run computes with the kernels its checkpoint's run chose
        reused_heads = resume_state is not None and head_select.reuse_choice(net, resume_state.get("head_kernel_choice"))

        for w in self.warnings:
            print(w, file=sys.stderr, flush=True)
        header = run_header(self.config, device)
        header.update({"split_ranges": net.ranges, "parameters": net.count_parameters(),
                       "method_spec": learner.method.record(),
                       "train_images": data.num_train, "test_images": data.num_test,
                       "resumed_from": resume_state["path"] if resume_state else None,
                       "schedule_changed_from": changed or None, "schedule_changes": schedule_log,
                       "warnings": list(self.warnings)})
        header.update(self.header)
        if reused_heads:
            header["head_kernels"] = head_select.resolved(net)
            header["head_kernels_reused_from"] = resume_state["path"]
        if pipe is not None:
            header["pipeline"] = {"stages": pipe.S, "module_ranges": pipe.ranges, "depth": pipe.depth,
                                  "micro_batches": pipe.micro_batches}
        metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
        metrics = None
        if main:
            if self.config_writer is not None:
                self.config_writer(os.path.join(self.output_dir, "config.json"))
            else:
                write_json_atomic(os.path.join(self.output_dir, "config.json"), self.config)
            write_json_atomic(os.path.join(self.output_dir, "header.json"), header)
            # metrics.jsonl is exactly the checkpoint's epoch records: no duplicated or missing epochs
            write_jsonl_atomic(metrics_path, records)
            metrics = JsonlWriter(metrics_path)
            for line in self.banner(header):
                print(line, flush=True)

        memory = PeakMemory(device)
        # one statistics object for the whole run: captured graphs hold its addresses
        stats = learner.stats
        if learner.graphed is not None:
            memory.graphs = learner.graphed  # graphed epochs report the capture peaks too
        n_train = data.num_train
        t_start = time.time() - elapsed
        phases = learner.method.phases(self.epochs)
        timed: list[tuple[str, float]] = []  # (phase, wall seconds) of the whole epochs run by this process

        def save(epoch_done: int, step: int, mid: dict | None) -> None:
            # every rank's random streams (collective): each rank continues its own on resume
            rng_ranks = io.all_gather_object(ckpt.rng_state()) if io.distributed else None
            tag = None
            if pipe is not None:
                # every stage's file first, then rank 0's checkpoint (the one resume looks for) names them
                tag = os.path.splitext(ckpt.checkpoint_name(epoch_done, step))[0]
                pipe.save(ckpt.checkpoint_dir(self.output_dir), tag)
                dist.barrier()
                if not writer:
                    dist.barrier()
                    pipe.prune(ckpt.checkpoint_dir(self.output_dir),
                               [os.path.splitext(os.path.basename(c))[0] for c in ckpt.list_checkpoints(self.output_dir)])
                    return None
            # data parallel: every rank gets here (its arguments, the step statistics, are gathered
            # collectively); rank 0 writes, the others restore from it
            if not main:
                return None
            state = {
                **learner.state_dict(),
                "rng": ckpt.rng_state() if rng_ranks is None else rng_ranks[0], "rng_ranks": rng_ranks,
                "head_kernel_choice": head_select.saved_choice(net), "data_generator": gen.get_state().cpu(),
                "epoch": epoch_done, "step": step, "mid_epoch": mid,
                "phase": learner.method.phase(min(epoch_done, self.epochs - 1)),
                "records": records, "best_acc": best_acc, "best_epoch": best_epoch,
                "elapsed": time.time() - t_start, "peak_by_phase": peak_by_phase, "config": self.config,
                "versions": {"torch": str(torch.__version__), "pgl_fast": str(header["pgl_fast"])},
                "schedule_changes": schedule_log, "pipeline_tag": tag,
                # a loader's order of the next epoch (taken at epoch ends only: mid is None then)
                "loader_state": data.state_dict() if isinstance(data, _LoaderData) and mid is None else None,
            }
            path = ckpt.save_checkpoint(self.output_dir, state, self.keep_checkpoints)
            if pipe is not None:
                dist.barrier()  # rank 0 has pruned its checkpoints: the stages prune their files alike
                pipe.prune(ckpt.checkpoint_dir(self.output_dir),
                           [os.path.splitext(os.path.basename(c))[0] for c in ckpt.list_checkpoints(self.output_dir)])
            return path

        interrupts = _Interrupts()
        if pipe is None:  # in a pipeline Ctrl-C stops every rank at once (PipelineError), from the last checkpoint
            interrupts.install()
            cleanups.append(interrupts.restore)

        def stop(epoch_done: int, step: int, n_steps: int, path: str) -> RunInterrupted:
            name = signal.Signals(interrupts.signum).name
            where = f"epoch {epoch_done + 1}, step {step}/{n_steps}" if step else f"the end of epoch {epoch_done}"
            return RunInterrupted(f"interrupted ({name}) at {where}; saved {path}\n"
                                  f"resume with: {self.resume_hint}", 128 + interrupts.signum)

        last_phase, setup_rss_mib = None, None
        allocator = {"trim_at_phase_switch": False, "mmap_threshold_mib": None}
        if device.type == "cpu" and huge_pages_for_torch() and retain_less_memory():
            # the steps' activations go back to the system when freed (host_memory.py)
            allocator["mmap_threshold_mib"] = MMAP_THRESHOLD_BYTES / 2**20
        for epoch in range(start_epoch, self.epochs):
            t_epoch = time.time()
            phase = learner.method.epoch_label(epoch)
            if phase != last_phase:
                # after the set-up and at every phase switch: what the allocator kept from before is
                # handed back, so this phase's peak resident set is its own (metrics.py)
                allocator["trim_at_phase_switch"] = release_freed_memory()
                if last_phase is None:
                    setup_rss_mib = rss_mib()
                last_phase = phase
            lr = learner.start_epoch(epoch)
            if lr is None:
                lr = current_lr(learner)
            if writer:
                print(f"epoch {epoch + 1}/{self.epochs} phase={phase} lr={lr:.5g}", flush=True)
            memory.reset()
            first_step, epoch_seconds = 0, 0.0
            if mid_epoch is not None and epoch == start_epoch and start_step > 0:
                # resume inside this epoch: same batch order, same accumulators, same generator state
                perm = mid_epoch["perm"].to(device)
                if perm.numel() != (n_train // self.batch_size * self.batch_size if self.drop_last else n_train):
                    raise UserError(f"--resume: the checkpoint was taken inside an epoch of {perm.numel()} images; this "
                                    f"run has {n_train} (use the original data flags)")
                batches = list(perm.split(self.batch_size))
                if self.drop_last and batches and batches[-1].shape[0] < self.batch_size:
                    batches.pop()
                if pipe is None:
                    stats.load_state_dict(mid_epoch["stats"])
                else:  # each stage's own share came back with its stage file
                    pipe.restore_stats()
                first_step, epoch_seconds = start_step, mid_epoch["seconds"]
            else:
                batches = data.epoch_batches(self.batch_size, gen, self.drop_last)
            if isinstance(data, data_stream.BoundStream):
                data.begin_epoch(epoch, batches, first_step)  # the workers start reading this epoch's files
            # saved by mid-epoch checkpoints (tensor data only: a loader's order is its own)
            perm_all = torch.cat(batches) if data.resumable_mid_epoch and len(batches) else None
            bar = _progress(self.progress if pipe is None else "off", len(batches), f"epoch {epoch + 1} {phase}")
            if bar is not None and first_step:
                bar.update(first_step)
            beat = Heartbeat(self.heartbeat, epoch, self.epochs, len(batches), self.batch_size, first_step=first_step) \
                if bar is None and self.heartbeat > 0 and pipe is None else None
            t0 = time.time()
            if pipe is not None:
                # the stages run the epoch in chunks of --save-every batches (a checkpoint after each)
                sizes = [int(b.numel()) for b in batches]
                needs_image = learner.method.needs_image

                def fetch(t):
                    return data.train_batch(batches[t], gen, needs_image)

                chunk = self.save_every or len(batches)
                for a in range(first_step, len(batches), chunk):
                    done = min(a + chunk, len(batches))
                    pipe.train_epoch(learner.phase, sizes, fetch if pipe.first else None, range(a, done))
                    if self.save_every and done < len(batches):
                        _check_finite(pipe.reduce_stats(), epoch, phase, net.J, partial=True)
                        save(epoch, done, {"perm": perm_all.cpu(), "stats": stats.state_dict(),
                                           "seconds": epoch_seconds + time.time() - t0})
                        _kill_hook(epoch, done)  # every stage dies after the same checkpoint (tests)
            for step in range(first_step, len(batches) if pipe is None else first_step):
                x, y, image01 = data.train_batch(batches[step], gen, learner.method.needs_image)
                learner.step(x, y, image01)
                if bar is not None:
                    bar.update(1)
                done = step + 1
                if beat is not None:
                    beat.step(done)
                if self.save_every and done % self.save_every == 0 and done < len(batches):
                    _check_finite(stats.read(), epoch, phase, net.J, partial=True)  # never save poisoned weights
                    save(epoch, done, {"perm": perm_all.cpu(), "stats": stats.state_dict(),
                                       "seconds": epoch_seconds + time.time() - t0})
                _kill_hook(epoch, done)
                _signal_hook(epoch, done)
                if ctx.distributed:  # a signal that reached some ranks stops all of them at this step
                    interrupts.signum = ctx.max_int(interrupts.signum or 0) or None
                if interrupts.signum is not None and done < len(batches):
                    # the same save as --save-every's, after the same check: never save poisoned weights
                    _check_finite(stats.read(), epoch, phase, net.J, partial=True)
                    if not data.resumable_mid_epoch:
                        if bar is not None:
                            bar.close()
                        last = ckpt.list_checkpoints(self.output_dir)
                        raise RunInterrupted(
                            f"interrupted ({signal.Signals(interrupts.signum).name}) at epoch {epoch + 1}, step "
                            f"{done}/{len(batches)}; a loader's epoch cannot be resumed midway, so this epoch "
                            f"reruns from {last[-1] if last else 'the start'}", 128 + interrupts.signum)
                    path = save(epoch, done, {"perm": perm_all.cpu(), "stats": stats.state_dict(),
                                              "seconds": epoch_seconds + time.time() - t0})
                    if bar is not None:
                        bar.close()
                    raise stop(epoch, done, len(batches), path)
            if bar is not None:
                bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = epoch_seconds + time.time() - t0
            tr = stats.read() if pipe is None else pipe.reduce_stats()
            mem = memory.read()
            _check_finite(tr, epoch, phase, net.J)
            if pipe is None:
                ev = self.evaluate()
            else:
                tests = list(data.test_batches()) if pipe.first else []
                tb, nt = self.test_batch_size, data.num_test
                ev = pipe.evaluate([min(tb, nt - i) for i in range(0, nt, tb)], (lambda t: tests[t]) if pipe.first else None,
                                   self.eval_heads)
            if ev["test_acc"] > best_acc:
                best_acc, best_epoch = ev["test_acc"], epoch + 1
            if mem["peak_mib"] is not None:
                peak_by_phase[phase] = max(peak_by_phase.get(phase, 0.0), mem["peak_mib"])
            record = {
                "event": "epoch", "epoch": epoch + 1, "phase": phase, "lr": lr,
                # module_losses[j]: mean training loss of module j (j < J-1: its aux head's local loss, also
                # in global epochs; J-1: the final loss = train_loss); None where module j has no head (bp)
                "train_loss": tr["losses"][-1],
                "module_losses": tr["losses"] if net.heads else [None] * (net.J - 1) + tr["losses"][-1:],
                "train_acc": tr["train_acc"],
                "test_acc": ev["test_acc"], "test_loss": ev["test_loss"], "head_acc": ev["head_acc"],
                "images_per_s": tr["samples"] / max(train_seconds, 1e-9), "epoch_seconds": train_seconds,
                "peak_mem_mib": mem["peak_mib"], "peak_reserved_mib": mem["peak_reserved_mib"],
                "mem_kind": mem["kind"], "graph_pool_mib": mem["graph_pool_mib"],
            }
            if pipe is not None:
                record["peak_inflight_mib"] = [b / 2 ** 20 for b in tr["peak_inflight_bytes"]]
            records.append(record)
            # checkpoint first, then the metrics line: a kill in between is repaired on resume, since
            # metrics.jsonl is rewritten from the checkpoint's records
            path = save(epoch + 1, 0, None)
            if pipe is not None and not writer:
                continue  # the stages' epoch ends here; rank 0 writes and prints (no collectives follow)
            if metrics is not None:
                metrics.write(record)
            _kill_hook(epoch, "end")
            if not first_step:  # an epoch resumed midway took part of its time in another process
                timed.append((phases[epoch], time.time() - t_epoch))
            eta = run_eta(phases, timed, epoch + 1)
            print(f"epoch {epoch + 1:>4} {phase:<6} lr {lr:.4f} loss {tr['losses'][-1]:.4f} "
                  f"train {100 * tr['train_acc']:.2f}% test {100 * ev['test_acc']:.2f}% "
                  f"({record['images_per_s']:.0f} img/s, {train_seconds:.1f}s, peak {mem['peak_mib'] or 0:.0f} MiB) "
                  f"elapsed {format_duration(time.time() - t_start)} ETA {'?' if eta is None else format_duration(eta)}",
                  flush=True)
            if ctx.distributed:
                interrupts.signum = ctx.max_int(interrupts.signum or 0) or None
            if interrupts.signum is not None and epoch + 1 < self.epochs:
                raise stop(epoch + 1, 0, len(batches), path)

        last = records[-1] if records else None
        counts = net.count_parameters()
        summary = {
            "final_test_acc": last["test_acc"] if last else None,
            "best_test_acc": best_acc, "best_epoch": best_epoch, "epochs": self.epochs,
            "parameters": counts,
            "wall_seconds": time.time() - t_start, "peak_mem_mib_by_phase": peak_by_phase,
            "mem_kind": memory.read()["kind"], "method": learner.method.name, "J": net.J, "seed": self.seed,
        }
        summary["memory"] = memory_summary(self.header.get("memory_prediction_mib"), peak_by_phase, setup_rss_mib,
                                           summary["mem_kind"])
        summary["memory"]["allocator"] = allocator
        summary.update(self.summary_extra)
        if main:
            write_json_atomic(os.path.join(self.output_dir, "summary.json"), summary)
        if main:
            print(f"done: final {100 * summary['final_test_acc']:.2f}%  best {100 * best_acc:.2f}% (epoch {best_epoch})  "
                  f"wall {summary['wall_seconds']:.0f}s")
        return summary
