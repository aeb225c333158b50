"""Golden metrics of every method in every strategy: short fixed-seed runs of a tiny network on
synthetic data (``bp``, ``dgl``, ``infopro``, ``pgl`` in one process; ``pgl`` with data parallel and
with the module pipeline under torchrun, 2 gloo ranks) must reproduce the losses and accuracies
recorded in ``tests/golden/methods.*.json``.

They guard reorganisations: moving code that changes no arithmetic must change nothing, bit for
bit, on the machine kind that recorded the values (``machine`` in each file, as in
``test_golden.py``). On another machine kind the first epoch is compared to 1e-4 relative and the
later ones by their schedule only (CPU kernels block their sums by instruction set, and a global
epoch amplifies the difference).

To record new values after an *intended* change of the arithmetic, run this file with
``PGL_FAST_WRITE_GOLDEN=1`` and say why in the commit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pgl_fast.train import main

from test_golden import VOLATILE, compare_records, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
PREFIX = "methods"
COMMON = ["--dataset", "synthetic", "--synthetic-train", "48", "--synthetic-test", "16", "--arch", "resnet8",
          "-J", "3", "--split", "even", "--aux", "1c2f", "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
          "--seed", "0", "--device", "cpu", "--progress", "off", "--deterministic", "--cpu-tune", "off"]
# one process: every method, PGL with a local and a global epoch
SINGLE = {
    "bp": ["--method", "bp"],
    "dgl": ["--method", "dgl"],
    "infopro": ["--method", "infopro", "--infopro-loss", "softmax", "--ixx-1", "1", "--ixy-1", "0.5",
                "--ixx-2", "0", "--ixy-2", "1"],
    "pgl": ["--method", "pgl", "-P", "1", "-Q", "1"],
}
# torchrun, 2 ranks: data parallel (batch split in two) and the module pipeline (one stage per rank)
DISTRIBUTED = {
    "pgl-dp": ["--method", "pgl", "-P", "1", "-Q", "1"],
    "pgl-pipeline": ["--method", "pgl", "-P", "1", "-Q", "1", "--pipeline", "2"],
}


def _records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in f if line.strip()]


def _one_process(out, args) -> list[dict]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*COMMON, *args, "-o", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
        torch.use_deterministic_algorithms(False)  # process-global: do not leak into other tests
    return _records(out)


def _torchrun(out, args) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "pgl_fast.train", *COMMON, *args, "-o", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return _records(out)


@pytest.fixture(scope="module")
def golden():
    here = machine()
    files = sorted(f for f in os.listdir(GOLDEN_DIR) if f.startswith(PREFIX + ".") and f.endswith(".json"))
    recorded = [(f, json.load(open(os.path.join(GOLDEN_DIR, f)))) for f in files]
    mine = [(f, w) for f, w in recorded if w.get("machine") == here]
    if os.environ.get("PGL_FAST_WRITE_GOLDEN") == "1":
        name = mine[0][0] if mine else f"{PREFIX}.{here['cpu_capability'].lower()}-{len(recorded)}.json"
        data = mine[0][1] if mine else {"args": COMMON, "machine": here, "runs": {}}
        return {"write": os.path.join(GOLDEN_DIR, name), "data": data}
    if not recorded:
        pytest.skip("no golden file recorded yet (PGL_FAST_WRITE_GOLDEN=1)")
    name, want = mine[0] if mine else recorded[0]
    assert want["args"] == COMMON
    return {"write": None, "file": name, "data": want, "bitwise": bool(mine)}


def _check(golden, name, got):
    if golden["write"]:
        golden["data"]["runs"][name] = got
        with open(golden["write"], "w") as f:
            json.dump(golden["data"], f, indent=1, sort_keys=True)
        pytest.skip(f"wrote {name} into {golden['write']}")
    want = golden["data"]["runs"].get(name)
    assert want is not None, f"{golden['file']} has no run {name!r}: record it with PGL_FAST_WRITE_GOLDEN=1"
    compare_records(f"{golden['file']}: {name}", got, want, golden["bitwise"])


@pytest.mark.parametrize("name", list(SINGLE))
def test_one_process_matches_golden(name, golden, tmp_path):
    _check(golden, name, _one_process(tmp_path / "run", SINGLE[name]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DISTRIBUTED))
def test_torchrun_matches_golden(name, golden, tmp_path):
    _check(golden, name, _torchrun(tmp_path / "run", DISTRIBUTED[name]))
