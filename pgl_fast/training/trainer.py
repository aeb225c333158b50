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
:class:`~pgl_fast.data.stream.StreamData` (files decoded by loader workers, mid-epoch resume exact).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
from typing import Callable, Iterable

import torch

from . import checkpoint as ckpt
from .. import data as data_mod
from ..data import stream as data_stream
from . import rundir
from ..data.batches import LoaderData, bind_data
from ..core.learner import LocalLearner
from ..distributed.strategies import Strategy, default_strategy
from ..errors import UserError
from .guards import Interrupts, NonFiniteError, RunInterrupted, check_finite, kill_hook, signal_hook
from ..memory.host import MMAP_THRESHOLD_BYTES, huge_pages_for_torch, release_freed_memory, retain_less_memory
from ..jsonio import JsonlWriter, write_json_atomic, write_jsonl_atomic
from .metrics import PeakMemory, memory_summary, rss_mib, run_header
from .progress import Heartbeat, format_duration, progress_bar, run_eta
from ..runtime import head_select
from ..runtime.device import device_context
from ..runtime.rng import seed_rank_streams

__all__ = ["NonFiniteError", "RunInterrupted", "RunState", "Trainer", "api_wording", "current_lr"]


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


def current_lr(learner: LocalLearner) -> float:
    group = learner.optimizers[0].param_groups[0]
    lr = group["lr"]
    return float(lr.item() if torch.is_tensor(lr) else lr)



@dataclasses.dataclass
class RunState:
    """How far a run has come: saved in every checkpoint, restored on resume."""

    epoch: int = 0                        # epochs done
    step: int = 0                         # steps done of epoch ``epoch`` (a mid-epoch checkpoint)
    mid_epoch: dict | None = None         # that epoch's batch order, accumulators and seconds so far
    records: list = dataclasses.field(default_factory=list)   # one metrics record per epoch done
    best_acc: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0                  # wall seconds of the whole run so far
    peak_by_phase: dict = dataclasses.field(default_factory=dict)
    schedule_changes: list = dataclasses.field(default_factory=list)  # every --allow-schedule-change, oldest first

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "mid_epoch": self.mid_epoch, "records": self.records,
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "elapsed": self.elapsed,
                "peak_by_phase": self.peak_by_phase, "schedule_changes": self.schedule_changes}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.mid_epoch = state.get("mid_epoch")
        self.records = list(state["records"])
        self.best_acc, self.best_epoch = state["best_acc"], state["best_epoch"]
        self.elapsed, self.peak_by_phase = state["elapsed"], dict(state["peak_by_phase"])
        self.schedule_changes = list(state.get("schedule_changes", []))


class Trainer:
    """Fits ``learner`` on ``train_data`` for ``epochs``, evaluating on ``test_data`` after every
    epoch and writing everything to ``output_dir`` (see the module docstring).

    ``strategy``: how this process takes part (:mod:`pgl_fast.distributed.strategies`): None picks
    one process, or data parallel for a ``DataParallelLearner`` under torchrun;
    ``Pipeline(runner)`` makes this rank one stage of a module pipeline.
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
                 strategy: Strategy | None = None, cli_flags: bool = False):
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
        if strategy is not None and not isinstance(strategy, Strategy):
            raise UserError(f"Trainer: strategy is a {type(strategy).__name__}; use SingleProcess(), DataParallel() "
                            "or Pipeline(runner) from pgl_fast")
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
        self.data, notes = bind_data(learner, train_data, test_data, spec=spec, augment=augment,
                                     test_batch_size=self.test_batch_size, seed=seed, save_every=save_every)
        self.warnings += notes
        self.strategy = strategy if strategy is not None else default_strategy(learner)
        self.strategy.bind(self)
        if self.strategy.probes_model:
            self._check_input(learner.model)
        self.data = self.strategy.wrap_data(self.data)
        if resume_state is None:
            with self._api_words():
                rundir.check_output_dir(self.output_dir)
                resume_state = ckpt.find_resume_state(resume, self.output_dir, self.config, allow_schedule_change)
        self.resume_state = resume_state

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
                net(self.learner.prepare_input(x))
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

    # -- the run ---------------------------------------------------------------------------------
    def _fit(self, cleanups: list) -> dict:
        self.io = self.strategy.io     # who writes: rank 0 of the strategy's ranks
        self.writer = self.io.is_main  # rank 0 owns the output dir, the metrics and the prints
        self.gen = data_mod.make_generator(self.seed, self.learner.device)
        self.run = RunState()
        resume_state = self._claim_output_dir(cleanups)
        changed = self._restore(resume_state) if resume_state is not None else {}
        if resume_state is None and self.io.distributed:
            seed_rank_streams(self.seed, self.io.rank)  # every rank its own dropout stream (runtime/rng.py)
        self._open_outputs(resume_state, changed)
        self._prepare_loop(cleanups)
        for epoch in range(self.run.epoch, self.epochs):
            self._epoch(epoch)
        return self._finish()

    def _claim_output_dir(self, cleanups: list) -> dict | None:
        """Rank 0 locks and inspects the output dir; the others learn what it decided. A refusal on
        rank 0 (locked dir, bad --resume) is re-raised on every rank: none waits forever."""
        claimed = {}

        def claim():
            cleanups.append(rundir.prepare_output_dir(self.output_dir, self.command).release)
            claimed["state"], note = rundir.claim_output_dir(self.output_dir, self.resume, self.overwrite,
                                                             self.config, self.allow_schedule_change)
            return (claimed["state"]["path"] if claimed["state"] is not None else None), note

        auto_path, note = self.io.on_main(claim)
        if self.writer and note:
            print(note, flush=True)
        if self.resume != "auto":
            return self.resume_state
        return claimed.get("state") if self.writer else (ckpt.load_checkpoint(auto_path) if auto_path else None)

    def _restore(self, state: dict) -> dict:
        """Put back the learner, the strategy's part, the random streams, the data order and the run
        state from a checkpoint; returns the schedule fields this run changes (--allow-schedule-change)."""
        self.learner.load_state_dict(state)
        self.strategy.restore(state, self.output_dir)
        rng_note = ckpt.restore_rank_rng(state, self.io.rank, self.io.world_size, self.seed)
        if rng_note and self.writer:
            print(f"warning: {rng_note}", flush=True)
        self.gen.set_state(state["data_generator"].to(self.gen.get_state().device))
        if isinstance(self.data, LoaderData):
            self.data.load_state_dict(state.get("loader_state"))
        run = self.run
        run.load_state_dict(state)
        changed = ckpt.schedule_changes(state, self.config)
        if changed:  # only reachable with --allow-schedule-change
            run.schedule_changes.append({"at_epoch": run.epoch, "at_step": run.step, "from": changed,
                                         "to": {k: self.config.get(k) for k in changed}})
            print("warning: --allow-schedule-change: the rest of this run follows a new schedule ("
                  + ", ".join(f"{k} {v!r} -> {self.config.get(k)!r}" for k, v in changed.items())
                  + f") from epoch {run.epoch + 1}{f' step {run.step + 1}' if run.step else ''} on; "
                  "recorded in header.json", flush=True)
        summary = os.path.join(self.output_dir, "summary.json")
        if self.writer and run.epoch < self.epochs and os.path.exists(summary):
            os.remove(summary)  # the run is not finished any more
        print(f"resumed from {state['path']}: {run.epoch} epochs"  # every rank: resumed together
              f"{f' and {run.step} steps' if run.step else ''} done", flush=True)
        return changed

    def _open_outputs(self, resume_state: dict | None, changed: dict) -> None:
        """header.json, config.json and metrics.jsonl (rank 0), and the banner."""
        net = self.learner.model
        # --head-kernels auto: a resumed run computes with the kernels its checkpoint's run chose
        reused_heads = resume_state is not None and head_select.reuse_choice(net, resume_state.get("head_kernel_choice"))
        for w in self.warnings:
            print(w, file=sys.stderr, flush=True)
        header = run_header(self.config, self.learner.device)
        header.update({"split_ranges": net.ranges, "parameters": net.count_parameters(),
                       "method_spec": self.learner.method.record(),
                       "train_images": self.data.num_train, "test_images": self.data.num_test,
                       "resumed_from": resume_state["path"] if resume_state else None,
                       "schedule_changed_from": changed or None, "schedule_changes": self.run.schedule_changes,
                       "warnings": list(self.warnings)})
        header.update(self.header)
        if reused_heads:
            header["head_kernels"] = head_select.resolved(net)
            header["head_kernels_reused_from"] = resume_state["path"]
        header.update(self.strategy.header())
        self.run_header = header
        self.metrics = None
        if self.writer:
            if self.config_writer is not None:
                self.config_writer(os.path.join(self.output_dir, "config.json"))
            else:
                write_json_atomic(os.path.join(self.output_dir, "config.json"), self.config)
            write_json_atomic(os.path.join(self.output_dir, "header.json"), header)
            # metrics.jsonl is exactly the checkpoint's epoch records: no duplicated or missing epochs
            metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
            write_jsonl_atomic(metrics_path, self.run.records)
            self.metrics = JsonlWriter(metrics_path)
            for line in self.banner(header):
                print(line, flush=True)

    def _prepare_loop(self, cleanups: list) -> None:
        learner, device = self.learner, self.learner.device
        self.memory = PeakMemory(device)
        if learner.graphed is not None:
            self.memory.graphs = learner.graphed  # graphed epochs report the capture peaks too
        self.t_start = time.time() - self.run.elapsed
        self.phases = learner.method.phases(self.epochs)
        self.timed: list[tuple[str, float]] = []  # (phase, wall seconds) of the whole epochs run by this process
        self.interrupts = Interrupts()
        if self.strategy.handles_signals:
            self.interrupts.install()
            cleanups.append(self.interrupts.restore)
        self.last_phase, self.setup_rss_mib = None, None
        self.allocator = {"trim_at_phase_switch": False, "mmap_threshold_mib": None}
        if device.type == "cpu" and huge_pages_for_torch() and retain_less_memory():
            # the steps' activations go back to the system when freed (host_memory.py)
            self.allocator["mmap_threshold_mib"] = MMAP_THRESHOLD_BYTES / 2**20

    # -- one epoch -------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> None:
        learner, run = self.learner, self.run
        t_epoch = time.time()
        phase = learner.method.epoch_label(epoch)
        if phase != self.last_phase:
            # after the set-up and at every phase switch: what the allocator kept from before is
            # handed back, so this phase's peak resident set is its own (metrics.py)
            self.allocator["trim_at_phase_switch"] = release_freed_memory()
            if self.last_phase is None:
                self.setup_rss_mib = rss_mib()
            self.last_phase = phase
        lr = learner.start_epoch(epoch)
        if lr is None:
            lr = current_lr(learner)
        if self.writer:
            print(f"epoch {epoch + 1}/{self.epochs} phase={phase} lr={lr:.5g}", flush=True)
        self.memory.reset()
        if run.mid_epoch is not None and epoch == run.epoch and run.step > 0:
            batches = self._resumed_batches(run.mid_epoch)
            self.strategy.restore_epoch_stats(run.mid_epoch)
            first_step, seconds_before = run.step, run.mid_epoch["seconds"]
        else:
            batches = self.data.epoch_batches(self.batch_size, self.gen, self.drop_last)
            first_step, seconds_before = 0, 0.0
        if isinstance(self.data, data_stream.BoundStream):
            self.data.begin_epoch(epoch, batches, first_step)  # the workers start reading this epoch's files
        train_seconds = seconds_before + self._train_steps(epoch, phase, batches, first_step, seconds_before)
        self._end_epoch(epoch, phase, lr, train_seconds, t_epoch, first_step, len(batches))

    def _resumed_batches(self, mid: dict) -> list:
        """The batch order of an epoch resumed inside: the same batches as before the stop."""
        perm = mid["perm"].to(self.learner.device)
        n_train = self.data.num_train
        if perm.numel() != (n_train // self.batch_size * self.batch_size if self.drop_last else n_train):
            raise UserError(f"--resume: the checkpoint was taken inside an epoch of {perm.numel()} images; this "
                            f"run has {n_train} (use the original data flags)")
        batches = list(perm.split(self.batch_size))
        if self.drop_last and batches and batches[-1].shape[0] < self.batch_size:
            batches.pop()
        return batches

    def _train_steps(self, epoch: int, phase: str, batches, first_step: int, seconds_before: float) -> float:
        """The epoch's steps from ``first_step`` on, in the strategy's calls, with progress,
        mid-epoch checkpoints and signals between them; returns their wall seconds."""
        learner, strategy, n = self.learner, self.strategy, len(batches)
        needs_image = learner.method.needs_image
        # saved by mid-epoch checkpoints (tensor data only: a loader's order is its own)
        perm_all = torch.cat(batches) if self.data.resumable_mid_epoch and n else None
        bar = progress_bar(self.progress if strategy.shows_progress else "off", n, f"epoch {epoch + 1} {phase}")
        if bar is not None and first_step:
            bar.update(first_step)
        beat = Heartbeat(self.heartbeat, epoch, self.epochs, n, self.batch_size, first_step=first_step) \
            if bar is None and self.heartbeat > 0 and strategy.shows_progress else None
        t0 = time.time()

        def fetch(t):
            return self.data.train_batch(batches[t], self.gen, needs_image)

        def mid_epoch() -> dict:
            return {"perm": perm_all.cpu(), "stats": learner.stats.state_dict(),
                    "seconds": seconds_before + time.time() - t0}

        per_call = strategy.steps_per_call(self.save_every, n)
        done = first_step
        while done < n:
            start, done = done, min((done // per_call + 1) * per_call, n)
            strategy.train(learner.phase, batches, range(start, done), fetch)
            if bar is not None:
                bar.update(done - start)
            if beat is not None:
                beat.step(done)
            if self.save_every and done % self.save_every == 0 and done < n:
                check_finite(strategy.read_stats(), epoch, phase, learner.J, partial=True)  # never save poisoned weights
                self._save(epoch, done, mid_epoch())
            kill_hook(epoch, done)
            signal_hook(epoch, done)
            self.interrupts.signum = strategy.agree_on_signal(self.interrupts.signum)
            if self.interrupts.signum is not None and done < n:
                if bar is not None:
                    bar.close()
                raise self._stop_inside_epoch(epoch, phase, done, n, mid_epoch)
        if bar is not None:
            bar.close()
        if learner.device.type == "cuda":
            torch.cuda.synchronize(learner.device)
        return time.time() - t0

    def _stop_inside_epoch(self, epoch: int, phase: str, done: int, n: int, mid_epoch) -> RunInterrupted:
        """A signal inside an epoch: the same save as --save-every's, after the same check (never
        save poisoned weights), then the exception that ends the run."""
        check_finite(self.strategy.read_stats(), epoch, phase, self.learner.J, partial=True)
        name = signal.Signals(self.interrupts.signum).name
        if not self.data.resumable_mid_epoch:
            last = ckpt.list_checkpoints(self.output_dir)
            return RunInterrupted(
                f"interrupted ({name}) at epoch {epoch + 1}, step {done}/{n}; a loader's epoch cannot be resumed "
                f"midway, so this epoch reruns from {last[-1] if last else 'the start'}", 128 + self.interrupts.signum)
        return self._stopped(epoch, done, n, self._save(epoch, done, mid_epoch()))

    def _stopped(self, epoch_done: int, step: int, n_steps: int, path: str) -> RunInterrupted:
        name = signal.Signals(self.interrupts.signum).name
        where = f"epoch {epoch_done + 1}, step {step}/{n_steps}" if step else f"the end of epoch {epoch_done}"
        return RunInterrupted(f"interrupted ({name}) at {where}; saved {path}\n"
                              f"resume with: {self.resume_hint}", 128 + self.interrupts.signum)

    def _end_epoch(self, epoch: int, phase: str, lr: float, train_seconds: float, t_epoch: float,
                   first_step: int, n_steps: int) -> None:
        """The epoch's statistics, the test set, its record, the checkpoint and the metrics line."""
        run, net = self.run, self.learner.model
        tr = self.strategy.read_stats()
        mem = self.memory.read()
        check_finite(tr, epoch, phase, net.J)
        ev = self.strategy.evaluate()
        if ev["test_acc"] > run.best_acc:
            run.best_acc, run.best_epoch = ev["test_acc"], epoch + 1
        if mem["peak_mib"] is not None:
            run.peak_by_phase[phase] = max(run.peak_by_phase.get(phase, 0.0), mem["peak_mib"])
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
        record.update(self.strategy.record_extra(tr))
        run.records.append(record)
        # checkpoint first, then the metrics line: a kill in between is repaired on resume, since
        # metrics.jsonl is rewritten from the checkpoint's records
        path = self._save(epoch + 1, 0, None)
        if not self.writer and not self.strategy.collective_epoch_end:
            return  # this rank's epoch ends here; rank 0 writes and prints (no collectives follow)
        if self.metrics is not None:
            self.metrics.write(record)
        kill_hook(epoch, "end")
        if not first_step:  # an epoch resumed midway took part of its time in another process
            self.timed.append((self.phases[epoch], time.time() - t_epoch))
        eta = run_eta(self.phases, self.timed, epoch + 1)
        print(f"epoch {epoch + 1:>4} {phase:<6} lr {lr:.4f} loss {tr['losses'][-1]:.4f} "
              f"train {100 * tr['train_acc']:.2f}% test {100 * ev['test_acc']:.2f}% "
              f"({record['images_per_s']:.0f} img/s, {train_seconds:.1f}s, peak {mem['peak_mib'] or 0:.0f} MiB) "
              f"elapsed {format_duration(time.time() - self.t_start)} ETA {'?' if eta is None else format_duration(eta)}",
              flush=True)
        self.interrupts.signum = self.strategy.agree_on_signal(self.interrupts.signum)
        if self.interrupts.signum is not None and epoch + 1 < self.epochs:
            raise self._stopped(epoch + 1, 0, n_steps, path)

    # -- checkpoints and the end -----------------------------------------------------------------
    def _save(self, epoch_done: int, step: int, mid: dict | None) -> str | None:
        """A checkpoint of the whole run (rank 0 writes it; every rank takes part: the random
        streams are gathered, a pipeline's stages save their own modules)."""
        learner, io = self.learner, self.io
        # every rank's random streams (collective): each rank continues its own on resume
        rng_ranks = io.all_gather_object(ckpt.rng_state()) if io.distributed else None
        tag = self.strategy.before_checkpoint(self.output_dir, epoch_done, step)
        if not self.writer:
            self.strategy.after_checkpoint(self.output_dir)
            return None
        state = {
            **learner.state_dict(), **self.run.state_dict(),
            # where this checkpoint stands (the run state above is where the run started from)
            "epoch": epoch_done, "step": step, "mid_epoch": mid, "elapsed": time.time() - self.t_start,
            "rng": ckpt.rng_state() if rng_ranks is None else rng_ranks[0], "rng_ranks": rng_ranks,
            "head_kernel_choice": head_select.saved_choice(learner.model), "data_generator": self.gen.get_state().cpu(),
            "phase": learner.method.phase(min(epoch_done, self.epochs - 1)), "config": self.config,
            "versions": {"torch": str(torch.__version__), "pgl_fast": str(self.run_header["pgl_fast"])},
            "pipeline_tag": tag,
            # a loader's order of the next epoch (taken at epoch ends only: mid is None then)
            "loader_state": self.data.state_dict() if isinstance(self.data, LoaderData) and mid is None else None,
        }
        path = ckpt.save_checkpoint(self.output_dir, state, self.keep_checkpoints)
        self.strategy.after_checkpoint(self.output_dir)
        return path

    def _finish(self) -> dict:
        run, net, learner = self.run, self.learner.model, self.learner
        last = run.records[-1] if run.records else None
        summary = {
            "final_test_acc": last["test_acc"] if last else None,
            "best_test_acc": run.best_acc, "best_epoch": run.best_epoch, "epochs": self.epochs,
            "parameters": net.count_parameters(),
            "wall_seconds": time.time() - self.t_start, "peak_mem_mib_by_phase": run.peak_by_phase,
            "mem_kind": self.memory.read()["kind"], "method": learner.method.name, "J": net.J, "seed": self.seed,
        }
        summary["memory"] = memory_summary(self.header.get("memory_prediction_mib"), run.peak_by_phase,
                                           self.setup_rss_mib, summary["mem_kind"])
        summary["memory"]["allocator"] = self.allocator
        summary.update(self.summary_extra)
        if self.writer:
            write_json_atomic(os.path.join(self.output_dir, "summary.json"), summary)
            print(f"done: final {100 * summary['final_test_acc']:.2f}%  best {100 * run.best_acc:.2f}% "
                  f"(epoch {run.best_epoch})  wall {summary['wall_seconds']:.0f}s")
        return summary
