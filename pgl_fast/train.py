"""Train a CIFAR ResNet with BP, DGL, InfoPro or PGL.

    python -m pgl_fast.train --dataset imagefolder --data-dir .cache/cifar10-jpeg \\
        --arch resnet32 --method pgl -J 16 --aux adapt -P 10 -Q 2

Outputs go to ``--output-dir``: ``config.json`` (resolved config), ``header.json`` (versions,
device), ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``checkpoints/``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import time

import torch

from . import checkpoint as ckpt
from . import data as data_mod
from . import rundir
from .config import ConfigError, TrainConfig, config_from_args, explicit_fields
from .engine import Executor, LossSpec, StepStats
from .metrics import JsonlWriter, PeakMemory, run_header, write_json_atomic
from .network import LocalNet
from .schedule import lr_at_epoch, phase_of_epoch, phase_table


class UserError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA GPU is available here; use --device cpu or auto")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {cfg.device}: only {torch.cuda.device_count()} GPU(s) visible")
    if cfg.cuda_graphs and dev.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU (device here: cpu); drop the flag to train eagerly")
    if cfg.amp and cfg.amp_dtype == "fp16" and dev.type != "cuda":
        raise UserError("--amp-dtype fp16 needs a CUDA GPU; use the default bf16 on the CPU")
    return dev


def resolve_head_kernels(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the fused head kernels may run at all. With ``--head-kernels auto`` on CUDA the
    choice per head is then measured (``head_select.configure_head_kernels``); on the CPU ``auto``
    is eager, since Triton runs there only under its interpreter."""
    if cfg.head_kernels == "eager" or cfg.method == "bp" or cfg.compile:  # --compile: Inductor fuses the heads
        return False
    if cfg.head_kernels == "auto" and device.type != "cuda":
        return False
    if cfg.aux in ("mlpsr",):
        if cfg.head_kernels == "triton":
            raise UserError("--head-kernels triton: the mlpsr head has no fused kernel; use --head-kernels eager")
        return False
    from .kernels import triton_available

    ok, reason = triton_available(device)
    if not ok:
        if cfg.head_kernels == "triton":
            raise UserError(f"--head-kernels triton: {reason}")
        return False
    return True


def build_network(cfg: TrainConfig, num_classes: int, image_size: int) -> LocalNet:
    infopro = cfg.method == "infopro"
    return LocalNet(
        # bp keeps the J-module split too: it only sets the checkpoint segments (--checkpoint-global)
        cfg.arch, cfg.modules, num_classes=num_classes, image_size=image_size, split=cfg.split,
        split_recipe=cfg.split_recipe, aux=None if cfg.method == "bp" else cfg.aux,
        aux_widen=cfg.aux_widen, aux_feature_dim=cfg.aux_feature_dim,
        head_out_dim=cfg.aux_feature_dim if infopro and cfg.infopro_loss == "contrast" else None,
        decoders=infopro, droprate=cfg.droprate,
    )


def plan_memory(cfg: TrainConfig, net: LocalNet, image_size: int, num_classes: int):
    """The global-step checkpointing of this run, resolved once: ``--plan`` prints this
    :class:`~pgl_fast.planner.MemoryPlan`, the executor runs exactly its segments (None: no
    checkpointing) and ``header.json`` records it.

    The flags name the candidates -- ``--global-memory X`` or ``--checkpoint-global --global-segments
    X`` one of them (``--global-segments auto``: every checkpointed one), ``--global-memory auto`` all
    four -- and a rule picks among them: under ``--memory-budget`` the fastest that fits; else, for
    ``auto`` on PGL, the fastest within ``--global-memory-factor`` x the predicted local-step peak;
    else the smallest predicted peak. ``auto`` on ``bp`` is plain backprop. The planner measures
    only where the rule needs predictions, or for ``--plan``."""
    from . import planner
    from .schedule import GLOBAL, phase_table

    budget = cfg.memory_budget
    fixed_why = "as asked"
    if cfg.global_memory != "auto":
        candidates, selected_by = (cfg.global_memory,), f"--global-memory {cfg.global_memory}"
    elif cfg.checkpoint_global:
        candidates = (("modules", "units", "coarse") if cfg.global_segments == "auto" else (cfg.global_segments,))
        selected_by = f"--checkpoint-global --global-segments {cfg.global_segments}"
    elif cfg.method == "bp" and budget is None:
        candidates, selected_by = ("none",), "--global-memory auto"
        fixed_why = "bp trains end to end: auto leaves it plain backprop, as fast as it gets"
    else:
        candidates, selected_by = planner.CANDIDATES, "--global-memory auto"
    rule = "budget" if budget is not None else (
        "fixed" if len(candidates) == 1 else "factor" if cfg.global_memory == "auto" and not cfg.checkpoint_global
        else "smallest")
    if budget is not None:
        selected_by += f" --memory-budget {budget:g}"
    has_global = GLOBAL in phase_table(cfg.method, cfg.epochs, cfg.period, cfg.duration)
    if not has_global:
        # nothing to plan; a budget still has to hold for the local steps
        rule = "budget" if budget is not None else "fixed"
        candidates = (candidates[0],) if len(candidates) == 1 else ("none",)

    prediction = None
    if cfg.plan or rule != "fixed":
        measured = (planner.CANDIDATES if cfg.plan else candidates) if has_global else ()
        prediction = planner.predict(
            method=cfg.method, arch=cfg.arch, J=cfg.modules, aux=cfg.aux, batch=cfg.batch_size,
            # fp16 and bf16 tensors have the same size; the CPU planner measures fp16 as bf16
            dtype="bf16" if cfg.amp else "fp32", image_size=image_size, split=cfg.split,
            num_classes=num_classes, lean_blocks=cfg.lean_blocks, candidates=tuple(planner.by_cost(measured)))

    if not has_global:
        why = (f"--method {cfg.method} trains locally only" if cfg.method != "pgl" else
               f"-P {cfg.period} -Q {cfg.duration} over --epochs {cfg.epochs} reaches no global epoch")
        if budget is not None:
            try:
                planner.check_local(prediction, budget)
            except planner.PlanError as e:
                raise UserError(str(e)) from None
        choice = candidates[0]
        return planner.MemoryPlan(
            choice=choice, segments=planner.candidate_segments(choice, net, cfg.arch, image_size),
            selected_by=selected_by, reason=why, prediction=prediction, budget_mib=budget, global_steps=False)

    if rule == "fixed":
        choice, why = candidates[0], fixed_why
    else:
        sub = dict(prediction, **{"global": {c: prediction["global"][c] for c in candidates}})
        try:
            choice, why = planner.choose(sub, budget, factor=cfg.global_memory_factor if rule == "factor" else None)
        except planner.PlanError as e:
            raise UserError(str(e)) from None
    # the exact flags that would select each other candidate from this command
    alternatives = {}
    for c in planner.COST_ORDER:
        if c == choice:
            continue
        drop = (["--checkpoint-global"] if cfg.checkpoint_global else []) + (
            ["--memory-budget"] if budget is not None and (prediction is None or c not in prediction["global"]
                                                           or prediction["global"][c] > budget * planner.MiB) else [])
        alternatives[c] = f"--global-memory {c}" + (f" (without {' and '.join(drop)})" if drop else "")
    return planner.MemoryPlan(
        choice=choice, segments=planner.candidate_segments(choice, net, cfg.arch, image_size),
        selected_by=selected_by, reason=why, prediction=prediction,
        factor=cfg.global_memory_factor if rule == "factor" else None, budget_mib=budget, alternatives=alternatives)


def build_executor(cfg: TrainConfig, net: LocalNet, plan=None) -> Executor:
    """The executor a run of ``cfg`` trains ``net`` with (also used by the profiler). With a
    :class:`~pgl_fast.planner.MemoryPlan` its global steps checkpoint exactly the plan's segments
    (None: not at all); without one (the profiler's fixed step kinds), ``--checkpoint-global``
    alone means one segment per module."""
    amp_dtype = None
    if cfg.amp:
        amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    if plan is not None:
        checkpoint_global, segments = plan.segments is not None, plan.segments
    else:
        checkpoint_global, segments = cfg.checkpoint_global, None
    return Executor(net, method=cfg.method, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                    weight_decay=cfg.weight_decay, loss_spec=loss_spec(cfg, net.J), amp_dtype=amp_dtype,
                    checkpoint_global=checkpoint_global, channels_last=cfg.channels_last, segments=segments,
                    compile_mode=cfg.compile_mode if cfg.compile else None)


def loss_spec(cfg: TrainConfig, J: int) -> LossSpec:
    if cfg.method != "infopro":
        return LossSpec(kind="ce")
    return LossSpec(kind="infopro", infopro_contrast=cfg.infopro_loss == "contrast",
                    lambdas=tuple(cfg.infopro_lambdas(j) for j in range(J - 1)))


def format_table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def describe(cfg: TrainConfig, net: LocalNet, image_size: int) -> str:
    rows = net.describe()
    counts = net.count_parameters()
    head = (f"{cfg.arch} split into J={net.J} modules (--split {cfg.split}), method {cfg.method}, "
            f"aux {'none' if cfg.method == 'bp' else cfg.aux}, input {image_size}x{image_size}")
    total = (f"parameters: backbone {counts['backbone']:,}  aux {counts['aux']:,}  "
             f"total {counts['total']:,} ({counts['total'] / 1e6:.3f}M)")
    return "\n".join([head, format_table(rows, list(rows[0].keys())), total])


def _progress(cfg: TrainConfig, total: int, desc: str):
    enabled = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
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
    try:
        rundir.check_output_path(path)
    except rundir.RunDirError as e:
        raise UserError(str(e)) from None


def prepare_output_dir(path: str, command: str) -> "rundir.DirLock":
    """Create the output dir and lock it for this run's lifetime. Nothing in it is touched before
    the lock is held, so what it holds is inspected under the lock."""
    check_output_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
        return rundir.DirLock.acquire(path, command)
    except rundir.RunDirError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"--output-dir {path}: not writable ({e.strerror or e})") from None


def claim_output_dir(cfg: TrainConfig) -> tuple[dict | None, str | None]:
    """Decide, under the lock, what to do with what ``--output-dir`` already holds: continue it
    (``--resume``), clear it (``--overwrite``, or ``--resume auto`` over a start that never reached
    a checkpoint), or refuse. Returns (checkpoint state for ``--resume auto`` or None, a line to
    print or None)."""
    out = cfg.output_dir
    info = rundir.inspect(out)
    if cfg.resume == "auto":
        try:
            state = ckpt.find_resume("auto", out, cfg.to_dict(), cfg.allow_schedule_change)
        except ckpt.CheckpointError as e:
            raise UserError(str(e)) from None
        if state is not None:
            return state, None
        note = f"--resume auto: no checkpoint in {ckpt.checkpoint_dir(out)}; starting a new run"
        if info is not None:
            # an earlier start that died before its first checkpoint: its files hold nothing a
            # restart could continue from, and would otherwise sit beside the new run's
            note += f" (removed the files of an earlier start that has none: {rundir.summarize_removed(rundir.clear_run(out))})"
        return None, note
    if cfg.resume is not None:
        inside = os.path.dirname(os.path.abspath(cfg.resume)) == os.path.abspath(ckpt.checkpoint_dir(out))
        if info is not None and not inside:
            raise UserError(f"--resume {cfg.resume}: {out} holds another run ({info.describe()}); resume into "
                            "an empty --output-dir, or use --resume auto to continue the run that is there")
        return None, None
    if info is None:
        return None, None
    if not cfg.overwrite:
        raise UserError(f"{out} holds a run: {info.describe()}; use --resume auto, another --output-dir, "
                        "or --overwrite")
    return None, f"--overwrite: removed the earlier run in {out} ({info.describe()}): " \
                 f"{rundir.summarize_removed(rundir.clear_run(out))}"


class RunInterrupted(Exception):
    """SIGINT/SIGTERM during training, after the mid-epoch checkpoint was written."""

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


def _flag_names() -> dict[str, str]:
    """Every long and short flag of the CLI -> its config field."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        for flag in f.metadata["flags"] or ("--" + f.name.replace("_", "-"),):
            out[flag] = f.name
    return out


def _cli_args(cfg: TrainConfig, argv: list[str] | None) -> list[str]:
    """The flags this run was started with: ``argv``, or (for a run started in-process without
    one) every flag whose value differs from its default."""
    if argv is not None:
        return list(argv)
    out = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if v == f.default:
            continue
        flag = (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[-1]
        out += [flag] if isinstance(v, bool) else [flag, str(v)]
    return out


def command_line(cfg: TrainConfig, argv: list[str] | None) -> str:
    return shlex.join([sys.executable, "-m", "pgl_fast.train", *_cli_args(cfg, argv)])


def resume_command(cfg: TrainConfig, argv: list[str] | None) -> str:
    """The command line that continues this run: the one it was started with, minus
    --resume/--overwrite/--allow-schedule-change, plus ``--resume auto``."""
    drop = {"resume", "overwrite", "allow_schedule_change"}
    argv = _cli_args(cfg, argv)
    names = _flag_names()
    longs = [n for n in names if n.startswith("--")]
    kept, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name, eq, _ = tok.partition("=")
        dest = names.get(name)
        if dest is None and name.startswith("--") and len(name) > 2:  # argparse accepts unique prefixes
            hits = {names[n] for n in longs if n.startswith(name)}
            dest = hits.pop() if len(hits) == 1 else None
        if dest in drop:
            i += 1 if eq or dest != "resume" else 2
            continue
        kept.append(tok)
        i += 1
    return shlex.join([sys.executable, "-m", "pgl_fast.train", *kept, "--resume", "auto"])


def _test_batches(data, spec, cfg: TrainConfig):
    n = int(data.test_y.shape[0])
    for i in range(0, n, cfg.test_batch_size):
        x = data_mod.normalize(data.test_x[i:i + cfg.test_batch_size], spec, torch.float32, cfg.channels_last)
        yield x, data.test_y[i:i + cfg.test_batch_size]


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


def run(cfg: TrainConfig, argv: list[str] | None = None, explicit: set[str] | None = None) -> dict:
    """Train ``cfg``. ``argv``, the command line it came from, is what the resume hint after an
    interrupt is built from. ``explicit``: the fields set on the command line
    (``config.explicit_fields``), for the warnings about flags that have no effect; None compares
    with the defaults instead. The output dir's lock and the signal handlers end with the call."""
    cleanups: list = []
    try:
        return _run(cfg, argv, explicit, cleanups)
    finally:
        for undo in reversed(cleanups):
            undo()


def _run(cfg: TrainConfig, argv: list[str] | None, explicit: set[str] | None, cleanups: list) -> dict:
    warnings = cfg.no_effect_warnings(explicit)

    def warn() -> None:  # once every check has passed: bad input stays a one-line error
        for w in warnings:
            print(w, file=sys.stderr, flush=True)

    device = resolve_device(cfg)
    use_kernels = resolve_head_kernels(cfg, device)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if cfg.describe or cfg.plan:
        spec_size, n_classes = 96 if cfg.recipe_name == "stl10" else 32, 10
        if cfg.plan and cfg.dataset == "imagefolder":
            # the plan depends on the images' size and the class count: read them as the run will
            try:
                spec = data_mod.load_dataset(
                    cfg.dataset, cfg.data_dir, device=torch.device("cpu"), train_subset=cfg.train_subset,
                    test_subset=cfg.test_subset, subset_seed=cfg.seed, download=False, cache_dir=cfg.cache_dir,
                    recipe=cfg.recipe).spec
            except data_mod.DataError as e:
                raise UserError(str(e)) from None
            spec_size, n_classes = spec.image_size, spec.num_classes
        net = build_network(cfg, n_classes, spec_size)
        warn()
        print(describe(cfg, net, spec_size))
        if cfg.plan:
            print(plan_memory(cfg, net, spec_size, n_classes).text())
        return {}

    # everything is validated before the output dir is created or touched
    check_output_dir(cfg.output_dir)
    resume_state = None
    if cfg.resume is not None and cfg.resume != "auto":
        try:
            resume_state = ckpt.find_resume(cfg.resume, cfg.output_dir, cfg.to_dict(), cfg.allow_schedule_change)
        except ckpt.CheckpointError as e:
            raise UserError(str(e)) from None
    try:
        data = data_mod.load_dataset(
            cfg.dataset, cfg.data_dir, device=device, train_subset=cfg.train_subset,
            test_subset=cfg.test_subset, subset_seed=cfg.seed, download=not cfg.no_download,
            cache_dir=cfg.cache_dir, recipe=cfg.recipe, synthetic_train=cfg.synthetic_train,
            synthetic_test=cfg.synthetic_test)
    except data_mod.DataError as e:
        raise UserError(str(e)) from None
    spec = data.spec
    net = build_network(cfg, spec.num_classes, spec.image_size).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    from .head_select import configure_head_kernels

    head_kernels = configure_head_kernels(
        net, cfg.head_kernels, use_kernels, batch=min(cfg.batch_size, int(data.train_y.shape[0])), device=device, channels_last=cfg.channels_last,
        dtype=(torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16) if cfg.amp else torch.float32)
    net.set_lean_blocks(cfg.lean_blocks)
    mem_plan = plan_memory(cfg, net, spec.image_size, spec.num_classes)
    exe = build_executor(cfg, net, mem_plan)
    gen = data_mod.make_generator(cfg.seed, device)

    cleanups.append(prepare_output_dir(cfg.output_dir, command_line(cfg, argv)).release)
    auto_state, note = claim_output_dir(cfg)
    resume_state = auto_state if cfg.resume == "auto" else resume_state
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
        net.load_state_dict(resume_state["model"])
        for opt, sd in zip(exe.optimizers, resume_state["optimizers"]):
            opt.load_state_dict(sd)
        if exe.scaler is not None and resume_state.get("scaler"):
            exe.scaler.load_state_dict(resume_state["scaler"])
        ckpt.set_rng_state(resume_state["rng"])
        gen.set_state(resume_state["data_generator"].to(gen.get_state().device))
        start_epoch, start_step = resume_state["epoch"], resume_state["step"]
        records = list(resume_state["records"])
        best_acc, best_epoch = resume_state["best_acc"], resume_state["best_epoch"]
        elapsed, peak_by_phase = resume_state["elapsed"], dict(resume_state["peak_by_phase"])
        mid_epoch = resume_state.get("mid_epoch")
        schedule_log = list(resume_state.get("schedule_changes", []))
        changed = ckpt.schedule_changes(resume_state, cfg.to_dict())
        if changed:  # only reachable with --allow-schedule-change
            schedule_log.append({"at_epoch": start_epoch, "at_step": start_step, "from": changed,
                                 "to": {k: getattr(cfg, k) for k in changed}})
            print("warning: --allow-schedule-change: the rest of this run follows a new schedule ("
                  + ", ".join(f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in changed.items())
                  + f") from epoch {start_epoch + 1}{f' step {start_step + 1}' if start_step else ''} on; "
                  "recorded in header.json", flush=True)
        if start_epoch < cfg.epochs and os.path.exists(os.path.join(cfg.output_dir, "summary.json")):
            os.remove(os.path.join(cfg.output_dir, "summary.json"))  # the run is not finished any more
        print(f"resumed from {resume_state['path']}: {start_epoch} epochs"
              f"{f' and {start_step} steps' if start_step else ''} done", flush=True)

    warn()
    header = run_header(cfg.to_dict(), device)
    header.update({"split_ranges": net.ranges, "parameters": net.count_parameters(), "memory_plan": mem_plan.record(),
                   "global_memory": mem_plan.choice, "global_segments": mem_plan.segments,
                   "head_kernels": head_kernels["resolved"], "head_kernels_mode": head_kernels["mode"],
                   "head_kernel_selection": head_kernels["selection"],
                   "compile": cfg.compile_mode if cfg.compile else None,
                   "train_images": int(data.train_y.shape[0]), "test_images": int(data.test_y.shape[0]),
                   "resumed_from": resume_state["path"] if resume_state else None,
                   "schedule_changed_from": changed or None, "schedule_changes": schedule_log,
                   "warnings": warnings})
    if cfg.method == "infopro":
        header["infopro_lambdas"] = cfg.infopro_lambda_record()
    cfg.save(os.path.join(cfg.output_dir, "config.json"))
    write_json_atomic(os.path.join(cfg.output_dir, "header.json"), header)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    # metrics.jsonl is exactly the checkpoint's epoch records: no duplicated or missing epochs
    with open(metrics_path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(metrics_path + ".tmp", metrics_path)
    metrics = JsonlWriter(metrics_path)
    print(f"pgl_fast {header['pgl_fast']} | torch {header['torch']} | device {header['device_name']} "
          f"({device}) | {cfg.method} {cfg.arch} J={net.J} aux={cfg.aux if cfg.method != 'bp' else '-'} "
          f"| {header['train_images']} train / {header['test_images']} test images")
    print(describe(cfg, net, spec.image_size))
    print(mem_plan.text())

    augment = data_mod.BatchAugmenter(spec, device)
    memory = PeakMemory(device)
    # one statistics object for the whole run: captured graphs hold its addresses
    stats = StepStats(net.J, device)
    graphed = None
    if cfg.cuda_graphs:
        from .graphs import GraphedLocalSteps

        graphed = GraphedLocalSteps(exe, stats)
        memory.graphs = graphed  # graphed epochs report the capture peaks too
    n_train = int(data.train_y.shape[0])
    t_start = time.time() - elapsed
    phases = phase_table(cfg.method, cfg.epochs, cfg.period, cfg.duration)
    timed: list[tuple[str, float]] = []  # (phase, wall seconds) of the whole epochs run by this process

    def save(epoch_done: int, step: int, mid: dict | None) -> None:
        state = {
            "model": net.state_dict(), "optimizers": [o.state_dict() for o in exe.optimizers],
            "scaler": exe.scaler.state_dict() if exe.scaler is not None else None,
            "rng": ckpt.rng_state(), "data_generator": gen.get_state().cpu(),
            "epoch": epoch_done, "step": step, "mid_epoch": mid,
            "phase": phase_of_epoch(cfg.method, min(epoch_done, cfg.epochs - 1), cfg.period, cfg.duration),
            "records": records, "best_acc": best_acc, "best_epoch": best_epoch,
            "elapsed": time.time() - t_start, "peak_by_phase": peak_by_phase, "config": cfg.to_dict(),
            "versions": {"torch": str(torch.__version__), "pgl_fast": str(header["pgl_fast"])},
            "schedule_changes": schedule_log,
        }
        return ckpt.save_checkpoint(cfg.output_dir, state, cfg.keep_checkpoints)

    interrupts = _Interrupts()
    interrupts.install()
    cleanups.append(interrupts.restore)

    def stop(epoch_done: int, step: int, n_steps: int, path: str) -> RunInterrupted:
        name = signal.Signals(interrupts.signum).name
        where = f"epoch {epoch_done + 1}, step {step}/{n_steps}" if step else f"the end of epoch {epoch_done}"
        return RunInterrupted(f"interrupted ({name}) at {where}; saved {path}\n"
                              f"resume with: {resume_command(cfg, argv)}", 128 + interrupts.signum)

    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.time()
        phase = "bp" if cfg.method == "bp" else phase_of_epoch(cfg.method, epoch, cfg.period, cfg.duration)
        exe_phase = "global" if phase in ("global", "bp") else "local"
        lr = lr_at_epoch(epoch, base_lr=cfg.lr, epochs=cfg.epochs, sched=cfg.sched,
                         warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                         milestones=(cfg.epochs // 2, cfg.epochs * 3 // 4))
        exe.set_lr(lr)
        print(f"epoch {epoch + 1}/{cfg.epochs} phase={phase} lr={lr:.5g}", flush=True)
        memory.reset()
        net.train()
        stats.reset()
        first_step, epoch_seconds = 0, 0.0
        if mid_epoch is not None and epoch == start_epoch and start_step > 0:
            # resume inside this epoch: same batch order, same accumulators, same generator state
            perm = mid_epoch["perm"].to(device)
            if perm.numel() != (n_train // cfg.batch_size * cfg.batch_size if cfg.drop_last else n_train):
                raise UserError(f"--resume: the checkpoint was taken inside an epoch of {perm.numel()} images; this "
                                f"run has {n_train} (use the original data flags)")
            batches = list(perm.split(cfg.batch_size))
            if cfg.drop_last and batches and batches[-1].shape[0] < cfg.batch_size:
                batches.pop()
            stats.load_state_dict(mid_epoch["stats"])
            first_step, epoch_seconds = start_step, mid_epoch["seconds"]
        else:
            batches = data_mod.epoch_batches(n_train, cfg.batch_size, generator=gen, drop_last=cfg.drop_last,
                                             device=device)
        perm_all = torch.cat(batches) if batches else None  # saved by mid-epoch checkpoints
        bar = _progress(cfg, len(batches), f"epoch {epoch + 1} {phase}")
        if bar is not None and first_step:
            bar.update(first_step)
        beat = Heartbeat(cfg.heartbeat, epoch, cfg.epochs, len(batches), cfg.batch_size, first_step=first_step) \
            if bar is None and cfg.heartbeat > 0 else None
        t0 = time.time()
        for step in range(first_step, len(batches)):
            idx = batches[step]
            xb = augment(data.train_x[idx], gen)
            x = data_mod.normalize(xb, spec, torch.float32, cfg.channels_last)
            image01 = xb.float().div_(255) if cfg.method == "infopro" else None
            if graphed is not None and exe_phase == "local":
                graphed(x, data.train_y[idx], image01)
            else:
                exe.train_step(exe_phase, x, data.train_y[idx], stats, image01)
            if bar is not None:
                bar.update(1)
            done = step + 1
            if beat is not None:
                beat.step(done)
            if cfg.save_every and done % cfg.save_every == 0 and done < len(batches):
                _check_finite(stats.read(), epoch, phase, net.J, partial=True)  # never save poisoned weights
                save(epoch, done, {"perm": perm_all.cpu(), "stats": stats.state_dict(),
                                   "seconds": epoch_seconds + time.time() - t0})
            _kill_hook(epoch, done)
            _signal_hook(epoch, done)
            if interrupts.signum is not None and done < len(batches):
                # the same save as --save-every's, after the same check: never save poisoned weights
                _check_finite(stats.read(), epoch, phase, net.J, partial=True)
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
        tr = stats.read()
        mem = memory.read()
        _check_finite(tr, epoch, phase, net.J)
        ev = exe.evaluate(_test_batches(data, spec, cfg), not cfg.no_head_eval)
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
        records.append(record)
        # checkpoint first, then the metrics line: a kill in between is repaired on resume, since
        # metrics.jsonl is rewritten from the checkpoint's records
        path = save(epoch + 1, 0, None)
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
        if interrupts.signum is not None and epoch + 1 < cfg.epochs:
            raise stop(epoch + 1, 0, len(batches), path)

    last = records[-1] if records else None
    counts = net.count_parameters()
    summary = {
        "final_test_acc": last["test_acc"] if last else None,
        "best_test_acc": best_acc, "best_epoch": best_epoch, "epochs": cfg.epochs,
        "parameters": counts,
        "wall_seconds": time.time() - t_start, "peak_mem_mib_by_phase": peak_by_phase,
        "mem_kind": memory.read()["kind"], "method": cfg.method, "arch": cfg.arch, "J": net.J,
        "aux": None if cfg.method == "bp" else cfg.aux, "seed": cfg.seed,
    }
    write_json_atomic(os.path.join(cfg.output_dir, "summary.json"), summary)
    print(f"done: final {100 * summary['final_test_acc']:.2f}%  best {100 * best_acc:.2f}% (epoch {best_epoch})  "
          f"wall {summary['wall_seconds']:.0f}s")
    return summary


class NonFiniteError(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        run(cfg, sys.argv[1:] if argv is None else argv, explicit_fields(argv))
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the last checkpoint is intact", file=sys.stderr)
        return 3
    except RunInterrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
