"""The experiment runner: plans a grid's runs and trains each as its own ``python -m pgl_fast.train``
subprocess, skipping finished runs and resuming unfinished ones, then writes the grid's report.
How a grid behaves (run directories, locks, manifests, data) is described in the package docstring
(``pgl_fast.experiments``); which runs a grid holds, in ``pgl_fast.experiments.grids``."""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..training import rundir
from ..config.argparsing import OneLineParser, add_field
from ..config import INFOPRO_LAMBDAS, TrainConfig, config_from_args
from ..errors import UserError
from ..jsonio import read_json, write_json_atomic
from . import report
from .grids import (FILTER_KEYS, GRIDS, OFFLINE_COPY_NAME, PROTOCOLS, VARIANTS, Protocol, Run, parse_seeds,
                    plan_runs)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ARCHIVE = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    grid: str
    protocol: Protocol
    out: str
    arch: str
    dataset: str
    data_dir: str | None
    device: str
    train_args: tuple[str, ...] = ()
    python: str = sys.executable

    @property
    def grid_dir(self) -> str:
        return os.path.join(self.out, self.grid)

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.grid_dir, run.name)


def train_args(run: Run, st: Settings) -> list[str]:
    p = st.protocol
    a = ["--dataset", st.dataset]
    if st.dataset != "synthetic":
        a += ["--data-dir", st.data_dir]
    a += ["--arch", run.arch, "-J", str(run.J)] + VARIANTS[run.variant].train_flags()
    if run.method == "pgl":
        a += ["-P", str(run.P), "-Q", str(run.Q)]
    if run.method == "infopro":
        # PGL's Table 1 compares with InfoPro's Softmax variant (cross-entropy head plus decoder), not
        # the contrastive one: the InfoPro parameter counts it reports (0.92M at J=16, decoders
        # included) and its InfoPro accuracies are that variant's
        a += ["--infopro-loss", "softmax"]
    if run.method == "infopro" and p.infopro_fallback is not None:
        recipe = "cifar10" if st.dataset in ("imagefolder", "synthetic") else st.dataset
        if (recipe, run.arch, run.J, False) not in INFOPRO_LAMBDAS:
            for flag, v in zip(("--ixx-1", "--ixy-1", "--ixx-2", "--ixy-2"), p.infopro_fallback):
                a += [flag, repr(float(v))]
    a += ["--epochs", str(p.epochs), "-b", str(p.batch_size), "--lr", repr(float(p.lr))]
    if p.train_subset is not None:
        a += ["--train-subset", str(p.train_subset)]
    if p.test_subset is not None:
        a += ["--test-subset", str(p.test_subset)]
    a += ["--seed", str(run.seed), "--device", st.device, "--progress", "off"]
    a += list(p.train_args) + list(st.train_args)
    a += ["-o", st.run_dir(run)]
    return a


def command(run: Run, st: Settings, resume: bool) -> list[str]:
    return [st.python, "-m", "pgl_fast.train"] + train_args(run, st) + (["--resume", "auto"] if resume else [])


# fields of config.json that must agree between the plan and an existing run directory
_CHECKED = ("dataset", "arch", "modules", "method", "aux", "period", "duration", "epochs", "batch_size", "lr",
            "train_subset", "test_subset", "seed", "sched", "momentum", "weight_decay", "synthetic_train",
            "synthetic_test", "split", "infopro_loss", "pgl_local")


def _relevant(key: str, method: str, dataset: str) -> bool:
    if key == "aux" and method == "bp":
        return False
    if key in ("period", "duration") and method != "pgl":
        return False
    if key.startswith("synthetic") and dataset != "synthetic":
        return False
    if key == "infopro_loss" and method != "infopro":
        return False
    if key == "pgl_local" and method != "pgl":
        return False
    return True


def check_run_dir(run: Run, st: Settings, planned: dict) -> None:
    path = os.path.join(st.run_dir(run), "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            have = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); move the run directory away") from None
    defaults = TrainConfig().to_dict()
    for k in _CHECKED:
        # a run made before a field existed trained with that field's default
        if _relevant(k, run.method, st.dataset) and have.get(k, defaults.get(k)) != planned.get(k):
            raise UserError(f"{st.run_dir(run)} was made with {k}={have.get(k)!r}, this plan has "
                            f"{k}={planned.get(k)!r}: use another --out (protocols never share a directory)")


def run_status(run_dir: str) -> str:
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return "finished"
    ck = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ck) and any(n.endswith(".pt") for n in os.listdir(ck)):
        return "resumable"
    return "new"


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclass
class RunnerResult:
    executed: list[str] = field(default_factory=list)   # started in this invocation (fresh or resumed)
    resumed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)   # executed and exited 0
    failed: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # already finished before this invocation
    locked: list[str] = field(default_factory=list)     # being run by another runner
    pending: list[str] = field(default_factory=list)    # left for later (--max-runs)
    interrupted: bool = False
    exit_code: int = 0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _try_lock(run_dir: str):
    # not the training's own .lock: that one is taken by the training process this runner starts
    fd = os.open(os.path.join(run_dir, ".runner.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _manifest(st: Settings, runs: list[Run], statuses: dict[str, str], commands: dict[str, str]) -> dict:
    old = read_json(os.path.join(st.grid_dir, "grid.json"), {})
    entries = dict(old.get("runs", {}))
    for r in runs:
        e = dict(entries.get(r.name, {}))
        e.update(r.describe())
        e["dir"] = r.name
        e["status"] = statuses.get(r.name, e.get("status"))
        if r.name in commands:
            e["command"] = commands[r.name]
        entries[r.name] = e
    return {
        "grid": st.grid, "grid_description": GRIDS[st.grid][0], "protocol": st.protocol.to_dict(),
        "dataset": st.dataset, "data_dir": st.data_dir, "device": st.device,
        "train_args": list(st.train_args), "created": old.get("created", _now()), "updated": _now(),
        "runs": entries,
    }


def check_manifest(st: Settings) -> None:
    old = read_json(os.path.join(st.grid_dir, "grid.json"), {})
    have_p, have_d = old.get("protocol", {}).get("name"), old.get("dataset")
    if have_p not in (None, st.protocol.name) or have_d not in (None, st.dataset):
        raise UserError(f"{st.grid_dir} holds --protocol {have_p} --dataset {have_d} runs; this is "
                        f"--protocol {st.protocol.name} --dataset {st.dataset}: use another --out")


def _log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _summary_line(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        return (f"final {100 * s['final_test_acc']:.2f}%  best {100 * s['best_test_acc']:.2f}%  "
                f"wall {s['wall_seconds'] / 60:.1f} min")
    except (OSError, ValueError, KeyError, TypeError):
        return "no summary"


def _validate(runs: list[Run], st: Settings) -> None:
    """Every run's flags, checked by the training CLI's own config before anything starts."""
    for r in runs:
        try:
            planned = config_from_args(train_args(r, st)).to_dict()
        except UserError as e:  # TrainConfig's one-line errors
            raise UserError(f"{r.name}: {e}") from None
        except SystemExit:
            raise UserError(f"{r.name}: the training CLI rejected {shlex.join(train_args(r, st))}") from None
        check_run_dir(r, st, planned)


def _print_plan(runs: list[Run], st: Settings, statuses: dict, res: RunnerResult) -> None:
    for r in runs:
        s = statuses[r.name]
        if s == "finished":
            print(f"# {r.name}: finished, skipped")
        elif r.name in res.pending:
            print(f"# {r.name}: {s}, left for later (--max-runs)")
        else:
            print(shlex.join(command(r, st, resume=s == "resumable" or rundir.inspect(st.run_dir(r)) is not None)))


class _Pool:
    """The training subprocesses of one invocation: each holds its run directory's lock while it runs,
    and everything it does is written to the run's ``command.txt``/``train.log`` and to ``res``."""

    def __init__(self, st: Settings, res: RunnerResult, statuses: dict, commands: dict, total: int, env: dict):
        self.st, self.res, self.statuses, self.commands = st, res, statuses, commands
        self.total, self.env = total, env
        self.started = 0
        self.active: dict = {}  # Popen -> (run, lock fd, log file, start time)

    def launch(self, r: Run) -> None:
        st, res = self.st, self.res
        rd = st.run_dir(r)
        os.makedirs(rd, exist_ok=True)
        fd = _try_lock(rd)
        if fd is None:
            res.locked.append(r.name)
            _log(f"{r.name}: locked by another runner, skipped")
            return
        status = run_status(rd)  # another runner may have finished it meanwhile
        if status == "finished":
            _unlock(fd)
            res.skipped.append(r.name)
            self.statuses[r.name] = status
            return
        # a start that died before its first checkpoint left files: --resume auto replaces them
        cmd = command(r, st, resume=status == "resumable" or rundir.inspect(rd) is not None)
        line = shlex.join(cmd)
        stamp = f"# {_now()} {r.name} ({'resume' if status == 'resumable' else 'start'})\n"
        _append(os.path.join(rd, "command.txt"), stamp + line + "\n")
        _append(os.path.join(st.grid_dir, "commands.txt"), stamp + line + "\n")
        self.commands[r.name] = line
        log = open(os.path.join(rd, "train.log"), "a")
        log.write(f"\n===== {_now()} {line}\n")
        log.flush()
        self.started += 1
        _log(f"[{self.started}/{self.total}] {r.name}: {'resuming' if status == 'resumable' else 'starting'}")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=os.getcwd(),
                             start_new_session=True)
        res.executed.append(r.name)
        if status == "resumable":
            res.resumed.append(r.name)
        self.statuses[r.name] = "running"
        self.active[p] = (r, fd, log, time.time())

    def reap_finished(self) -> None:
        for p in list(self.active):
            rc = p.poll()
            if rc is not None:
                self._reap(p, rc)

    def _reap(self, p, rc: int) -> None:
        r, fd, log, t0 = self.active.pop(p)
        log.close()
        _unlock(fd)
        rd = self.st.run_dir(r)
        if rc == 0 and run_status(rd) == "finished":
            self.res.finished.append(r.name)
            self.statuses[r.name] = "finished"
            _log(f"{r.name}: done in {(time.time() - t0) / 60:.1f} min: {_summary_line(rd)}")
            return
        self.res.failed.append((r.name, rc))
        self.statuses[r.name] = f"failed (exit {rc})"
        tail = ""
        try:
            with open(os.path.join(rd, "train.log")) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            tail = lines[-1] if lines else ""
        except OSError:
            pass
        _log(f"{r.name}: FAILED (exit {rc}): {tail}  [log: {os.path.join(rd, 'train.log')}]")

    def stop_all(self) -> None:
        """Terminate the running trainings; checkpoints are written atomically, so this is always safe."""
        for p in self.active:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.time() + 30
        for p in list(self.active):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            r, fd, log, _ = self.active.pop(p)
            log.close()
            _unlock(fd)
            self.statuses[r.name] = run_status(self.st.run_dir(r))
            (self.res.finished if self.statuses[r.name] == "finished" else self.res.pending).append(r.name)


def _worker_env(st: Settings, workers: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if workers > 1 and not st.device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def execute_plan(runs: list[Run], st: Settings, *, workers: int = 1, max_runs: int | None = None,
                 dry_run: bool = False) -> RunnerResult:
    res = RunnerResult()
    _validate(runs, st)
    if not dry_run:
        check_manifest(st)

    statuses = {r.name: run_status(st.run_dir(r)) for r in runs}
    todo = [r for r in runs if statuses[r.name] != "finished"]
    res.skipped = [r.name for r in runs if statuses[r.name] == "finished"]
    if max_runs is not None:
        todo, later = todo[:max_runs], todo[max_runs:]
        res.pending = [r.name for r in later]
    if dry_run:
        _print_plan(runs, st, statuses, res)
        return res

    os.makedirs(st.grid_dir, exist_ok=True)
    grid_json = os.path.join(st.grid_dir, "grid.json")
    commands: dict[str, str] = {}
    write_json_atomic(grid_json, _manifest(st, runs, statuses, commands))
    _log(f"grid {st.grid} ({st.protocol.name}): {len(runs)} runs, {len(res.skipped)} finished, "
         f"{len(todo)} to run{f', {len(res.pending)} left for later' if res.pending else ''}")

    pool = _Pool(st, res, statuses, commands, len(todo), _worker_env(st, workers))
    queue = list(todo)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        while queue or pool.active:
            while queue and len(pool.active) < workers:
                pool.launch(queue.pop(0))
            if pool.active:
                time.sleep(0.2)
                pool.reap_finished()
    except KeyboardInterrupt:
        res.interrupted = True
        _log("interrupted: stopping the running training(s); they keep their last checkpoint")
        pool.stop_all()
        res.pending += [r.name for r in queue]
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        write_json_atomic(grid_json, _manifest(st, runs, statuses, commands))

    res.exit_code = 130 if res.interrupted else (1 if res.failed else 0)
    _log(f"grid {st.grid}: {len(res.finished)} finished now, {len(res.skipped)} already finished, "
         f"{len(res.failed)} failed, {len(res.locked)} locked, {len(res.pending)} left")
    return res


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> OneLineParser:
    # argparse's errors raise UserError, which main() prints as one line with exit code 2
    p = OneLineParser(
        prog="python -m pgl_fast.experiments", on_error="raise",
        description="Run a named grid of the paper's experiments as separate, resumable training runs "
                    "(finished runs are skipped; stop and restart at any time). The report is written "
                    "into OUT/GRID at the end; 'python -m pgl_fast.report OUT/GRID' writes it again.",
        epilog="example: python -m pgl_fast.experiments table1 --protocol cpu --out runs/experiments "
               "--device cpu --only J=16 --only variant=bp --only 'variant=dgl|pgl-adapt,J=4'")
    p.add_argument("grid", help=f"one of: {', '.join(GRIDS)}")
    p.add_argument("--protocol", default="cpu",
                   help=f"one of: {', '.join(PROTOCOLS)} (default cpu; see pgl_fast.experiments.grids)")
    p.add_argument("--out", default="runs/experiments", help="output root; runs go to OUT/GRID/<run> (default runs/experiments)")
    # the flags every run receives unchanged: help and choices are the training CLI's own
    add_field(p, TrainConfig, "arch", default=None, note="default: the protocol's, resnet32; resnet8 for tiny")
    add_field(p, TrainConfig, "dataset", default=None,
              note="default imagefolder: the offline JPEG copy of CIFAR-10 in --data-dir; cifar10 downloads "
                   "through torchvision into --data-dir; the tiny protocol runs on synthetic")
    add_field(p, TrainConfig, "data_dir", default=None,
              note="default .cache/cifar10-jpeg for imagefolder, ./data for torchvision sets")
    p.add_argument("--archive", default=None,
                   help=f"tarball unpacked into the parent of --data-dir when that is missing "
                        f"(default {DEFAULT_ARCHIVE} if present)")
    add_field(p, TrainConfig, "device", note="passed to every run; default auto")
    p.add_argument("--workers", type=int, default=1,
                   help="training subprocesses at a time (default 1: sequential; on the CPU each gets cores/N threads)")
    p.add_argument("--max-runs", type=int, default=None, metavar="N", help="start at most N runs, leave the rest")
    p.add_argument("--only", action="append", default=[], metavar="FILTER",
                   help="keep runs matching KEY=VALUE[,KEY=VALUE...] (comma: and; VALUE a|b: or; repeat --only: "
                        f"or); keys: {', '.join(FILTER_KEYS)}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every selected entry "
                                                 "(default: the grid's seeds per entry)")
    p.add_argument("--train-args", default="", help="extra flags for every run, e.g. --train-args='--amp --channels-last' (note the =)")
    p.add_argument("--dry-run", action="store_true", help="print the commands (and what is skipped), run nothing")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return p


def settings_from_args(args) -> Settings:
    if args.grid not in GRIDS:
        raise UserError(f"unknown grid {args.grid!r} (grids: {', '.join(GRIDS)})")
    if args.protocol not in PROTOCOLS:
        raise UserError(f"--protocol {args.protocol!r}: not one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[args.protocol]
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.max_runs is not None and args.max_runs < 0:
        raise UserError(f"--max-runs must be >= 0, got {args.max_runs}")
    dataset = args.dataset or proto.dataset or "imagefolder"
    if proto.dataset is not None and dataset != proto.dataset:
        raise UserError(f"--protocol {proto.name} runs on --dataset {proto.dataset}, not {dataset}")
    if proto.dataset is None and dataset == "synthetic":
        raise UserError("--dataset synthetic is only for --protocol tiny")
    data_dir = args.data_dir
    if dataset == "synthetic":
        data_dir = None
    elif data_dir is None:
        data_dir = os.path.join(".cache", OFFLINE_COPY_NAME) if dataset == "imagefolder" else "./data"
    try:
        extra = tuple(shlex.split(args.train_args))
    except ValueError as e:
        raise UserError(f"--train-args: {e}") from None
    for bad in ("-o", "--output-dir", "--resume", "--seed", "--epochs", "--method", "-J", "--modules", "--aux"):
        if bad in extra:
            raise UserError(f"--train-args: {bad} is set by the grid and protocol, not here")
    return Settings(grid=args.grid, protocol=proto, out=args.out, arch=args.arch or proto.arch, dataset=dataset,
                    data_dir=data_dir, device=args.device, train_args=extra)


def ensure_data(st: Settings, archive: str | None) -> None:
    """Unpack the offline copy when --data-dir is missing and an archive is at hand."""
    if st.dataset != "imagefolder" or os.path.isdir(st.data_dir):
        return
    archive = archive or (DEFAULT_ARCHIVE if os.path.exists(DEFAULT_ARCHIVE) else None)
    if archive is None:
        raise UserError(f"--data-dir {st.data_dir} not found: pass --archive cifar10-jpeg.tar.gz, another "
                        f"--data-dir, or --dataset cifar10 (downloads through torchvision)")
    from ..data import extract_archive_if_needed  # torch is imported only when there is data to unpack

    got = extract_archive_if_needed(archive, os.path.dirname(os.path.abspath(st.data_dir)))
    if not os.path.isdir(st.data_dir):
        raise UserError(f"--archive {archive} unpacked to {got}, not --data-dir {st.data_dir}: pass --data-dir {got}")


def execute(argv: list[str] | None = None) -> RunnerResult:
    """Parse, plan and run; raises UserError on bad input. Returns what was run, skipped, failed."""
    args = build_parser().parse_args(argv)
    st = settings_from_args(args)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    runs = plan_runs(st.grid, st.protocol, st.arch, args.only, seeds)
    if not args.dry_run:
        ensure_data(st, args.archive)
    res = execute_plan(runs, st, workers=args.workers, max_runs=args.max_runs, dry_run=args.dry_run)
    if not args.dry_run and not args.no_report and not res.interrupted:
        try:
            if report.collect_runs(st.grid_dir):
                paths = report.write_report(st.grid_dir)
                _log(f"report: {paths['report']}")
        except ImportError as e:
            _log(f"report skipped ({e}); pip install -e '.[report]' and run python -m pgl_fast.report {st.grid_dir}")
        except Exception as e:  # the runs are done and kept; a report problem must not hide that
            _log(f"report failed ({type(e).__name__}: {e}); run python -m pgl_fast.report {st.grid_dir}")
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        # one report command: its --out (where the report goes) is not the runner's --out (the
        # root of the grids), so an alias here would send reports to different places
        args = shlex.join(argv[1:]) or "OUT/GRID"
        print(f"error: 'report' is not a grid: write the report with python -m pgl_fast.report {args}", file=sys.stderr)
        return 2
    try:
        return execute(argv).exit_code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
