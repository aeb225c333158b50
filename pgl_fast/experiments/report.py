"""Report of a grid of finished runs: markdown tables in the paper's layout, results.json and plots.

    python -m pgl_fast.report runs/exp/table1 [--layout table1|table2|table3] [--out DIR]

Reads every run directory of the grid folder that has a ``summary.json`` (unfinished runs are listed,
never averaged) and writes, into the grid folder (or ``--out``):

- ``report.md``: a header stating the data set, protocol, epochs, train subset and test set size,
  then per architecture the grid's tables: ``table1`` rows = methods (DGL, InfoPro, PGL (1Conv-2FC),
  PGL (Aux-Adapt), PGL (2Conv-2FC), BP), columns = J, cells ``mean ± std (n)`` of the best and of the
  final test accuracy over seeds (std: sample standard deviation; ``–`` with one seed), then
  parameters with aux heads, peak memory per phase and wall time; ``table2`` the paper's Table 2
  columns (accuracy, parameters, memory) per J; ``table3`` rows = Q, columns = P as the paper's
  Table 3, with the DGL row. Each comes with the paper's numbers, the PGL (Aux-Adapt) − DGL gap at
  every J (ours vs the paper's) and the ordering of the methods at every J. A table of every run
  follows.
- ``results.json``: one entry per finished run (method, J, aux, P, Q, seed, final and best test
  accuracy, parameters, peak memory per phase, wall time, ...).
- ``acc_per_epoch_J<J>.png``: test accuracy per epoch of every method at that J (mean over seeds, the
  seeds' range shaded), PGL's global epochs shaded grey (from the ``phase`` of its metrics; when
  the PGL runs differ in P and Q, as in table3, hollow squares on each curve instead);
  ``memory_vs_J.png``: peak memory against J per method (PGL's local-phase peak dotted).
  With several architectures in one folder the files get an ``_<arch>`` suffix.
"""
from __future__ import annotations

import math
import os
import sys

from ..config.argparsing import OneLineParser
from ..errors import UserError
from ..jsonio import read_json, read_jsonl, write_json_atomic, write_text_atomic
from .grids import FRONTIER_PAIRS, GRIDS, OFFLINE_COPY_NAME, VARIANTS

ORDER = ["dgl", "infopro", "pgl-1c2f", "pgl-adapt", "pgl-2c2f", "dgl-man", "dgl-hpff", "pgl-man", "pgl-hpff", "bp"]

# The paper's Table 1 (test accuracy %, mean of 3 trials), CIFAR-10; J = 16, 8, 4, 2; BP separately.
PAPER_TABLE1 = {
    "resnet32": {
        "dgl": {16: 83.63, 8: 85.70, 4: 88.52, 2: 91.29},
        "infopro": {16: 85.04, 8: 88.94, 4: 91.12, 2: 91.81},
        "pgl-1c2f": {16: 87.26, 8: 88.30, 4: 89.72, 2: 91.89},
        "pgl-adapt": {16: 88.85, 8: 89.81, 4: 90.86, 2: 92.01},
        "pgl-2c2f": {16: 90.22, 8: 90.55, 4: 91.62, 2: 92.59},
        "bp": 93.03,
    },
    "resnet110": {
        "dgl": {16: 86.12, 8: 87.55, 4: 89.59, 2: 92.38},
        "infopro": {16: 88.75, 8: 90.75, 4: 91.06, 2: 92.38},
        "pgl-1c2f": {16: 88.29, 8: 89.86, 4: 91.36, 2: 92.88},
        "pgl-adapt": {16: 90.37, 8: 90.94, 4: 91.86, 2: 93.20},
        "bp": 93.39,
    },
}
# The paper's Table 2 (resnet32, CIFAR-10): (params M, memory GB on an RTX 2080 Ti) per J; BP at J=1.
PAPER_TABLE2 = {
    "dgl": {16: (0.86, 1.62), 8: (0.65, 1.87), 4: (0.55, 2.18), 2: (0.50, 3.02)},
    "infopro": {16: (0.92, 2.56), 8: (0.68, 2.96), 4: (0.57, 3.18), 2: (0.50, 3.29)},
    "pgl-1c2f": {16: (0.86, 2.03), 8: (0.65, 2.23), 4: (0.55, 2.48), 2: (0.50, 3.15)},
    "pgl-adapt": {16: (0.98, 2.08), 8: (0.71, 2.30), 4: (0.58, 2.55), 2: (0.51, 3.17)},
    "pgl-2c2f": {16: (1.24, 2.12), 8: (0.82, 2.31), 4: (0.64, 2.56), 2: (0.53, 3.17)},
    "bp": (0.86, 3.57),
}
# The paper's Table 3 (resnet32, J=16, PGL Aux-Adapt): accuracy % by (P, Q); DGL 83.63.
PAPER_TABLE3 = {
    (5, 1): 88.57, (10, 1): 87.94, (15, 1): 87.84, (20, 1): 87.33,
    (5, 2): 90.43, (10, 2): 88.85, (15, 2): 88.37, (20, 2): 88.08,
    (5, 3): 90.93, (10, 3): 89.52, (15, 3): 89.31, (20, 3): 88.57,
}
PAPER_TABLE3_DGL = 83.63

# Published test accuracy (%) at ResNet-32 K=16 on CIFAR-10 (400 epochs; their K merges the stem into
# the first module), for the frontier report's reference column; PGL's rows are its Table 1 (160 epochs).
PUBLISHED_FRONTIER = {"dgl": 83.63, "pgl-adapt": 88.85, "dgl-man": 90.89, "dgl-hpff": 91.06}

LAYOUTS = ("table1", "table2", "table3", "frontier")


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------


def variant_of(method: str, aux: str | None, local: str | None = None, base: str | None = None) -> str:
    """The table row of a run: its method, aux head, (PGL) local objective -- ``local`` None or
    ``dgl`` being PGL's default -- and, for MAN and HPFF, the base loss they act with (``dgl``:
    cross-entropy, as in their papers' "DGL+MAN"; ``infopro``)."""
    if method == "bp":
        return "bp"
    tail = "" if aux == "1c2f" else f"-{aux}"
    on = "" if base in (None, "dgl") else f"-{base}"
    if method == "pgl":
        if local in (None, "dgl"):
            return f"pgl-{aux}"
        return f"pgl-{local}{on if local in ('man', 'hpff') else ''}{tail}"
    if method in ("dgl", "infopro") and aux == "1c2f":
        return method
    if method in ("man", "hpff"):
        return f"{base or 'dgl'}-{method}{tail}"
    return f"{method}-{aux}"


def label_of(variant: str) -> str:
    if variant in VARIANTS:
        return VARIANTS[variant].label
    method, _, aux = variant.partition("-")
    return f"{ {'dgl': 'DGL', 'infopro': 'InfoPro', 'pgl': 'PGL'}.get(method, method)} ({aux})"


def collect_runs(grid_dir: str) -> list[dict]:
    """One record per finished run directory (``summary.json`` present) directly under grid_dir."""
    runs = []
    if not os.path.isdir(grid_dir):
        return runs
    for name in sorted(os.listdir(grid_dir)):
        d = os.path.join(grid_dir, name)
        summary = read_json(os.path.join(d, "summary.json"))
        if not os.path.isdir(d) or not isinstance(summary, dict):
            continue
        cfg = read_json(os.path.join(d, "config.json"), {}) or {}
        header = read_json(os.path.join(d, "header.json"), {}) or {}
        metrics = [r for r in read_jsonl(os.path.join(d, "metrics.jsonl")) if "epoch" in r]
        method = summary.get("method", cfg.get("method"))
        aux = summary.get("aux", cfg.get("aux")) if method != "bp" else None
        pgl = method == "pgl"
        peaks = summary.get("peak_mem_mib_by_phase") or {}
        objective = cfg.get("pgl_local") if pgl else method
        base = cfg.get(f"{objective}_base") if objective in ("man", "hpff") else None
        variant = variant_of(method, aux, cfg.get("pgl_local") if pgl else None, base)
        runs.append({
            "name": name, "variant": variant, "label": label_of(variant),
            "method": method, "arch": summary.get("arch", cfg.get("arch")), "J": summary.get("J", cfg.get("modules")),
            "aux": aux, "P": cfg.get("period") if pgl else None, "Q": cfg.get("duration") if pgl else None,
            "seed": summary.get("seed", cfg.get("seed")),
            "final_test_acc": summary.get("final_test_acc"), "best_test_acc": summary.get("best_test_acc"),
            "best_epoch": summary.get("best_epoch"),
            # summary.json keeps the counts in ``parameters`` {backbone, aux, total}; summaries
            # written before that also had the flat parameters_with_aux/parameters_without_aux
            "parameters_with_aux": (summary.get("parameters") or {}).get("total", summary.get("parameters_with_aux")),
            "parameters_without_aux": (summary.get("parameters") or {}).get(
                "backbone", summary.get("parameters_without_aux")),
            "peak_mem_mib_by_phase": peaks, "peak_mem_mib": max(peaks.values()) if peaks else None,
            "mem_kind": summary.get("mem_kind") or (metrics[-1].get("mem_kind") if metrics else None),
            "wall_seconds": summary.get("wall_seconds"),
            "images_per_s": _mean([r.get("images_per_s") for r in metrics]),
            "epochs": cfg.get("epochs", summary.get("epochs")), "batch_size": cfg.get("batch_size"),
            "lr": cfg.get("lr"), "dataset": cfg.get("dataset"), "data_dir": cfg.get("data_dir"),
            "train_subset": cfg.get("train_subset"), "test_subset": cfg.get("test_subset"),
            "train_images": header.get("train_images"), "test_images": header.get("test_images"),
            "device": header.get("device_name") or header.get("device"), "torch": header.get("torch"),
            "pgl_fast": header.get("pgl_fast"), "git_sha": header.get("git_sha"),
            "no_head_eval": cfg.get("no_head_eval"),
            "infopro_loss": cfg.get("infopro_loss") if method == "infopro" else None,
            "infopro_lambdas": tuple(cfg.get(k) for k in ("ixx_1", "ixy_1", "ixx_2", "ixy_2"))
            if method == "infopro" else None,
            "curve": [(r["epoch"], r.get("test_acc"), r.get("phase")) for r in metrics],
        })
    return runs


def unfinished_runs(grid_dir: str) -> list[str]:
    manifest = read_json(os.path.join(grid_dir, "grid.json"), {}) or {}
    out = []
    for name in sorted(manifest.get("runs", {})):
        if not os.path.exists(os.path.join(grid_dir, name, "summary.json")):
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------
# Statistics and formatting
# ----------------------------------------------------------------------------------------------


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def mean_std(xs) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return m, s, n


def acc_cell(xs) -> str:
    m, s, n = mean_std(xs)
    if n == 0:
        return ""
    return f"{100 * m:.2f} ± {'–' if s is None else f'{100 * s:.2f}'} ({n})"


def _fmt(x, spec: str, empty: str = "–") -> str:
    return empty if x is None else format(x, spec)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _variants_in(runs) -> list[str]:
    present = {r["variant"] for r in runs}
    return [v for v in ORDER if v in present] + sorted(present - set(ORDER))


def _Js(runs) -> list[int]:
    return sorted({r["J"] for r in runs if r["variant"] != "bp"}, reverse=True)


def _select(runs, variant, J=None):
    return [r for r in runs if r["variant"] == variant and (J is None or r["J"] == J)]


def _phase_peaks(rs) -> str:
    phases = {}
    for r in rs:
        for ph, v in (r["peak_mem_mib_by_phase"] or {}).items():
            phases.setdefault(ph, []).append(v)
    order = [p for p in ("local", "global", "bp") if p in phases] + sorted(set(phases) - {"local", "global", "bp"})
    return " / ".join(f"{p} {_mean(phases[p]):.0f}" for p in order) if phases else "–"


def _params(rs) -> str:
    p = _mean([r["parameters_with_aux"] for r in rs])
    return "–" if p is None else f"{p / 1e6:.3f}M"


def _wall(rs) -> str:
    w = _mean([r["wall_seconds"] for r in rs])
    return "–" if w is None else f"{w / 60:.1f} min"


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _acc_table(runs, key: str, Js: list[int]) -> str:
    has_bp = any(r["variant"] == "bp" for r in runs)
    header = ["Method"] + [f"J={J}" for J in Js] + (["BP (end to end)"] if has_bp else [])
    rows = []
    for v in _variants_in(runs):
        if v == "bp":
            rows.append([label_of(v)] + [""] * len(Js) + [acc_cell([r[key] for r in _select(runs, v)])])
        else:
            rows.append([label_of(v)] + [acc_cell([r[key] for r in _select(runs, v, J)]) for J in Js]
                        + ([""] if has_bp else []))
    return md_table(header, rows)


def _cost_table(runs, Js: list[int]) -> str:
    has_bp = any(r["variant"] == "bp" for r in runs)
    header = ["Method"] + [f"J={J}" for J in Js] + (["BP (end to end)"] if has_bp else [])
    rows = []
    for v in _variants_in(runs):
        def cell(rs):
            return "" if not rs else f"{_params(rs)}; {_phase_peaks(rs)} MiB; {_wall(rs)}"
        if v == "bp":
            rows.append([label_of(v)] + [""] * len(Js) + [cell(_select(runs, v))])
        else:
            rows.append([label_of(v)] + [cell(_select(runs, v, J)) for J in Js] + ([""] if has_bp else []))
    return md_table(header, rows)


def _best_mean(runs, v, J=None, key="best_test_acc"):
    m, _, _ = mean_std([r[key] for r in _select(runs, v, J)])
    return None if m is None else 100 * m


def _paper_arch(arch: str) -> str:
    """The paper's network to compare with: the same one, else resnet32 (said so in the report)."""
    return arch if arch in PAPER_TABLE1 else "resnet32"


def _paper_table1(arch: str, variants: list[str], Js: list[int]) -> str | None:
    paper = PAPER_TABLE1[_paper_arch(arch)]
    pJs = [J for J in (16, 8, 4, 2)]
    header = ["Method"] + [f"J={J}" for J in pJs] + ["BP (end to end)"]
    rows = []
    for v in ORDER:
        if v not in paper:
            continue
        if v == "bp":
            rows.append([label_of(v)] + [""] * len(pJs) + [f"{paper['bp']:.2f}"])
        else:
            rows.append([label_of(v)] + [f"{paper[v][J]:.2f}" for J in pJs] + [""])
    return md_table(header, rows)


def _gap_lines(runs, arch: str, Js: list[int]) -> list[str]:
    paper = PAPER_TABLE1[_paper_arch(arch)]
    lines = []
    for J in Js:
        ours_b = [_best_mean(runs, v, J, "best_test_acc") for v in ("pgl-adapt", "dgl")]
        ours_f = [_best_mean(runs, v, J, "final_test_acc") for v in ("pgl-adapt", "dgl")]
        p = (paper.get("pgl-adapt", {}).get(J), paper.get("dgl", {}).get(J))
        ours = ("ours: n/a (needs both runs)" if None in ours_b else
                f"ours {ours_b[0] - ours_b[1]:+.2f} (best) / {ours_f[0] - ours_f[1]:+.2f} (final)")
        theirs = (f"paper{'' if _paper_arch(arch) == arch else ' (resnet32)'} {p[0] - p[1]:+.2f}"
                  if None not in p else "paper: n/a")
        lines.append(f"- J={J}: {ours}; {theirs}{_paired_gaps(runs, J)}")
    return lines


def _seed_gaps(runs, J: int, a: str, b: str, key: str = "best_test_acc") -> dict[int, float]:
    """Row a − row b in accuracy points, seed by seed, over the seeds both rows have."""
    by_seed = {v: {r["seed"]: r for r in _select(runs, v, J) if r[key] is not None} for v in (a, b)}
    return {s: 100 * (by_seed[a][s][key] - by_seed[b][s][key]) for s in sorted(set(by_seed[a]) & set(by_seed[b]))}


def _noise_words(runs, J: int, b: str) -> str:
    """The binomial standard error of one test accuracy on the run's test set, and of a difference of two."""
    rs = [r for r in _select(runs, b, J) if r.get("test_images") and r["best_test_acc"] is not None]
    if not rs:
        return ""
    acc, n_test = rs[0]["best_test_acc"], rs[0]["test_images"]
    se = 100 * (acc * (1 - acc) / n_test) ** 0.5
    return f"; test-set sampling error of one accuracy ≈ ±{se:.2f}, of a difference ≈ ±{se * 2 ** 0.5:.2f}"


def _paired_gaps(runs, J: int, a: str = "pgl-adapt", b: str = "dgl") -> str:
    """Row a − row b seed by seed (same seed = same data order and init), when seeds pair up.

    Pairing by seed shows whether the gap holds in every trial, which a difference of means over two
    or three seeds cannot; the test-set sampling error is stated so the gap can be read against it.
    """
    gaps = _seed_gaps(runs, J, a, b)
    if len(gaps) < 2:
        return ""
    per = ", ".join(f"seed {s} {g:+.2f}" for s, g in gaps.items())
    return f"; per seed (best): {per}{_noise_words(runs, J, b)}"


def _ordering_lines(runs, arch: str, Js: list[int]) -> list[str]:
    paper = PAPER_TABLE1[_paper_arch(arch)]
    lines = []
    bp_ours = _best_mean(runs, "bp")
    for J in Js:
        ours = {v: _best_mean(runs, v, J) for v in _variants_in(runs) if v != "bp"}
        ours = {v: a for v, a in ours.items() if a is not None}
        if bp_ours is not None:
            ours["bp"] = bp_ours
        if len(ours) < 2:
            continue
        ranked = sorted(ours, key=lambda v: -ours[v])
        s = " > ".join(f"{label_of(v)} {ours[v]:.2f}" for v in ranked)
        pv = {v: (paper["bp"] if v == "bp" else paper.get(v, {}).get(J)) for v in ours if v in paper}
        pv = {v: a for v, a in pv.items() if a is not None}
        line = f"- J={J}, ours (best acc): {s}"
        if len(pv) >= 2:
            pr = sorted(pv, key=lambda v: -pv[v])
            line += f"; paper: {' > '.join(f'{label_of(v)} {pv[v]:.2f}' for v in pr)}"
            line += " — same order" if [v for v in ranked if v in pv] == pr else " — order differs"
        lines.append(line)
    return lines


def _infopro_lambda_lines(runs) -> list[str]:
    """Which lambdas the InfoPro rows trained with: InfoPro published its per-run table for the
    contrastive loss only, so a softmax row that uses it reuses values tuned for another loss."""
    used = sorted({(r["J"], r["infopro_loss"], r["infopro_lambdas"]) for r in runs
                   if r["method"] == "infopro" and r.get("infopro_lambdas")}, key=str)
    if not used:
        return []
    lines = []
    for J, loss, (a1, b1, a2, b2) in used:
        note = (" InfoPro published its lambdas for the contrastive loss only; this softmax row reuses them "
                "unless they were given explicitly." if loss == "softmax" else "")
        lines.append(f"InfoPro row, J={J} ({loss} task loss): lambda_1 (reconstruction) {a1:g} -> {a2:g}, "
                     f"lambda_2 (task) {b1:g} -> {b2:g} from the first to the last local module.{note}")
    return lines + [""]


def section_table1(runs, arch: str) -> list[str]:
    Js = _Js(runs)
    out = ["### Best test accuracy (%) over the run, mean ± std over seeds (n)", "",
           _acc_table(runs, "best_test_acc", Js), "",
           "### Final test accuracy (%) after the last epoch, mean ± std over seeds (n)", "",
           _acc_table(runs, "final_test_acc", Js), "",
           "### Parameters (with aux heads); peak memory per phase; wall time (means over seeds)", "",
           _cost_table(runs, Js), ""]
    out += _infopro_lambda_lines(runs)
    pa = _paper_arch(arch)
    other = "" if pa == arch else f"; this grid's network is {arch}, so only the ordering and gaps compare"
    out += [f"### The paper's Table 1 ({pa}, CIFAR-10, 160 epochs, mean of 3 trials{other})", "",
            _paper_table1(arch, _variants_in(runs), Js), ""]
    out += ["### PGL (Aux-Adapt) − DGL, accuracy points", ""] + _gap_lines(runs, arch, Js) + [""]
    order = _ordering_lines(runs, arch, Js)
    if order:
        out += ["### Ordering of the methods (best accuracy)", ""] + order + [""]
    return out


def section_table2(runs, arch: str) -> list[str]:
    Js = _Js(runs)
    header = ["Method"]
    for J in Js:
        header += [f"J={J} acc (best)", f"J={J} params", f"J={J} peak MiB by phase"]
    rows = []
    for v in _variants_in(runs):
        if v == "bp":
            continue
        row = [label_of(v)]
        for J in Js:
            rs = _select(runs, v, J)
            row += [acc_cell([r["best_test_acc"] for r in rs]), _params(rs) if rs else "", _phase_peaks(rs) if rs else ""]
        rows.append(row)
    out = ["### Test accuracy, parameters (with aux heads) and peak memory per phase", "", md_table(header, rows), ""]
    bp = _select(runs, "bp")
    if bp:
        out += [f"BP (end to end, J={bp[0]['J']}): accuracy {acc_cell([r['best_test_acc'] for r in bp])}, "
                f"params {_params(bp)}, peak {_phase_peaks(bp)} MiB, wall {_wall(bp)}", ""]
    ph = ["Method"] + [f"J={J} params / mem" for J in (16, 8, 4, 2)]
    prow = [[label_of(v)] + [f"{PAPER_TABLE2[v][J][0]:.2f}M / {PAPER_TABLE2[v][J][1]:.2f} GB" for J in (16, 8, 4, 2)]
            for v in ORDER if v in PAPER_TABLE2 and v != "bp"]
    prow.append(["BP (J=16 column)", f"{PAPER_TABLE2['bp'][0]:.2f}M / {PAPER_TABLE2['bp'][1]:.2f} GB", "", "", ""])
    other = "" if arch == "resnet32" else f"; this grid's network is {arch}"
    out += [f"### The paper's Table 2 (resnet32; memory: average GPU memory on an RTX 2080 Ti{other})", "",
            md_table(ph, prow), ""]
    out += ["### PGL (Aux-Adapt) − DGL, accuracy points", ""] + _gap_lines(runs, arch, Js) + [""]
    return out


def section_table3(runs, arch: str) -> list[str]:
    pgl = [r for r in runs if r["method"] == "pgl"]
    Ps = sorted({r["P"] for r in pgl})
    Qs = sorted({r["Q"] for r in pgl})
    variants = sorted({r["variant"] for r in pgl}, key=lambda v: ORDER.index(v) if v in ORDER else 99)
    out = []
    for key, what in (("best_test_acc", "Best"), ("final_test_acc", "Final")):
        for v in variants:
            Js = sorted({r["J"] for r in pgl if r["variant"] == v}, reverse=True)
            for J in Js:
                rows = []
                for Q in Qs:
                    rows.append([f"Q={Q}"] + [acc_cell([r[key] for r in pgl if r["variant"] == v and r["J"] == J
                                                        and r["P"] == P and r["Q"] == Q]) for P in Ps])
                dgl = _select(runs, "dgl", J)
                if dgl:
                    rows.append(["DGL"] + [acc_cell([r[key] for r in dgl])] + [""] * (len(Ps) - 1))
                out += [f"### {what} test accuracy (%) of {label_of(v)} at J={J}, mean ± std over seeds (n)", "",
                        md_table([label_of(v)] + [f"P={P}" for P in Ps], rows), ""]
    epochs = sorted({r["epochs"] for r in pgl if r["epochs"]})
    if epochs:
        notes = []
        for P in Ps:
            for Q in Qs:
                E = epochs[0]
                glob = sum(1 for e in range(E) if e % (P + Q) >= P)
                if glob == 0:
                    notes.append(f"P={P} Q={Q}: no global epoch within {E} epochs (that cell is DGL)")
        if notes:
            out += ["Note: " + "; ".join(notes) + ".", ""]
    pP, pQ = (5, 10, 15, 20), (1, 2, 3)
    rows = [[f"Q={Q}"] + [f"{PAPER_TABLE3[(P, Q)]:.2f}" for P in pP] for Q in pQ]
    rows.append(["DGL", f"{PAPER_TABLE3_DGL:.2f}", "", "", ""])
    other = "" if arch == "resnet32" else f"; this grid's network is {arch}"
    out += [f"### The paper's Table 3 (resnet32, J=16, PGL (Aux-Adapt), 160 epochs{other})", "",
            md_table(["PGL (Aux-Adapt)"] + [f"P={P}" for P in pP], rows), ""]
    return out


def section_frontier(runs, arch: str) -> list[str]:
    """Every frontier row at the grid's J, then each pair of rows seed by seed: what PGL's global
    epochs add on top of a local objective, and what the objective adds over DGL."""
    Js = _Js(runs)
    J = Js[0] if Js else None
    rows = []
    for v in _variants_in(runs):
        rs = _select(runs, v, None if v == "bp" else J)
        pub = PUBLISHED_FRONTIER.get(v)
        rows.append([label_of(v), acc_cell([r["best_test_acc"] for r in rs]), acc_cell([r["final_test_acc"] for r in rs]),
                     "–" if pub is None else f"{pub:.2f}", _params(rs), _phase_peaks(rs) + " MiB", _wall(rs)])
    out = [f"### J={J}: test accuracy (%), mean ± std over seeds (n); parameters with aux heads; peak memory "
           "per phase; wall time", "",
           md_table(["Row", "best", "final", "published (their budget)", "params", "peak by phase", "wall"], rows), "",
           "Published: DGL and PGL (Aux-Adapt) from PGL's Table 1 (160 epochs); DGL+MAN and DGL+HPFF from their "
           "papers (400 epochs, the stem merged into the first module). Only the gaps within this table compare.", ""]
    lines = []
    for a, b in FRONTIER_PAIRS:
        for key, what in (("best_test_acc", "best"), ("final_test_acc", "final")):
            gaps = _seed_gaps(runs, J, a, b, key)
            if not gaps:
                continue
            mean = sum(gaps.values()) / len(gaps)
            wins = sum(g > 0 for g in gaps.values())
            per = ", ".join(f"seed {s} {g:+.2f}" for s, g in gaps.items())
            lines.append(f"- {label_of(a)} − {label_of(b)} ({what}): mean {mean:+.2f} over {len(gaps)} paired "
                         f"seed(s), ahead in {wins} of {len(gaps)} ({per}){_noise_words(runs, J, b)}")
    if lines:
        out += ["### Paired gaps, accuracy points (same seed = same initialisation and data order)", ""] + lines + [""]
    return out


def runs_table(runs) -> str:
    header = ["run", "method", "J", "aux", "P", "Q", "seed", "best %", "(epoch)", "final %", "params",
              "peak MiB by phase", "img/s", "wall"]
    rows = []
    for r in sorted(runs, key=lambda r: (ORDER.index(r["variant"]) if r["variant"] in ORDER else 99, -r["J"],
                                         r["P"] or 0, r["Q"] or 0, r["seed"])):
        rows.append([r["name"], r["method"], str(r["J"]), r["aux"] or "–", _fmt(r["P"], "d"), _fmt(r["Q"], "d"),
                     str(r["seed"]), _fmt(None if r["best_test_acc"] is None else 100 * r["best_test_acc"], ".2f"),
                     str(r["best_epoch"]), _fmt(None if r["final_test_acc"] is None else 100 * r["final_test_acc"], ".2f"),
                     _params([r]), _phase_peaks([r]), _fmt(r["images_per_s"], ".1f"), _wall([r])])
    return md_table(header, rows)


# ----------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------


def _one_or_set(values) -> str:
    vals = sorted({v for v in values}, key=lambda x: (x is None, str(x)))
    return ", ".join("all" if v is None else str(v) for v in vals) if vals else "?"


def header_lines(grid_dir: str, runs: list[dict], layout: str, manifest: dict) -> list[str]:
    proto = manifest.get("protocol", {}) or {}
    dataset = _one_or_set(r["dataset"] for r in runs)
    data_dirs = sorted({r["data_dir"] for r in runs if r["data_dir"]})
    offline = any(r["dataset"] == "imagefolder" and OFFLINE_COPY_NAME in os.path.basename(os.path.normpath(d or ""))
                  for r in runs for d in [r["data_dir"]])
    if offline:
        data = ("CIFAR-10 from the offline copy (`--dataset imagefolder`, "
                f"{', '.join(data_dirs)}): **a JPEG re-encoding of CIFAR-10**, not the original PNG/pickle files, "
                "so absolute accuracies may differ slightly from the official data set")
    elif dataset == "synthetic":
        data = "synthetic random images (`--dataset synthetic`): a smoke test, the accuracies mean nothing"
    else:
        data = f"`--dataset {dataset}`" + (f" ({', '.join(data_dirs)})" if data_dirs else "")
    train_images = _one_or_set(r["train_images"] for r in runs)
    subset = _one_or_set(r["train_subset"] for r in runs)
    test_images = _one_or_set(r["test_images"] for r in runs)
    test_subset = _one_or_set(r["test_subset"] for r in runs)
    pgl = [r for r in runs if r["method"] == "pgl"]
    pq = _one_or_set(f"P={r['P']} Q={r['Q']}" for r in pgl) if pgl else "–"
    head_eval = "aux heads not scored" if all(r["no_head_eval"] for r in runs) else "aux heads scored too"
    grid = manifest.get("grid") or os.path.basename(os.path.normpath(grid_dir))
    title = GRIDS[layout][0] if layout in GRIDS else layout
    extra = manifest.get("train_args") or []
    lines = [
        f"# {title}", "",
        f"Grid folder `{grid_dir}` (grid `{grid}`), report layout `{layout}`.", "",
        f"- **Data:** {data}.",
        f"- **Protocol:** `{proto.get('name', '?')}`"
        + (f" — {proto['description']}" if proto.get("description") else "")
        + (f"; extra training flags `{' '.join(extra)}`" if extra else "") + ".",
        f"- **Epochs:** {_one_or_set(r['epochs'] for r in runs)}; batch {_one_or_set(r['batch_size'] for r in runs)}; "
        f"lr {_one_or_set(r['lr'] for r in runs)} (cosine); PGL {pq}.",
        f"- **Train set:** {train_images} images (train subset: {subset}).",
        f"- **Test set:** {test_images} images (test subset: {test_subset}), evaluated after every epoch "
        f"({head_eval}); 'best' is the best epoch's test accuracy, 'final' the last epoch's.",
        f"- **Runs:** {len(runs)} finished in `{grid_dir}`; device {_one_or_set(r['device'] for r in runs)}; "
        f"torch {_one_or_set(r['torch'] for r in runs)}; pgl_fast {_one_or_set(r['pgl_fast'] for r in runs)} "
        f"(git {_one_or_set(r['git_sha'] for r in runs)}).",
        f"- **Memory:** {_mem_words(runs)}.",
    ]
    unfinished = unfinished_runs(grid_dir)
    if unfinished:
        lines.append(f"- **Not finished (not in the tables):** {', '.join(unfinished)}.")
    if proto.get("name") not in (None, "paper"):
        lines.append("- These numbers come from a reduced protocol: compare the *ordering and gaps* of the methods "
                     "with the paper, not the absolute accuracies.")
    return lines + [""]


def _mem_words(runs) -> str:
    kinds = {r["mem_kind"] for r in runs}
    if kinds == {"cpu_rss"}:
        return ("peak resident set of the training process per phase (CPU; includes the decoded data set and the "
                "Python runtime, so differences between methods are what matters)")
    if kinds == {"cuda_allocated"}:
        return "peak CUDA memory allocated per phase (`torch.cuda.max_memory_allocated`)"
    return f"peak memory per phase ({', '.join(sorted(str(k) for k in kinds))})"


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _plt():
    import matplotlib  # optional (pip install -e '.[report]'): only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend above

    return plt


def _curve_key(r, multi_pq: bool):
    if r["method"] == "pgl" and multi_pq:
        return (r["variant"], r["P"], r["Q"])
    return (r["variant"], None, None)


def plot_acc_per_epoch(runs, J: int, path: str, title: str) -> None:
    plt = _plt()
    at_J = [r for r in runs if r["J"] == J and r["variant"] != "bp"] + [r for r in runs if r["variant"] == "bp"]
    pgl = [r for r in at_J if r["method"] == "pgl"]
    multi_pq = len({(r["P"], r["Q"]) for r in pgl}) > 1
    groups: dict = {}
    for r in at_J:
        groups.setdefault(_curve_key(r, multi_pq), []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    phase_seqs = {tuple(p for _, _, p in r["curve"]) for r in pgl}
    shaded = False
    if len(phase_seqs) == 1:
        seq = next(iter(phase_seqs))
        epochs = [e for e, _, _ in pgl[0]["curve"]]
        for e, ph in zip(epochs, seq):
            if ph == "global":
                ax.axvspan(e - 0.5, e + 0.5, color="0.85", zorder=0, label=None if shaded else "PGL global epochs")
                shaded = True
    keys = sorted(groups, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1] or 0, k[2] or 0))
    for i, key in enumerate(keys):
        rs = groups[key]
        by_epoch: dict = {}
        for r in rs:
            for e, acc, _ in r["curve"]:
                if acc is not None:
                    by_epoch.setdefault(e, []).append(100 * acc)
        es = sorted(by_epoch)
        mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in es]
        label = label_of(key[0]) + (f" P={key[1]} Q={key[2]}" if key[1] is not None else "")
        label += f" (n={len(rs)})" if len(rs) > 1 else ""
        style = "--" if key[0] == "bp" else "-"
        (line,) = ax.plot(es, mean, style, marker="o" if len(es) <= 30 else None, markersize=3, label=label)
        if not shaded and key[0].startswith("pgl"):  # mark the global epochs on the curve itself
            phase = {e: ph for e, _, ph in rs[0]["curve"]}
            ge = [(e, m) for e, m in zip(es, mean) if phase.get(e) == "global"]
            if ge:
                ax.plot([e for e, _ in ge], [m for _, m in ge], "s", color=line.get_color(), markersize=7,
                        markerfacecolor="none")
        if len(rs) > 1:
            ax.fill_between(es, [min(by_epoch[e]) for e in es], [max(by_epoch[e]) for e in es],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    last = max((e for r in at_J for e, _, _ in r["curve"]), default=1)
    ax.set_xlim(0.5, last + 0.5)
    from matplotlib.ticker import MaxNLocator  # optional, as in _plt

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%): mean over seeds, band = their range")
    note = "" if shaded or not pgl else " (PGL's global epochs: hollow squares)"
    ax.set_title(title + note, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_memory_vs_J(runs, path: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    Js = _Js(runs)
    for v in _variants_in(runs):
        if v == "bp":
            continue
        xs, peak, local = [], [], []
        for J in Js:
            rs = _select(runs, v, J)
            if not rs:
                continue
            xs.append(J)
            peak.append(_mean([r["peak_mem_mib"] for r in rs]))
            local.append(_mean([(r["peak_mem_mib_by_phase"] or {}).get("local") for r in rs]))
        if not xs or all(p is None for p in peak):
            continue
        (line,) = ax.plot(xs, peak, "-o", label=f"{label_of(v)} (peak)")
        if v.startswith("pgl") and any(l is not None for l in local):
            ax.plot(xs, local, ":", marker="x", color=line.get_color(), label=f"{label_of(v)} (local phase)")
    bp = _select(runs, "bp")
    if bp and _mean([r["peak_mem_mib"] for r in bp]) is not None:
        ax.axhline(_mean([r["peak_mem_mib"] for r in bp]), color="k", linestyle="--", label="BP (end to end)")
    if Js:
        ax.set_xscale("log", base=2)
        ax.set_xticks(Js)
        ax.set_xticklabels([str(J) for J in Js])
    kinds = {r["mem_kind"] for r in runs}
    ylab = {"cpu_rss": "peak memory (MiB, process RSS)", "cuda_allocated": "peak memory (MiB, CUDA allocated)"}
    ax.set_ylabel(ylab.get(next(iter(kinds)), "peak memory (MiB)") if len(kinds) == 1 else "peak memory (MiB)")
    ax.set_xlabel("J (decoupled modules)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _results_entry(r: dict) -> dict:
    keys = ("name", "variant", "label", "method", "arch", "J", "aux", "P", "Q", "seed", "final_test_acc",
            "best_test_acc", "best_epoch", "parameters_with_aux", "parameters_without_aux", "peak_mem_mib",
            "peak_mem_mib_by_phase", "mem_kind", "wall_seconds", "images_per_s", "epochs", "batch_size", "lr",
            "dataset", "train_subset", "test_subset", "train_images", "test_images", "device")
    out = {k: r[k] for k in keys}
    out["test_acc_per_epoch"] = [a for _, a, _ in r["curve"]]
    out["phase_per_epoch"] = [ph for _, _, ph in r["curve"]]
    return out


def write_report(grid_dir: str, layout: str | None = None, out_dir: str | None = None) -> dict:
    """Write report.md, results.json and the PNG plots; returns their paths."""
    if not os.path.isdir(grid_dir):
        raise UserError(f"{grid_dir}: no such folder")
    runs = collect_runs(grid_dir)
    if not runs:
        raise UserError(f"{grid_dir}: no finished run (no */summary.json)")
    manifest = read_json(os.path.join(grid_dir, "grid.json"), {}) or {}
    if layout is None:
        layout = manifest.get("grid") or os.path.basename(os.path.normpath(grid_dir))
        if layout not in LAYOUTS:
            layout = "table1"
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: not one of {', '.join(LAYOUTS)}")
    out_dir = out_dir or grid_dir
    os.makedirs(out_dir, exist_ok=True)
    archs = sorted({r["arch"] for r in runs})
    paths = {"report": os.path.join(out_dir, "report.md"), "results": os.path.join(out_dir, "results.json"), "plots": []}
    lines = header_lines(grid_dir, runs, layout, manifest)
    section = {"table1": section_table1, "table2": section_table2, "table3": section_table3,
               "frontier": section_frontier}[layout]
    for arch in archs:
        ar = [r for r in runs if r["arch"] == arch]
        suffix = f"_{arch}" if len(archs) > 1 else ""
        lines += [f"## {arch}", ""] + section(ar, arch)
        plot_lines = []
        for J in _Js(ar) or sorted({r["J"] for r in ar}):
            p = os.path.join(out_dir, f"acc_per_epoch_J{J}{suffix}.png")
            plot_acc_per_epoch(ar, J, p, f"{arch}, J={J}: test accuracy per epoch")
            paths["plots"].append(p)
            plot_lines.append(f"![test accuracy per epoch, J={J}]({os.path.basename(p)})")
        p = os.path.join(out_dir, f"memory_vs_J{suffix}.png")
        plot_memory_vs_J(ar, p, f"{arch}: peak memory vs J")
        paths["plots"].append(p)
        plot_lines.append(f"![peak memory vs J]({os.path.basename(p)})")
        lines += ["### Plots", ""] + [ln + "\n" for ln in plot_lines]
        lines += ["### Every run", "", runs_table(ar), ""]
    write_text_atomic(paths["report"], "\n".join(lines).rstrip() + "\n")
    write_json_atomic(paths["results"], [_results_entry(r) for r in runs])
    return paths


def main(argv: list[str] | None = None) -> int:
    # argparse's errors raise UserError, printed below as one line with exit code 2
    p = OneLineParser(prog="python -m pgl_fast.report", on_error="raise",
                      description="Write report.md, results.json and PNG plots for a grid folder.")
    p.add_argument("grid_dir", help="OUT/GRID folder written by python -m pgl_fast.experiments")
    p.add_argument("--layout", default=None, help=f"one of {', '.join(LAYOUTS)} (default: the grid's own)")
    p.add_argument("--out", default=None, help="where to write (default: the grid folder)")
    try:
        args = p.parse_args(argv)
        paths = write_report(args.grid_dir, args.layout, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}: pip install -e '.[report]' (matplotlib)", file=sys.stderr)
        return 2
    print(f"wrote {paths['report']}, {paths['results']} and {len(paths['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
