"""Experiment runner: the paper's tables as named grids of separate, resumable training runs.

    python -m pgl_fast.experiments table1 --protocol cpu --out runs/exp          # run (or continue)
    python -m pgl_fast.experiments table1 --protocol cpu --out runs/exp --dry-run
    python -m pgl_fast.experiments table1 --protocol cpu --out runs/exp \
        --only J=16 --only variant=bp --only "variant=dgl|pgl-adapt,J=4"          # a subset now, the rest later
    python -m pgl_fast.report runs/exp/table1                                     # the report (also written at the end of a run)

Grids
-----
A grid is a list of entries (variant, J, P, Q, seeds) on one (dataset, arch). A *variant* is a row of the
paper's tables: ``dgl`` (DGL, aux 1c2f), ``infopro`` (InfoPro Softmax: CE head + decoder, aux 1c2f), ``pgl-1c2f``, ``pgl-adapt``,
``pgl-2c2f`` (PGL with the three aux heads) and ``bp`` (end to end, run at J=1).

- ``table1``: every variant at every J of the protocol (16, 8, 4, 2) plus BP.
- ``table2``: the same runs as ``table1`` (its accuracy column is Table 1's); its report adds parameters
  and peak memory per phase. ``python -m pgl_fast.report <out>/table1 --layout table2`` gives that
  report from the ``table1`` runs without training anything twice.
- ``table3``: PGL (Aux-Adapt) at J=16 for every (P, Q) of the ablation, plus DGL at J=16 as the
  reference row.

Every run is its own subprocess (``python -m pgl_fast.train ...``; a crash of one run never kills the
runner) writing into ``<out>/<grid>/<arch>-<variant>-J<J>[-P<P>Q<Q>]-s<seed>`` (P and Q only for PGL,
the only method they affect). A run is *finished* when its ``summary.json`` exists and is then skipped;
a run with a checkpoint is continued with ``--resume auto``; anything else starts fresh. The runner
can be stopped at any time (Ctrl-C or SIGTERM: the running child is terminated and keeps its last
checkpoint, written atomically at every epoch end and every ``--save-every`` steps) and simply
started again.
A run directory is locked (``flock``) while its child runs, so two runners on the same grid never
train the same run twice. The exact command of every invocation is appended to the run's
``command.txt`` and to the grid's ``commands.txt``; ``grid.json`` is the manifest (protocol, data,
every planned run with its directory, command and status). A run directory whose ``config.json``
disagrees with the plan (another protocol, epochs, batch, lr, ...) is refused with a one-line error:
results of different protocols never mix in one directory.

Protocols
---------
``paper``: the paper's recipe on the full data: 160 epochs, batch 1024, lr 0.8 (cosine, SGD Nesterov
0.9, wd 1e-4), P=10, Q=2 (table1/2), the paper's P x Q grid (table3, P in 5/10/15/20, Q in 1/2/3),
three seeds (the paper averages three trials), evaluation on the full test set every epoch.

``cpu``: a reduced recipe that one 2-core CPU machine runs at about 30 minutes per run at most:

- a class-balanced, seeded train subset of 4,000 of the 50,000 images (400 per class); 18 epochs;
  batch 64; lr 0.05 (the paper's 0.8 at batch 1024 scaled linearly: 0.8 x 64/1024), cosine;
- P=5, Q=1: the paper's P:Q = 10:2, so PGL spends 1/6 of its epochs in global epochs as in the paper
  (18 epochs = three full cycles: 15 local and 3 global epochs; unlike the paper's 160, which end
  with 4 local epochs, the last epoch is global: the report gives final and best accuracy);
- evaluation on the full 10,000-image test set after every epoch; the aux heads are not scored
  (``--no-head-eval``): the report does not use them, and scoring them made each evaluation about
  4x longer (15 extra heads per image at J=16: 208 s instead of 48 s per evaluation, both measured
  under load);
- a checkpoint every 20 steps as well as at every epoch end (``--save-every 20``), so a stopped
  runner loses at most about 20 seconds of work;
- seeds: 0; 0 and 1 for DGL and PGL (Aux-Adapt) at J=16;
- table3 uses the paper's (P, Q) values themselves: only they keep each cell's share of global
  epochs Q/(P+Q) (P=5, Q=1 cannot be scaled down in whole epochs). P=20 is left out since no global
  epoch fits in 18 epochs; P=15 gets one cycle (e.g. Q=3: 15 local + 3 global), P=10 one cycle and a
  bit, P=5 three cycles.

Measured on this machine (2 cores, torch 2.14.1, resnet32 J=16, offline JPEG copy, batch 64, full
pipeline through ``python -m pgl_fast.train`` at a load average of about 2, i.e. nearly both cores):
PGL (Aux-Adapt) trains 114 img/s in local and 119 img/s in global epochs, InfoPro 50 img/s (its
decoders and contrastive loss make it the slowest), and one evaluation of the 10,000 test images
takes about 12-17 s. Per 4,000-image epoch: InfoPro about 93 s, PGL (Aux-Adapt) about 52 s, so 18
epochs take about 28 min (InfoPro, the longest run) and 16 min (PGL Aux-Adapt); DGL, PGL (1Conv-2FC)
and BP are faster (an in-process step benchmark, best of 4 rounds: DGL 172, PGL 1c2f 175, PGL 2c2f
135/122 local/global, BP 230 img/s). The other helper processes sharing the machine made every
measurement noisy: at load averages of 5-7 the same runs went 2-4x slower (13-30 img/s for PGL
Aux-Adapt), so a run takes up to about an hour when the machine is shared. The full account is in
``docs/results/README.md``. The committed runs then took less on a quiet machine: InfoPro 23.7 min,
PGL (Aux-Adapt) about 11 min, DGL about 12.5 min, BP 8 min (every run's wall time is in its
``summary.json``).

``tiny``: synthetic data (64 train / 32 test images), resnet8, J in (4, 2), 2 epochs, batch 32, lr
0.05, P=1, Q=1, two seeds for DGL at J=4, InfoPro with fixed lambdas (resnet8 has none of its own):
a smoke test of the machinery, not an experiment.

Data: ``--dataset imagefolder`` (the default) reads ``--data-dir`` (default ``.cache/cifar10-jpeg``,
the offline JPEG copy of CIFAR-10, unpacked from ``--archive``, by default
``<repo>/../shared/data/cifar10-jpeg.tar.gz``, when it is missing). ``--dataset cifar10`` loads
CIFAR-10 through torchvision and downloads it into ``--data-dir`` (default ``./data``).
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from . import rundir
from .metrics import read_json, write_json_atomic
from .config import INFOPRO_LAMBDAS, config_from_args
from .errors import UserError as ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHIVE = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")
OFFLINE_COPY_NAME = "cifar10-jpeg"


class GridError(Exception):
    """Bad input to the runner: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Variants (rows of the paper's tables), protocols, grids
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    method: str
    aux: str | None


VARIANTS = {v.key: v for v in (
    Variant("dgl", "DGL", "dgl", "1c2f"),
    Variant("infopro", "InfoPro", "infopro", "1c2f"),
    Variant("pgl-1c2f", "PGL (1Conv-2FC)", "pgl", "1c2f"),
    Variant("pgl-adapt", "PGL (Aux-Adapt)", "pgl", "adapt"),
    Variant("pgl-2c2f", "PGL (2Conv-2FC)", "pgl", "2c2f"),
    Variant("bp", "BP", "bp", None),
)}
LOCAL_VARIANTS = ("dgl", "infopro", "pgl-1c2f", "pgl-adapt", "pgl-2c2f")


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    epochs: int
    batch_size: int
    lr: float
    P: int
    Q: int
    Js: tuple[int, ...]
    main_J: int                          # table3's J
    table3_P: tuple[int, ...]
    table3_Q: tuple[int, ...]
    seeds: tuple[int, ...]               # default seeds of every entry
    more_seeds: dict = field(default_factory=dict)   # (variant, J) -> seeds
    arch: str = "resnet32"
    dataset: str | None = None           # None: from --dataset
    train_subset: int | None = None
    test_subset: int | None = None
    train_args: tuple[str, ...] = ()     # extra flags for every run
    infopro_fallback: tuple[float, float, float, float] | None = None

    def seeds_for(self, variant: str, J: int) -> tuple[int, ...]:
        return tuple(self.more_seeds.get((variant, J), self.seeds))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["more_seeds"] = {f"{v}@J{j}": list(s) for (v, j), s in self.more_seeds.items()}
        return d


PROTOCOLS = {
    "paper": Protocol(
        name="paper",
        description="the paper's recipe: full data, 160 epochs, batch 1024, lr 0.8 (cosine), P=10, Q=2, 3 seeds",
        epochs=160, batch_size=1024, lr=0.8, P=10, Q=2, Js=(16, 8, 4, 2), main_J=16,
        table3_P=(5, 10, 15, 20), table3_Q=(1, 2, 3), seeds=(0, 1, 2)),
    "cpu": Protocol(
        name="cpu",
        description=("reduced CPU recipe: class-balanced train subset of 4,000 images, 18 epochs, batch 64, "
                     "lr 0.05 (cosine), P=5, Q=1 (the paper's 1/6 share of global epochs), full test set "
                     "every epoch, no aux-head scoring"),
        epochs=18, batch_size=64, lr=0.05, P=5, Q=1, Js=(16, 8, 4, 2), main_J=16,
        table3_P=(5, 10, 15), table3_Q=(1, 2, 3), seeds=(0,),
        more_seeds={("dgl", 16): (0, 1), ("pgl-adapt", 16): (0, 1)},
        train_subset=4000, train_args=("--no-head-eval", "--save-every", "20")),
    "tiny": Protocol(
        name="tiny",
        description="smoke test: synthetic 64/32 images, resnet8, 2 epochs, batch 32, lr 0.05, P=1, Q=1",
        epochs=2, batch_size=32, lr=0.05, P=1, Q=1, Js=(4, 2), main_J=4,
        table3_P=(1, 2), table3_Q=(1,), seeds=(0,), more_seeds={("dgl", 4): (0, 1)},
        arch="resnet8", dataset="synthetic",
        train_args=("--synthetic-train", "64", "--synthetic-test", "32", "--save-every", "1"),
        infopro_fallback=(1.0, 0.5, 0.0, 1.0)),
}


@dataclass(frozen=True)
class Entry:
    variant: str
    J: int
    P: int | None
    Q: int | None
    seeds: tuple[int, ...]


def _table1(p: Protocol) -> list[Entry]:
    entries = []
    for J in p.Js:
        for v in LOCAL_VARIANTS:
            pq = (p.P, p.Q) if VARIANTS[v].method == "pgl" else (None, None)
            entries.append(Entry(v, J, *pq, p.seeds_for(v, J)))
    entries.append(Entry("bp", 1, None, None, p.seeds_for("bp", 1)))
    return entries


def _table3(p: Protocol) -> list[Entry]:
    entries = [Entry("pgl-adapt", p.main_J, P, Q, p.seeds_for("pgl-adapt", p.main_J))
               for Q in p.table3_Q for P in p.table3_P]
    entries.append(Entry("dgl", p.main_J, None, None, p.seeds_for("dgl", p.main_J)))
    return entries


GRIDS = {
    "table1": ("Table 1: accuracy of every method at every J", _table1),
    "table2": ("Table 2: Table 1's runs with parameters and peak memory per phase", _table1),
    "table3": ("Table 3: PGL (Aux-Adapt) at the main J for every period P and duration Q, with DGL", _table3),
}


@dataclass(frozen=True)
class Run:
    grid: str
    arch: str
    variant: str
    J: int
    P: int | None
    Q: int | None
    seed: int

    @property
    def method(self) -> str:
        return VARIANTS[self.variant].method

    @property
    def aux(self) -> str | None:
        return VARIANTS[self.variant].aux

    @property
    def name(self) -> str:
        pq = f"-P{self.P}Q{self.Q}" if self.P is not None else ""
        return f"{self.arch}-{self.variant}-J{self.J}{pq}-s{self.seed}"

    def describe(self) -> dict:
        return {"variant": self.variant, "label": VARIANTS[self.variant].label, "method": self.method,
                "aux": self.aux, "J": self.J, "P": self.P, "Q": self.Q, "seed": self.seed, "arch": self.arch}


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------

FILTER_KEYS = ("variant", "method", "aux", "J", "P", "Q", "seed", "arch")
_INT_KEYS = ("J", "P", "Q", "seed")


def parse_filter(text: str) -> dict[str, set]:
    """``method=pgl,J=16|8`` -> {"method": {"pgl"}, "J": {16, 8}} (comma = and, | = or)."""
    out: dict[str, set] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise GridError(f"--only {text!r}: {part!r} is not KEY=VALUE (keys: {', '.join(FILTER_KEYS)})")
        key, value = (s.strip() for s in part.split("=", 1))
        canon = {k.lower(): k for k in FILTER_KEYS}.get(key.lower())
        if key.lower() == "name":
            canon = "variant"
        if canon is None:
            raise GridError(f"--only {text!r}: unknown key {key!r} (keys: {', '.join(FILTER_KEYS)})")
        values = [v.strip() for v in value.split("|") if v.strip()]
        if not values:
            raise GridError(f"--only {text!r}: {key} has no value")
        if canon in _INT_KEYS:
            try:
                values = [int(v) for v in values]
            except ValueError:
                raise GridError(f"--only {text!r}: {key} takes integers, got {value!r}") from None
        if canon == "variant":
            for v in values:
                if v not in VARIANTS:
                    raise GridError(f"--only {text!r}: unknown variant {v!r} (variants: {', '.join(VARIANTS)})")
        if canon == "aux":
            values = [None if v in ("none", "-") else v for v in values]
        out.setdefault(canon, set()).update(values)
    if not out:
        raise GridError(f"--only {text!r}: empty filter")
    return out


def _matches(run: Run, flt: dict[str, set]) -> bool:
    d = run.describe()
    return all(d[k] in vals for k, vals in flt.items())


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise GridError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise GridError(f"--seeds {text!r}: expected comma-separated non-negative integers")
    return tuple(dict.fromkeys(seeds))


def plan_runs(grid: str, protocol: Protocol, arch: str, only: list[str] = (), seeds: tuple[int, ...] | None = None) -> list[Run]:
    if grid not in GRIDS:
        raise GridError(f"unknown grid {grid!r} (grids: {', '.join(GRIDS)})")
    filters = [parse_filter(t) for t in only]
    runs = []
    for e in GRIDS[grid][1](protocol):
        for s in (seeds if seeds is not None else e.seeds):
            r = Run(grid, arch, e.variant, e.J, e.P, e.Q, s)
            if not filters or any(_matches(r, f) for f in filters):
                runs.append(r)
    if not runs:
        raise GridError(f"--only {' / '.join(only)} selects no run of grid {grid} "
                        f"(variants {', '.join(VARIANTS)}; J {', '.join(map(str, protocol.Js))})")
    return runs


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
    a += ["--arch", run.arch, "--method", run.method, "-J", str(run.J)]
    if run.aux is not None:
        a += ["--aux", run.aux]
    if run.method == "pgl":
        a += ["-P", str(run.P), "-Q", str(run.Q)]
    if run.method == "infopro":
        # PGL's Table 1 compares with InfoPro's Softmax (CE + decoder) variant: its parameter counts
        # (0.92M at J=16) and accuracies are that variant's (prior-art §2, §8.1)
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
            "synthetic_test", "split", "infopro_loss")


def _relevant(key: str, method: str, dataset: str) -> bool:
    if key == "aux" and method == "bp":
        return False
    if key in ("period", "duration") and method != "pgl":
        return False
    if key.startswith("synthetic") and dataset != "synthetic":
        return False
    if key == "infopro_loss" and method != "infopro":
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
        raise GridError(f"{path}: unreadable ({e}); move the run directory away") from None
    for k in _CHECKED:
        if _relevant(k, run.method, st.dataset) and have.get(k) != planned.get(k):
            raise GridError(f"{st.run_dir(run)} was made with {k}={have.get(k)!r}, this plan has "
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
        raise GridError(f"{st.grid_dir} holds --protocol {have_p} --dataset {have_d} runs; this is "
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


def execute_plan(runs: list[Run], st: Settings, *, workers: int = 1, max_runs: int | None = None,
                 dry_run: bool = False) -> RunnerResult:
    res = RunnerResult()
    planned_cfg = {}
    for r in runs:  # validate every run's flags before anything starts
        try:
            planned_cfg[r.name] = config_from_args(train_args(r, st)).to_dict()
        except ConfigError as e:
            raise GridError(f"{r.name}: {e}") from None
        except SystemExit:
            raise GridError(f"{r.name}: the training CLI rejected {shlex.join(train_args(r, st))}") from None
        check_run_dir(r, st, planned_cfg[r.name])
    if not dry_run:
        check_manifest(st)

    statuses = {r.name: run_status(st.run_dir(r)) for r in runs}
    todo = [r for r in runs if statuses[r.name] != "finished"]
    res.skipped = [r.name for r in runs if statuses[r.name] == "finished"]
    if max_runs is not None:
        todo, later = todo[:max_runs], todo[max_runs:]
        res.pending = [r.name for r in later]

    if dry_run:
        for r in runs:
            s = statuses[r.name]
            if s == "finished":
                print(f"# {r.name}: finished, skipped")
            elif r.name in res.pending:
                print(f"# {r.name}: {s}, left for later (--max-runs)")
            else:
                print(shlex.join(command(r, st, resume=s == "resumable" or rundir.inspect(st.run_dir(r)) is not None)))
        return res

    os.makedirs(st.grid_dir, exist_ok=True)
    grid_json = os.path.join(st.grid_dir, "grid.json")
    commands: dict[str, str] = {}
    write_json_atomic(grid_json, _manifest(st, runs, statuses, commands))
    _log(f"grid {st.grid} ({st.protocol.name}): {len(runs)} runs, {len(res.skipped)} finished, "
         f"{len(todo)} to run{f', {len(res.pending)} left for later' if res.pending else ''}")

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if workers > 1 and not st.device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

    queue = list(todo)
    active: dict = {}  # Popen -> (run, lock fd, log file, start time)
    total = len(todo)
    started = 0

    def launch(r: Run) -> None:
        nonlocal started
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
            statuses[r.name] = status
            return
        # a start that died before its first checkpoint left files: --resume auto replaces them
        cmd = command(r, st, resume=status == "resumable" or rundir.inspect(rd) is not None)
        line = shlex.join(cmd)
        stamp = f"# {_now()} {r.name} ({'resume' if status == 'resumable' else 'start'})\n"
        _append(os.path.join(rd, "command.txt"), stamp + line + "\n")
        _append(os.path.join(st.grid_dir, "commands.txt"), stamp + line + "\n")
        commands[r.name] = line
        log = open(os.path.join(rd, "train.log"), "a")
        log.write(f"\n===== {_now()} {line}\n")
        log.flush()
        started += 1
        _log(f"[{started}/{total}] {r.name}: {'resuming' if status == 'resumable' else 'starting'}")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                             start_new_session=True)
        res.executed.append(r.name)
        if status == "resumable":
            res.resumed.append(r.name)
        statuses[r.name] = "running"
        active[p] = (r, fd, log, time.time())

    def reap(p, rc: int) -> None:
        r, fd, log, t0 = active.pop(p)
        log.close()
        _unlock(fd)
        rd = st.run_dir(r)
        if rc == 0 and run_status(rd) == "finished":
            res.finished.append(r.name)
            statuses[r.name] = "finished"
            _log(f"{r.name}: done in {(time.time() - t0) / 60:.1f} min: {_summary_line(rd)}")
        else:
            res.failed.append((r.name, rc))
            statuses[r.name] = f"failed (exit {rc})"
            tail = ""
            try:
                with open(os.path.join(rd, "train.log")) as f:
                    lines = [ln.strip() for ln in f if ln.strip()]
                tail = lines[-1] if lines else ""
            except OSError:
                pass
            _log(f"{r.name}: FAILED (exit {rc}): {tail}  [log: {os.path.join(rd, 'train.log')}]")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        while queue or active:
            while queue and len(active) < workers:
                launch(queue.pop(0))
            if not active:
                continue
            time.sleep(0.2)
            for p in list(active):
                rc = p.poll()
                if rc is not None:
                    reap(p, rc)
    except KeyboardInterrupt:
        res.interrupted = True
        _log("interrupted: stopping the running training(s); they keep their last checkpoint")
        for p in active:  # checkpoints are written atomically, so terminating a run is always safe
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.time() + 30
        for p in list(active):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            r, fd, log, _ = active.pop(p)
            log.close()
            _unlock(fd)
            statuses[r.name] = run_status(st.run_dir(r))
            if statuses[r.name] == "finished":
                res.finished.append(r.name)
            else:
                res.pending.append(r.name)
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
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise GridError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m pgl_fast.experiments", allow_abbrev=False,
        description="Run a named grid of the paper's experiments as separate, resumable training runs "
                    "(finished runs are skipped; stop and restart at any time). The report is written "
                    "into OUT/GRID at the end; 'python -m pgl_fast.report OUT/GRID' writes it again.",
        epilog="example: python -m pgl_fast.experiments table1 --protocol cpu --out runs/experiments "
               "--device cpu --only J=16 --only variant=bp --only 'variant=dgl|pgl-adapt,J=4'")
    p.add_argument("grid", help=f"one of: {', '.join(GRIDS)}")
    p.add_argument("--protocol", default="cpu", help=f"one of: {', '.join(PROTOCOLS)} (default cpu; see the module docstring)")
    p.add_argument("--out", default="runs/experiments", help="output root; runs go to OUT/GRID/<run> (default runs/experiments)")
    p.add_argument("--arch", default=None, help="network (default: the protocol's, resnet32; resnet8 for tiny)")
    p.add_argument("--dataset", default=None,
                   help="imagefolder (default: the offline JPEG copy of CIFAR-10 in --data-dir), cifar10 "
                        "(downloads through torchvision into --data-dir), svhn, stl10; tiny: synthetic")
    p.add_argument("--data-dir", default=None,
                   help="default .cache/cifar10-jpeg for imagefolder, ./data for torchvision sets")
    p.add_argument("--archive", default=None,
                   help=f"tarball unpacked into the parent of --data-dir when that is missing "
                        f"(default {DEFAULT_ARCHIVE} if present)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, passed to every run (default auto)")
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
        raise GridError(f"unknown grid {args.grid!r} (grids: {', '.join(GRIDS)})")
    if args.protocol not in PROTOCOLS:
        raise GridError(f"--protocol {args.protocol!r}: not one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[args.protocol]
    if args.workers < 1:
        raise GridError(f"--workers must be >= 1, got {args.workers}")
    if args.max_runs is not None and args.max_runs < 0:
        raise GridError(f"--max-runs must be >= 0, got {args.max_runs}")
    dataset = args.dataset or proto.dataset or "imagefolder"
    if proto.dataset is not None and dataset != proto.dataset:
        raise GridError(f"--protocol {proto.name} runs on --dataset {proto.dataset}, not {dataset}")
    if proto.dataset is None and dataset == "synthetic":
        raise GridError("--dataset synthetic is only for --protocol tiny")
    data_dir = args.data_dir
    if dataset == "synthetic":
        data_dir = None
    elif data_dir is None:
        data_dir = os.path.join(".cache", OFFLINE_COPY_NAME) if dataset == "imagefolder" else "./data"
    try:
        extra = tuple(shlex.split(args.train_args))
    except ValueError as e:
        raise GridError(f"--train-args: {e}") from None
    for bad in ("-o", "--output-dir", "--resume", "--seed", "--epochs", "--method", "-J", "--modules", "--aux"):
        if bad in extra:
            raise GridError(f"--train-args: {bad} is set by the grid and protocol, not here")
    return Settings(grid=args.grid, protocol=proto, out=args.out, arch=args.arch or proto.arch, dataset=dataset,
                    data_dir=data_dir, device=args.device, train_args=extra)


def ensure_data(st: Settings, archive: str | None) -> None:
    """Unpack the offline copy when --data-dir is missing and an archive is at hand."""
    if st.dataset != "imagefolder" or os.path.isdir(st.data_dir):
        return
    archive = archive or (DEFAULT_ARCHIVE if os.path.exists(DEFAULT_ARCHIVE) else None)
    if archive is None:
        raise GridError(f"--data-dir {st.data_dir} not found: pass --archive cifar10-jpeg.tar.gz, another "
                        f"--data-dir, or --dataset cifar10 (downloads through torchvision)")
    from .data import DataError, extract_archive_if_needed

    try:
        got = extract_archive_if_needed(archive, os.path.dirname(os.path.abspath(st.data_dir)))
    except DataError as e:
        raise GridError(str(e)) from None
    if not os.path.isdir(st.data_dir):
        raise GridError(f"--archive {archive} unpacked to {got}, not --data-dir {st.data_dir}: pass --data-dir {got}")


def execute(argv: list[str] | None = None) -> RunnerResult:
    """Parse, plan and run; raises GridError on bad input. Returns what was run, skipped, failed."""
    args = build_parser().parse_args(argv)
    st = settings_from_args(args)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    runs = plan_runs(st.grid, st.protocol, st.arch, args.only, seeds)
    if not args.dry_run:
        ensure_data(st, args.archive)
    res = execute_plan(runs, st, workers=args.workers, max_runs=args.max_runs, dry_run=args.dry_run)
    if not args.dry_run and not args.no_report and not res.interrupted:
        try:
            from . import report

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
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
