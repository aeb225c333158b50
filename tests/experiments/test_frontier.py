"""The accuracy-frontier grid (DGL, MAN and HPFF alone and under PGL) and its report: which runs it
plans with which flags, how a finished run is recognised as its row, and the paired gaps, checked
against numbers worked out by hand."""
import json

from pgl_fast.experiments import report
from pgl_fast.experiments.grids import PROTOCOLS, VARIANTS, plan_runs


def test_frontier_plans_three_seeds_of_every_row_at_the_main_J():
    runs = plan_runs("frontier", PROTOCOLS["cpu"], "resnet32")
    rows = {}
    for r in runs:
        rows.setdefault(r.variant, set()).add(r.seed)
        assert r.J == 16
        assert (r.P, r.Q) == ((5, 1) if r.method == "pgl" else (None, None))
    assert rows == {v: {0, 1, 2} for v in ("dgl", "dgl-man", "dgl-hpff", "pgl-adapt", "pgl-man", "pgl-hpff")}
    # the same run names as table1's, so its finished DGL and PGL (Aux-Adapt) runs carry over
    assert "resnet32-pgl-adapt-J16-P5Q1-s2" in {r.name for r in runs}


def test_each_row_trains_with_its_own_flags():
    assert VARIANTS["pgl-man"].train_flags() == ["--method", "pgl", "--aux", "1c2f", "--pgl-local", "man",
                                                 "--man-base", "dgl"]
    assert VARIANTS["dgl-hpff"].train_flags() == ["--method", "hpff", "--aux", "1c2f", "--hpff-base", "dgl"]
    assert VARIANTS["pgl-adapt"].train_flags() == ["--method", "pgl", "--aux", "adapt"]


def test_a_run_is_recognised_as_its_row_from_its_config():
    assert report.variant_of("pgl", "adapt", None) == "pgl-adapt"      # made before --pgl-local existed
    assert report.variant_of("pgl", "adapt", "dgl") == "pgl-adapt"
    assert report.variant_of("pgl", "1c2f", "man") == "pgl-man"
    assert report.variant_of("pgl", "2c2f", "hpff") == "pgl-hpff-2c2f"
    assert report.variant_of("man", "1c2f") == "dgl-man"
    assert report.variant_of("hpff", "1c2f", base="dgl") == "dgl-hpff"
    assert report.variant_of("hpff", "1c2f", base="infopro") == "infopro-hpff"  # HPFF's published base
    assert report.variant_of("pgl", "1c2f", "hpff", base="infopro") == "pgl-hpff-infopro"


def _run_dir(root, variant, seed, best, final, method, aux, local=None):
    d = root / f"resnet32-{variant}-J16-s{seed}"
    d.mkdir()
    cfg = {"method": method, "aux": aux, "modules": 16, "arch": "resnet32", "seed": seed, "epochs": 18,
           "period": 5, "duration": 1, "man_base": "dgl"}
    if local is not None:
        cfg["pgl_local"] = local
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "header.json").write_text(json.dumps({"test_images": 10000}))
    (d / "summary.json").write_text(json.dumps({"best_test_acc": best, "final_test_acc": final,
                                                "peak_mem_mib_by_phase": {"local": 100.0}}))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": final, "phase": "local"}) + "\n")


def test_frontier_report_pairs_rows_seed_by_seed(tmp_path):
    for seed, (man, pgl_man) in enumerate([(0.50, 0.53), (0.52, 0.5150), (0.40, None)]):
        _run_dir(tmp_path, "dgl-man", seed, man, man - 0.01, "man", "1c2f")
        if pgl_man is not None:
            _run_dir(tmp_path, "pgl-man", seed, pgl_man, pgl_man, "pgl", "1c2f", local="man")
    runs = report.collect_runs(str(tmp_path))
    assert {r["variant"] for r in runs} == {"dgl-man", "pgl-man"}
    text = "\n".join(report.section_frontier(runs, "resnet32"))
    # best: seed 0 53.00 − 50.00 = +3.00, seed 1 51.50 − 52.00 = −0.50; seed 2 has no pair
    assert "PGL over MAN − DGL+MAN (best): mean +1.25 over 2 paired seed(s), ahead in 1 of 2 " \
           "(seed 0 +3.00, seed 1 -0.50)" in text
    # final: DGL+MAN's final is 1 point below its best, PGL over MAN's equals its best
    assert "(final): mean +2.25 over 2 paired seed(s), ahead in 2 of 2 (seed 0 +4.00, seed 1 +0.50)" in text
    # row means over all seeds: DGL+MAN (50 + 52 + 40) / 3 = 47.33
    assert "| DGL+MAN | 47.33 ± 6.43 (3) |" in text
    assert "one accuracy ≈ ±0.50" in text
