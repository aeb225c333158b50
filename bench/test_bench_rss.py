"""Peak resident set of default CPU runs of bp, dgl and pgl (one local and one global epoch), each
in its own process through the CLI, and the ratios dgl/bp and pgl-global/bp measured in this run;
``summary.json``'s ``memory`` (prediction beside measurement) goes to ``extra_info``.

Default run (``pytest bench/``, marked slow): a smoke test on the synthetic data set (resnet8, J=4, batch 16).
``PGL_FAST_BENCH_DATA=<unpacked offline CIFAR-10 folder>`` (with train/ and test/): resnet32 J=16,
batch 512, ``--train-subset 1536`` (3 steps per epoch), ``--test-subset 512``; the decoded-tensor
cache goes to ``PGL_FAST_BENCH_CACHE`` (default: a temporary folder).

    PGL_FAST_BENCH_DATA=.cache/cifar10-jpeg pytest bench/test_bench_rss.py --benchmark-only --benchmark-enable -s
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DATA = os.environ.get("PGL_FAST_BENCH_DATA")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"bp": ["--method", "bp", "--epochs", "1"], "dgl": ["--method", "dgl", "--epochs", "1"],
        "pgl": ["--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2"]}


def _common(tmp_path) -> list[str]:
    if DATA:
        cache = os.environ.get("PGL_FAST_BENCH_CACHE", str(tmp_path / "cache"))
        return ["--dataset", "imagefolder", "--data-dir", DATA, "--cache-dir", cache, "--arch", "resnet32", "-J", "16",
                "-b", "512", "--train-subset", "1536", "--test-subset", "512"]
    return ["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16", "--arch", "resnet8",
            "-J", "4", "--split", "layerwise", "-b", "16"]


@pytest.mark.slow  # three CLI processes: ~15 s even for the synthetic smoke test
def test_peak_rss_ratios(benchmark, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    memory = {}
    for name, args in RUNS.items():
        out = tmp_path / name
        # a fresh process per run: the resident set of one must not carry into the next
        subprocess.run([sys.executable, "-m", "pgl_fast.train", *_common(tmp_path), *args, "--lr", "0.1",
                        "--progress", "off", "--no-head-eval", "-o", str(out)], env=env, check=True, cwd=REPO,
                       capture_output=True, timeout=3600)
        memory[name] = json.loads((out / "summary.json").read_text())["memory"]
    peak = {name: {ph: v["measured_peak_mib"] for ph, v in m["phases"].items()} for name, m in memory.items()}
    ratios = {"dgl/bp": peak["dgl"]["local"] / peak["bp"]["bp"],
              "pgl_global/bp": peak["pgl"]["global"] / peak["bp"]["bp"],
              "pgl_local/bp": peak["pgl"]["local"] / peak["bp"]["bp"]}
    benchmark.extra_info.update({"peak_rss_mib": peak, "ratios": ratios, "memory": memory,
                                 "data": "offline CIFAR-10" if DATA else "synthetic"})
    print(f"\npeak RSS MiB {peak}; ratios {ratios}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(v["measured_peak_mib"] > 0 for m in memory.values() for v in m["phases"].values())
