"""Which runs each of the paper's tables needs: variants (its rows), protocols (the recipe) and grids.

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
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UserError

# The folder name of the offline JPEG copy of CIFAR-10 (``<data root>/cifar10-jpeg``): the runner's
# default --data-dir, and how the report recognises runs trained on that copy.
OFFLINE_COPY_NAME = "cifar10-jpeg"


# ----------------------------------------------------------------------------------------------
# Variants (rows of the paper's tables), protocols, grids
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A row of a table: the method, its aux head and, for PGL, the local objective it runs its
    local epochs with (``None``: DGL's, the CLI's default ``--pgl-local``)."""

    key: str
    label: str
    method: str
    aux: str | None
    local: str | None = None
    flags: tuple[str, ...] = ()   # the objective's own flags (HPFF's base loss)

    def train_flags(self) -> list[str]:
        """The flags that make a run this row (beyond -J, -P, -Q and the protocol's)."""
        a = ["--method", self.method]
        if self.aux is not None:
            a += ["--aux", self.aux]
        if self.local is not None:
            a += ["--pgl-local", self.local]
        return a + list(self.flags)


VARIANTS = {v.key: v for v in (
    Variant("dgl", "DGL", "dgl", "1c2f"),
    Variant("infopro", "InfoPro", "infopro", "1c2f"),
    Variant("pgl-1c2f", "PGL (1Conv-2FC)", "pgl", "1c2f"),
    Variant("pgl-adapt", "PGL (Aux-Adapt)", "pgl", "adapt"),
    Variant("pgl-2c2f", "PGL (2Conv-2FC)", "pgl", "2c2f"),
    Variant("bp", "BP", "bp", None),
    # The local objectives that passed PGL's accuracy since, alone and as PGL's local epochs, each on
    # DGL's cross-entropy (their papers' "DGL+MAN" and "DGL+HPFF"). Every one of them uses the
    # 1Conv-2FC head, so that "PGL over X" against "X" isolates what the global epochs add to
    # objective X (the head is the same on both sides of the pair).
    Variant("dgl-man", "DGL+MAN", "man", "1c2f", flags=("--man-base", "dgl")),
    Variant("dgl-hpff", "DGL+HPFF", "hpff", "1c2f", flags=("--hpff-base", "dgl")),
    Variant("pgl-man", "PGL over MAN", "pgl", "1c2f", local="man", flags=("--man-base", "dgl")),
    Variant("pgl-hpff", "PGL over HPFF", "pgl", "1c2f", local="hpff", flags=("--hpff-base", "dgl")),
)}
LOCAL_VARIANTS = ("dgl", "infopro", "pgl-1c2f", "pgl-adapt", "pgl-2c2f")
# The accuracy-frontier grid's rows, in the order its report lists them, and its pairs: (PGL over X, X)
# shows what the global epochs add on top of objective X, (X, DGL) what the objective adds over DGL.
FRONTIER_VARIANTS = ("dgl", "dgl-man", "dgl-hpff", "pgl-adapt", "pgl-man", "pgl-hpff")
FRONTIER_PAIRS = (("pgl-adapt", "dgl"), ("pgl-man", "dgl-man"), ("pgl-hpff", "dgl-hpff"),
                  ("dgl-man", "dgl"), ("dgl-hpff", "dgl"))


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


def _frontier(p: Protocol) -> list[Entry]:
    """Three seeds of every frontier row at the main J, whatever the protocol's default seeds: the
    report pairs the rows seed by seed, which needs the same seeds on both sides."""
    seeds = tuple(sorted(set(p.seeds) | {0, 1, 2}))[:3] if p.name != "tiny" else p.seeds
    return [Entry(v, p.main_J, *((p.P, p.Q) if VARIANTS[v].method == "pgl" else (None, None)), seeds)
            for v in FRONTIER_VARIANTS]


GRIDS = {
    "table1": ("Table 1: accuracy of every method at every J", _table1),
    "table2": ("Table 2: Table 1's runs with parameters and peak memory per phase", _table1),
    "table3": ("Table 3: PGL (Aux-Adapt) at the main J for every period P and duration Q, with DGL", _table3),
    "frontier": ("The accuracy frontier: DGL, MAN and HPFF alone and under PGL at the main J", _frontier),
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
    def local(self) -> str | None:
        return VARIANTS[self.variant].local

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
            raise UserError(f"--only {text!r}: {part!r} is not KEY=VALUE (keys: {', '.join(FILTER_KEYS)})")
        key, value = (s.strip() for s in part.split("=", 1))
        canon = {k.lower(): k for k in FILTER_KEYS}.get(key.lower())
        if key.lower() == "name":
            canon = "variant"
        if canon is None:
            raise UserError(f"--only {text!r}: unknown key {key!r} (keys: {', '.join(FILTER_KEYS)})")
        values = [v.strip() for v in value.split("|") if v.strip()]
        if not values:
            raise UserError(f"--only {text!r}: {key} has no value")
        if canon in _INT_KEYS:
            try:
                values = [int(v) for v in values]
            except ValueError:
                raise UserError(f"--only {text!r}: {key} takes integers, got {value!r}") from None
        if canon == "variant":
            for v in values:
                if v not in VARIANTS:
                    raise UserError(f"--only {text!r}: unknown variant {v!r} (variants: {', '.join(VARIANTS)})")
        if canon == "aux":
            values = [None if v in ("none", "-") else v for v in values]
        out.setdefault(canon, set()).update(values)
    if not out:
        raise UserError(f"--only {text!r}: empty filter")
    return out


def _matches(run: Run, flt: dict[str, set]) -> bool:
    d = run.describe()
    return all(d[k] in vals for k, vals in flt.items())


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seeds {text!r}: expected comma-separated non-negative integers")
    return tuple(dict.fromkeys(seeds))


def plan_runs(grid: str, protocol: Protocol, arch: str, only: list[str] = (), seeds: tuple[int, ...] | None = None) -> list[Run]:
    if grid not in GRIDS:
        raise UserError(f"unknown grid {grid!r} (grids: {', '.join(GRIDS)})")
    filters = [parse_filter(t) for t in only]
    runs = []
    for e in GRIDS[grid][1](protocol):
        for s in (seeds if seeds is not None else e.seeds):
            r = Run(grid, arch, e.variant, e.J, e.P, e.Q, s)
            if not filters or any(_matches(r, f) for f in filters):
                runs.append(r)
    if not runs:
        raise UserError(f"--only {' / '.join(only)} selects no run of grid {grid} "
                        f"(variants {', '.join(VARIANTS)}; J {', '.join(map(str, protocol.Js))})")
    return runs
