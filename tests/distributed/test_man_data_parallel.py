"""MAN under data parallel: every rank holds all parameters, so module j+1's parameters that the
EMA copy follows are the same on every rank and the EMA is exact. Two gloo ranks with synchronised
batch norm and unequal shards (4 + 3), PGL over MAN (a local step, then a global one), equal a single
process on the whole batch in float64."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import man_dp_worker as W
from pgl_fast.core.learner import LocalLearner

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.slow  # a torchrun launch of 2 processes: ~20 s of CPU, more on a busy machine
def test_man_data_parallel_equals_single_process(tmp_path, one_thread):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "man_dp_worker.py"), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    want = W.single()
    assert any(k.startswith("ema_blocks.") for k in want)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for k, v in want.items():
            if v.is_floating_point():
                assert torch.allclose(got[k], v, rtol=1e-9, atol=1e-12), (r, k)
            else:
                assert torch.equal(got[k], v), (r, k)
    # the EMA moved during the run (the comparison is not of untouched copies)
    fresh = LocalLearner(W.build(), W.method(), optimizer=W.optimizer).model.state_dict()
    assert not torch.allclose(want["ema_blocks.0.conv1.weight"], fresh["ema_blocks.0.conv1.weight"])
