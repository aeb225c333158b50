"""The tensor-level memory tracker and ``pgl_fast.memory.profile``.

The tracker is checked against peaks counted by hand on small matmul workloads, against
``torch.distributed._tools.mem_tracker.MemTracker`` on a real step, and the profile report for
internal consistency. The issue's memory targets at the real size (resnet32, J=16, batch 256, fp32,
1c2f) are asserted by the tests at the end (the local one with --lean-blocks).

Memory numbers do not depend on the thread count, so everything here runs on one thread: on a
shared, oversubscribed CPU two OpenMP threads can make small steps 50x slower.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pgl_fast.errors import UserError
from pgl_fast.memory.profile import (BREAKDOWN, CATEGORIES, KINDS, TensorMemoryTracker, build_step, main,
                              profile_steps)

MiB = 2 ** 20
TINY = dict(arch="resnet8", J=4, split="layerwise", batch=8, image_size=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _two_matrices(n: int):
    m = nn.Module()
    m.W1 = nn.Parameter(torch.randn(n, n))
    m.W2 = nn.Parameter(torch.randn(n, n))
    return m


# ----------------------------------------------------------------------------------------------
# the tracker against hand-counted peaks
# ----------------------------------------------------------------------------------------------
def test_matmul_chain_peak_by_hand():
    """h1 = x W1, h2 = h1 W2, backward with a given G. With U = one n x n fp32 matrix, the live set
    peaks in the backward of the first matmul: W1, W2 (params), x, G (inputs), h1, h2
    (activations), W2.grad (grads), grad_h1 and the fresh grad_W1 (backward temporaries) = 9U."""
    n = 128
    U = n * n * 4
    m = _two_matrices(n)
    x, G = torch.randn(n, n), torch.randn(n, n)
    tr = TensorMemoryTracker(modules=[m], inputs=[x, G])
    with tr:
        assert tr.total == 4 * U
        h1 = x @ m.W1
        h2 = h1 @ m.W2
        assert tr.total == 6 * U
        assert tr.current["activations"] == 2 * U
        h2.backward(G)
    assert tr.peak_total == 9 * U
    assert tr.peak_in_backward and tr.peak_op == "aten.mm.default"
    assert tr.peak_breakdown == {**dict.fromkeys(CATEGORIES, 0), "params": 2 * U, "inputs": 2 * U,
                                 "activations": 2 * U, "grads": U, "backward": 2 * U}
    snap = tr.snapshot()
    assert snap["breakdown"] == {"params": 2 * U, "grads": U, "opt_state": 0, "activations": 6 * U}
    assert sum(snap["breakdown"].values()) == snap["total"]
    # after the backward: both gradients are .grad, the temporaries are gone
    assert tr.current["grads"] == 2 * U and tr.current["backward"] == 0 and tr.total == 8 * U


def test_optimizer_state_and_temporaries_by_hand():
    """SGD with momentum and weight decay: per parameter a weight-decay temporary (d_p + wd p) and
    a new momentum buffer. At the second parameter: 8U before the step + buf1 + temp2 + buf2."""
    n = 64
    U = n * n * 4
    m = _two_matrices(n)
    x, G = torch.randn(n, n), torch.randn(n, n)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    tr = TensorMemoryTracker(modules=[m], optimizers=[opt], inputs=[x, G])
    with tr:
        h1 = x @ m.W1
        h2 = h1 @ m.W2
        h2.backward(G)
        tr.reset_peak()
        opt.step()
        assert tr.peak_total == 11 * U
        assert tr.peak_breakdown["opt_temps"] + tr.peak_breakdown["opt_state"] == 3 * U
        assert tr.current["opt_state"] == 2 * U and tr.current["opt_temps"] == 0
        opt.zero_grad(set_to_none=True)
        del h1, h2
        assert tr.total == 6 * U  # params, inputs, momentum buffers
        assert tr.current["grads"] == 0 and tr.current["activations"] == 0
    # a second step: the existing momentum buffers stay opt_state, entered again
    with tr:
        tr.reset_peak()
        (x @ m.W1 @ m.W2).backward(G)
        opt.step()
        assert tr.current["opt_state"] == 2 * U


def test_views_inplace_and_frees_are_counted_once():
    U = 1000 * 4
    tr = TensorMemoryTracker()
    with tr:
        a = torch.zeros(1000)
        v = a.view(10, 100)[2:5]
        a.add_(1)
        v.mul_(2)
        b = a.clone()
        assert tr.total == 2 * U
        del a, v
        assert tr.total == 2 * U - U  # a's storage died with its last view
        assert tr.peak_total == 2 * U
        big = torch.empty(10 * 1000)
        del big
        assert tr.total == U and tr.peak_total == 11 * U
        tr.reset_peak()
        assert tr.peak_total == U
        b.resize_(2000)  # resized in place: the storage grows
        assert tr.total == 2 * U
    del b
    assert tr.total == 0


def test_pre_existing_tensor_counted_when_first_used():
    """A tensor that existed before and was not named is counted from its first use (as other)."""
    cache = torch.ones(256)
    tr = TensorMemoryTracker()
    with tr:
        assert tr.total == 0
        out = cache * 2
        assert tr.current["other"] == 1024 and tr.current["activations"] == 1024
    del out


def test_tracker_matches_memtracker_on_a_step():
    """The same peak as PyTorch's own MemTracker on a real bp step (it works on the CPU)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception as e:  # torch built without distributed
        pytest.skip(f"MemTracker unavailable: {e}")
    results = []
    for which in ("ours", "memtracker"):
        s = build_step("bp", **TINY)
        s.warm_up()
        if which == "ours":
            tr = TensorMemoryTracker([s.net], s.executor.optimizers, [s.x, s.y])
            with tr:
                s.run()
            results.append(tr.peak_total)
        else:
            mt = MemTracker()
            mt.track_external(s.net, *s.executor.optimizers, s.x, s.y)
            with mt:
                s.run()
            results.append(mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
    ours, theirs = results
    # MemTracker does not see the StepStats accumulators created before it (a few bytes)
    assert abs(ours - theirs) <= 1024, (ours, theirs)


# ----------------------------------------------------------------------------------------------
# profile_steps
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_report():
    return profile_steps(**TINY, steps=2, kinds=KINDS)


def test_profile_steps_reports_every_kind_consistently(tiny_report):
    res = tiny_report["results"]
    assert list(res) == list(KINDS)
    assert res["bp"]["ratio_to_bp"] == 1.0
    for kind, r in res.items():
        assert r["source"] == "tensor_tracker" and r["breakdown_exact"]
        assert sum(r["breakdown"].values()) == r["peak_bytes"], kind
        assert sum(r["detail"].values()) == r["peak_bytes"], kind
        for k, cats in BREAKDOWN.items():
            assert r["breakdown"][k] == sum(r["detail"][c] for c in cats)
        assert r["ratio_to_bp"] == pytest.approx(r["peak_bytes"] / res["bp"]["peak_bytes"])
        assert r["peak_bytes"] == max(r["step_peaks_bytes"]) and len(r["step_peaks_bytes"]) == 2
        # steady state: both measured steps peak at the same place (within the tiny stats tensors)
        assert abs(r["step_peaks_bytes"][0] - r["step_peaks_bytes"][1]) <= 1024, kind
        assert r["breakdown"]["opt_state"] > 0, "the warm-up step must have created the momentum buffers"
        assert r["persistent_bytes"] <= r["peak_bytes"]
        assert r["peak_in_backward"] is not None and r["step_seconds"] > 0
    # checkpointing keeps fewer activations
    assert res["bp_ckpt"]["breakdown"]["activations"] < res["bp"]["breakdown"]["activations"]
    assert res["global_ckpt"]["breakdown"]["activations"] < res["global"]["breakdown"]["activations"]
    c = tiny_report["config"]
    assert (c["arch"], c["J"], c["batch"], c["dtype"], c["device"]) == ("resnet8", 4, 8, "fp32", "cpu")
    assert tiny_report["versions"]["torch"] == torch.__version__


def test_breakdown_identifies_params_and_optimizer_state(tiny_report):
    """Parameters, buffers and momentum buffers are counted by identity: their exact sizes."""
    for kind, r in tiny_report["results"].items():
        s = build_step(kind, **TINY)
        params = sum(p.numel() * p.element_size() for p in s.net.parameters())
        buffers = sum(b.numel() * b.element_size() for b in s.net.buffers())
        assert r["detail"]["params"] == params, kind
        assert r["detail"]["buffers"] == buffers, kind
        assert r["detail"]["opt_state"] == params, kind  # one momentum buffer per parameter
        assert r["detail"]["inputs"] == s.x.nbytes + s.y.nbytes
        # alive before the step: parameters, buffers, momentum buffers, the batch (no gradients)
        assert r["persistent_bytes"] == 2 * params + buffers + s.x.nbytes + s.y.nbytes, kind


def test_profile_steps_bad_arguments():
    with pytest.raises(match="--kinds"):
        profile_steps(**TINY, kinds=("bp", "nope"))
    with pytest.raises(match="--dtype"):
        profile_steps(**TINY, dtype="fp64", kinds=("bp",))
    with pytest.raises(match="-J"):
        profile_steps(arch="resnet32", J=5, kinds=("bp",))
    if not torch.cuda.is_available():
        with pytest.raises(match="no CUDA GPU"):
            profile_steps(**TINY, device="cuda", kinds=("bp",))
        with pytest.raises(match="fp16"):
            profile_steps(**TINY, dtype="fp16", kinds=("bp",))


def test_warmup_at_a_small_batch_gives_the_same_peak():
    a = profile_steps(**TINY, steps=1, kinds=("local",))
    b = profile_steps(**TINY, steps=1, kinds=("local",), warmup_batch=2)
    assert a["results"]["local"]["peak_bytes"] == b["results"]["local"]["peak_bytes"]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def test_cli_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pgl_fast.memory.profile", "--arch", "resnet8", "-J", "4", "--split", "layerwise",
           "-b", "4", "--image-size", "16", "--steps", "1", "--kinds", "bp", "local", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ratio to bp" in proc.stdout and "local" in proc.stdout
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"bp", "local"}
    assert rep["config"]["batch"] == 4 and rep["device"] == "cpu"
    assert {"torch", "pgl_fast", "python"} <= set(rep["versions"])


def test_cli_profiles_the_objectives_step_with_its_flags(tmp_path):
    """``--pgl-local hpff --hpff-base dgl``: HPFF's step over DGL's loss (second heads, no patch
    decoders, no image); ``--pgl-local infopro`` with the lambdas resnet8 J=4 has no default for."""
    out = tmp_path / "p.json"
    base = ["--arch", "resnet8", "-J", "4", "--split", "layerwise", "-b", "4", "--image-size", "16", "--steps", "1",
            "--kinds", "local", "--head-kernels", "eager"]
    assert main(base + ["--pgl-local", "hpff", "--hpff-base", "dgl", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["config"]["pgl_local"] == "hpff" and rep["config"]["local_options"] == {"hpff_base": "dgl"}
    hpff_params = rep["results"]["local"]["breakdown"]["params"]
    assert main(base + ["--pgl-local", "infopro", "--ixx-1", "1", "--ixy-1", "1", "--ixx-2", "0", "--ixy-2", "1",
                        "--json", str(out)]) == 0
    infopro = json.loads(out.read_text())
    assert infopro["config"]["local_options"] == {"ixx_1": 1.0, "ixy_1": 1.0, "ixx_2": 0.0, "ixy_2": 1.0}
    assert main(base + ["--json", str(out)]) == 0
    dgl_params = json.loads(out.read_text())["results"]["local"]["breakdown"]["params"]
    # HPFF's second heads and InfoPro's decoders are parameters the plain heads' step does not have
    assert hpff_params > dgl_params and infopro["results"]["local"]["breakdown"]["params"] > dgl_params


@pytest.mark.parametrize("argv, needle", [
    (["--dtype", "fp64"], "--dtype"),
    (["--kinds", "bp", "fast"], "--kinds"),
    (["-b", "many"], "-b/--batch-size"),
    (["--arch", "resnet32", "-J", "5", "--kinds", "bp"], "-J 5"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_flags_one_line_exit_2(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------
# the targets at the real size
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_report():
    # steps=1 after a small-batch warm-up (it only has to create the momentum buffers): ~15 s
    return profile_steps(arch="resnet32", J=16, aux="1c2f", batch=256, dtype="fp32", device="cpu", steps=1,
                         kinds=("bp", "local", "global_ckpt"), warmup_batch=4, lean_blocks=True)


@pytest.mark.slow
def test_target_local_step_at_most_15_percent_of_bp(target_report):
    r = target_report["results"]
    assert r["local"]["peak_bytes"] <= 0.15 * r["bp"]["peak_bytes"], \
        f"local {r['local']['peak_bytes'] / MiB:.1f} MiB = {r['local']['ratio_to_bp']:.3f} of bp"


@pytest.mark.slow
def test_target_checkpointed_global_step_at_most_40_percent_of_bp(target_report):
    r = target_report["results"]
    assert r["global_ckpt"]["peak_bytes"] <= 0.40 * r["bp"]["peak_bytes"], \
        f"global_ckpt {r['global_ckpt']['peak_bytes'] / MiB:.1f} MiB = {r['global_ckpt']['ratio_to_bp']:.3f} of bp"
