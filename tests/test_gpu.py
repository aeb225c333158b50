"""Checks that need a CUDA GPU (all marked ``cuda``; skipped elsewhere). ``python -m
pgl_fast.gpu_check`` runs them first in a GPU session.

- CUDA-graphed local steps equal eager ones (dgl with 1c2f heads, PGL's local step with AUX-ADAPT
  heads; eager and fused heads; NCHW and channels-last; fp32 and bf16), including a partial batch.
- InfoPro's local step under bf16 autocast (reconstruction BCE and SupCon) runs and is finite.
- A checkpointed global step gives the gradients / parameters and BN statistics of a plain one.
- The memory a graphed step holds is reported: the capture peak is at least the eager step's peak,
  which the allocator's counter alone misses during replays.
- ``--head-kernels auto`` measures on the device and records its choices.
- A 2-epoch PGL run with ``--amp --cuda-graphs`` through the CLI.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from pgl_fast.core.methods import PGL, InfoPro

from helpers import tiny_learner, tiny_resnet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda"


def _net(aux="1c2f", J=4, channels_last=False, fused=False, seed=0, image_size=16, split="layerwise", **kw):
    net = tiny_resnet(J, seed=seed, image_size=image_size, split=split, aux=aux, device=DEV, **kw)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.set_head_kernels(fused)
    return net


def _learner(net, amp=None, channels_last=False, method=None, **kw):
    return tiny_learner(net, PGL(1, 1) if method is None else method, amp=amp, channels_last=channels_last, **kw)


def _batches(n, batch=8, size=16, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g).to(DEV)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch,), generator=g).to(DEV)))
    return out


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager_heads", "fused_heads"])
@pytest.mark.parametrize("aux", ["1c2f", "adapt"], ids=["dgl", "pgl_local"])
def test_graphed_local_steps_match_eager(aux, fused, channels_last, dtype):
    from pgl_fast.runtime.graphs import GraphedLocalSteps

    if fused:
        from pgl_fast.kernels import triton_available

        ok, why = triton_available(torch.device(DEV))
        if not ok:
            pytest.skip(why)
    # the same kernels replay, so fp32 is near-exact; bf16 rounds the same way in both
    tol = 1e-5 if dtype is None else 2e-2
    nets = [_net(aux, channels_last=channels_last, fused=fused) for _ in range(2)]
    learners = [_learner(n, dtype, channels_last, cuda_graphs=graphs) for n, graphs in zip(nets, (True, False))]
    graphed = learners[0].graphed
    assert isinstance(graphed, GraphedLocalSteps) and learners[1].graphed is None
    batches = _batches(5, channels_last=channels_last) + _batches(2, batch=5, channels_last=channels_last, seed=7)
    for x, y in batches:
        for learner in learners:  # the first replays its captured graphs, the second runs eagerly
            learner.local_step(x, y)
    torch.cuda.synchronize()
    assert graphed.captures == 2
    got, ref = learners[0].stats.read(), learners[1].stats.read()
    assert got["samples"] == ref["samples"] == 35
    assert got["losses"] == pytest.approx(ref["losses"], rel=tol, abs=tol)
    for (n, p), (_, q) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=n)
    for (n, b), (_, c) in zip(nets[0].named_buffers(), nets[1].named_buffers()):
        torch.testing.assert_close(b, c, rtol=tol, atol=tol, msg=n)


def test_infopro_local_step_under_amp():
    J = 3
    net = _net(aux="1c2f", J=J, split="even", image_size=32, head_out_dim=128, decoders=True)
    learner = _learner(net, torch.bfloat16, method=InfoPro(contrast=True, lambdas=((0.0, 1.0), (5.0, 1.0))))
    x, y = _batches(1, batch=16, size=32)[0]
    image01 = torch.rand(16, 3, 32, 32, device=DEV)
    before = [p.detach().clone() for p in net.parameters()]
    learner.local_step(x, y, image01)
    torch.cuda.synchronize()
    r = learner.stats.read()
    assert r["first_bad"] == [-1] * J and r["first_bad_grad"] == [-1] * J
    assert all(torch.isfinite(torch.tensor(r["losses"]))) and all(v != 0 for v in r["losses"])
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()) if a.numel() > 1)


def test_checkpointed_global_step_matches_plain():
    nets = [_net(aux="adapt", J=4) for _ in range(2)]
    learners = [_learner(nets[0], checkpoint_global=True), _learner(nets[1], checkpoint_global=False)]
    assert learners[0].segments == list(nets[0].ranges) and learners[1].segments is None
    for x, y in _batches(2, batch=16):
        for learner in learners:
            learner.global_step(x, y)
    torch.cuda.synchronize()
    assert learners[0].stats.read()["losses"] == pytest.approx(learners[1].stats.read()["losses"], rel=1e-5, abs=1e-6)
    for (n, p), (_, q) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), (_, c) in zip(nets[0].named_buffers(), nets[1].named_buffers()):
        # running statistics updated once per forward, not again in the recomputation
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=n)


def test_graph_memory_reports_what_a_replay_holds():
    from pgl_fast.runtime.graphs import GraphedLocalSteps
    from pgl_fast.training.metrics import PeakMemory

    # big enough a batch that activations dominate parameters and optimizer state
    net = _net(aux="1c2f", J=2, split="even", image_size=32)
    learner = _learner(net)
    stats = learner.stats
    x, y = _batches(1, batch=512, size=32)[0]
    learner.local_step(x, y)  # momentum buffers and cuDNN state exist
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    learner.local_step(x, y)
    torch.cuda.synchronize()
    eager_peak = torch.cuda.max_memory_allocated()
    assert eager_peak - base > 8 * 2**20  # activations of a 512-batch step at 32 px

    graphed = GraphedLocalSteps(learner, stats)
    memory = PeakMemory(torch.device(DEV), graphs=graphed)
    memory.reset()
    for _ in range(3):
        graphed(x, y)
    torch.cuda.synchronize()
    capture = graphed.capture_peak_bytes[512]
    # the capture allocates the step's activations as the eager step does (static inputs add a batch)
    assert capture >= 0.9 * eager_peak
    # replays alone never reach it: their activations sit in the pool, outside the counter
    torch.cuda.reset_peak_memory_stats()
    graphed(x, y)
    torch.cuda.synchronize()
    replay_peak = torch.cuda.max_memory_allocated()
    assert replay_peak - base < 0.5 * (capture - base)
    reading = memory.read()
    assert reading["kind"] == "cuda_allocated+graph_capture_peak"
    assert reading["peak_mib"] * 2**20 >= capture
    assert reading["graph_pool_mib"] * 2**20 >= 0.5 * (eager_peak - base)
    memory.reset()  # a window with no replay reports the plain counter
    assert memory.read()["kind"] == "cuda_allocated"


def test_auto_head_kernels_measure_and_record_on_the_device():
    from pgl_fast.runtime.head_select import configure_head_kernels

    net = _net(aux="adapt", J=4, image_size=32)
    rec = configure_head_kernels(net, "auto", True, batch=256, dtype=torch.bfloat16, device=torch.device(DEV),
                                 channels_last=False)
    sel = rec["selection"]
    assert sel and sorted(j for r in sel for j in r["heads"]) == list(range(len(net.heads)))
    for r in sel:
        assert r["check"]["ok"], r  # the real kernels must pass their own tolerances here
        assert r["fused_ms"] > 0 and r["eager_ms"] > 0
        assert [net.heads[j].use_kernels for j in r["heads"]] == [r["choice"] == "triton"] * len(r["heads"])
    json.dumps(rec)


def test_pgl_two_epochs_through_the_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pgl_fast.train", "--dataset", "synthetic", "--synthetic-train", "512",
           "--synthetic-test", "128", "--arch", "resnet8", "-J", "2", "--split", "even", "-b", "128",
           "--method", "pgl", "--aux", "1c2f", "-P", "1", "-Q", "1", "--epochs", "2", "--device", "cuda", "--amp",
           "--cuda-graphs", "--progress", "off", "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["phase"] for x in lines] == ["local", "global"]
    assert all(x["train_loss"] == x["train_loss"] for x in lines)  # not NaN
    # the graphed local epoch reports its capture peak and pool; the eager global epoch the counter
    assert lines[0]["mem_kind"] == "cuda_allocated+graph_capture_peak" and lines[0]["graph_pool_mib"] > 0
    assert lines[1]["mem_kind"] == "cuda_allocated"
    header = json.loads((out / "header.json").read_text())
    assert header["head_kernels_mode"] == "auto" and header["head_kernel_selection"]
    assert sum(ln.startswith("epoch ") and "phase=" not in ln for ln in r.stdout.splitlines()) == 2
