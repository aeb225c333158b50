"""--pipeline S on the CPU (gloo): S spawned ranks against the single-process executor.

Every rank builds the same tiny network from the same seed and trains only its own modules; the
single-process reference is the engine's own local and global steps on the same batches. Local
steps must match bitwise (one thread per process, deterministic CPU kernels); a global step with one
micro-batch within fp32 tolerance; with two micro-batches against a hand-written micro-batched
reference. The failure tests kill (or interrupt) one rank mid-epoch and require every other rank to
exit with a message naming it, well within the deadline."""
from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pgl_fast.distributed.pipeline import (PipelineError, StageRunner, balance_by_time, build_stage, parse_balance,
                                           run_epoch, run_local_group)
from pgl_fast.errors import UserError

ARCH, J, IMG = "resnet14", 4, 16  # 7 units, even split 1,2,2,2
SIZES = [8, 8, 6]  # the last batch partial, as an epoch's last batch is


def make_learner(seed: int, method: str = "pgl"):
    """The network and learner a run builds (one place to follow the API)."""
    from pgl_fast.core.learner import LocalLearner
    from pgl_fast.core.methods import DGL, PGL, InfoPro
    from pgl_fast.models.presets import cifar_resnet
    from pgl_fast.runtime.optim import sgd

    torch.manual_seed(seed)
    infopro = method == "infopro"
    net = cifar_resnet(ARCH, J, image_size=IMG, split="even", aux="1c2f", decoders=infopro)
    m = {"pgl": lambda: PGL(1, 1), "dgl": DGL,
         "infopro": lambda: InfoPro(lambdas=[(1.0, 0.5), (0.5, 0.8), (0.2, 1.0)])}[method]()
    learner = LocalLearner(net, m, optimizer=sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4))
    return net, learner


def batches(sizes=SIZES, seed=7, image=False):
    """(x, y, image01 or None) per batch; image01 is InfoPro's reconstruction target."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, 10, (n,), generator=g),
             torch.rand(n, 3, IMG, IMG, generator=g) if image else None) for n in sizes]


def snapshot(net, modules=None):
    """Parameters and buffers, by name (of the given modules' parts only)."""
    sd = net.state_dict()
    if modules is None:
        return {k: v.clone() for k, v in sd.items()}
    keep = tuple(f"{p}.{j}." for j in modules for p in ("blocks", "heads", "decoders"))
    return {k: v.clone() for k, v in sd.items()
            if k.startswith(keep) or (J - 1 in modules and k.startswith("classifier."))}


# ---------------------------------------------------------------------------------------------
# the ranks
# ---------------------------------------------------------------------------------------------
def _train_worker(rank, world, plan, ckpt_dir, method="pgl"):
    """Runs ``plan``: a list of (phase, micro_batches); returns the owned state after each phase,
    the gathered stats, the test evaluation and the in-flight peak."""
    net, exe = make_learner(0, method)
    runner = build_stage(exe, world, input_shape=(3, IMG, IMG), timeout_s=30)
    data = batches(image=method == "infopro")
    fn = (lambda t: data[t]) if runner.first else None
    out = {"modules": runner.modules, "phases": []}
    for i, (phase, micro) in enumerate(plan):
        runner.micro_batches = micro
        exe.start_epoch(i)  # fresh accumulators, as the trainer's every epoch
        if i == 0 and world == 2:
            # stop after two steps, save, restore into a network built from another seed, go on
            runner.train_epoch(phase, SIZES, fn, steps=[0, 1])
            partial = runner.reduce_stats()  # a mid-epoch look (the finiteness check before a save)
            runner.save(ckpt_dir, tag="e0s2")
            stale = runner.save(ckpt_dir, tag="older")
            runner.prune(ckpt_dir, ["e0s2"])  # stage files follow the run's checkpoint pruning
            assert not os.path.exists(stale) and os.path.exists(runner.checkpoint_path(ckpt_dir, "e0s2"))
            net, exe = make_learner(123, method)
            runner = build_stage(exe, world, input_shape=(3, IMG, IMG), timeout_s=30)
            runner.load(ckpt_dir, tag="e0s2")  # modules, optimizers and this stage's accumulators
            runner.train_epoch(phase, SIZES, fn, steps=[2])
            out["partial_samples"] = partial["samples"]
        else:
            runner.train_epoch(phase, SIZES, fn)
        stats = runner.reduce_stats()
        assert runner.reduce_stats() == stats  # reading twice changes nothing
        out["phases"].append({"state": snapshot(net, runner.modules), "stats": stats})
    test = batches([8, 5], seed=11)
    out["eval"] = runner.evaluate([8, 5], (lambda t: test[t]) if runner.first else None)
    return out


def _reference(plan, method="pgl"):
    net, learner = make_learner(0, method)
    data = batches(image=method == "infopro")
    phases = []
    for phase, micro in plan:
        learner.stats.reset()
        for x, y, image01 in data:
            if phase == "local":
                learner.local_step(x, y, image01)
            elif micro == 1:
                learner.global_step(x, y)
            else:
                _micro_batched_global_step(net, learner, x, y, micro)
        phases.append({"state": snapshot(net), "stats": learner.stats.read()})
    test = [b[:2] for b in batches([8, 5], seed=11)]
    return phases, learner.evaluate(test)


def _micro_batched_global_step(net, exe, x, y, M):
    """A PGL global step on M micro-batches, written out in one process: heads on detached
    features, the final loss through the backbone, each scaled by its share of the batch."""
    n = x.shape[0]
    for xm, ym in zip(x.tensor_split(M), y.tensor_split(M)):  # the pipeline's cut
        w = xm.shape[0] / n
        h = xm
        for j in range(J):
            h = net.blocks[j](h)
            if j < J - 1:
                (F.cross_entropy(net.heads[j](h.detach()), ym) * w).backward()
        (F.cross_entropy(net.classifier(h), ym) * w).backward()
    for opt in exe.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _ok(results):
    for r, res in enumerate(results):
        assert res is not None and res[0] == "ok", f"rank {r}: {res}"
    return [res[1] for res in results]


@pytest.mark.parametrize("S", [2, 4])
def test_pipeline_matches_single_process(S, tmp_path, one_thread):
    # local epoch (dgl / PGL's local phase), a global step on one micro-batch, then on two
    plan = [("local", 1), ("global", 1)] + ([("global", 2)] if S == 2 else [])
    outs = _ok(run_local_group(_train_worker, S, plan, str(tmp_path), timeout_s=60))
    ref_phases, ref_eval = _reference(plan)
    if S == 2:  # the mid-epoch look after two batches of 8
        assert all(o["partial_samples"] == 16 for o in outs)
    assert [o["modules"] for o in outs] == ([[0, 1], [2, 3]] if S == 2 else [[0], [1], [2], [3]])
    for i, (phase, micro) in enumerate(plan):
        ref = ref_phases[i]["state"]
        merged = {}
        for o in outs:
            merged.update(o["phases"][i]["state"])
        assert merged.keys() == ref.keys()
        for k, v in ref.items():
            if phase == "local":
                # sequential DGL and the pipeline compute the very same tensors
                assert torch.equal(merged[k], v), f"phase {i} ({phase}): {k} differs"
            else:
                torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=f"phase {i}: {k}")
        for o in outs:  # the gathered stats are the whole network's, on every rank
            st, rs = o["phases"][i]["stats"], ref_phases[i]["stats"]
            assert st["samples"] == sum(SIZES)
            if micro == 1:
                torch.testing.assert_close(torch.tensor(st["losses"]), torch.tensor(rs["losses"]),
                                           rtol=1e-5, atol=1e-6)
                assert st["train_acc"] == rs["train_acc"]
            assert st["first_bad"] == [-1] * J
    for o in outs:
        ev = o["eval"]
        assert abs(ev["test_loss"] - ref_eval["test_loss"]) < 1e-4
        assert ev["test_acc"] == ref_eval["test_acc"]
        assert ev["head_acc"] == pytest.approx(ref_eval["head_acc"])
    # activations in flight are bounded by the queue depth (2 batches of 8 here), and reported
    inflight = outs[0]["phases"][0]["stats"]["peak_inflight_bytes"]
    assert len(inflight) == S and all(b > 0 for b in inflight)
    if S == 4:  # stage 1: one module, 16 channels at 16x16 in and out (+ int64 labels), depth 2
        # batch 0 received, its output sent while batches 1 and 2 (of 6) are posted
        assert inflight[1] == (8 + 8 + 6) * (16 * 16 * 16 * 4 + 8)
        assert inflight[0] == 2 * 8 * (16 * 16 * 16 * 4 + 8)


def test_pipeline_infopro_local_epoch(tmp_path, one_thread):
    """InfoPro's reconstruction target travels with the batch: its decoders train on every stage."""
    outs = _ok(run_local_group(_train_worker, 2, [("local", 1)], str(tmp_path), "infopro", timeout_s=60))
    ref, _ = _reference([("local", 1)], "infopro")
    merged = {k: v for o in outs for k, v in o["phases"][0]["state"].items()}
    assert any(k.startswith("decoders.") for k in merged) and merged.keys() == ref[0]["state"].keys()
    for k, v in ref[0]["state"].items():
        assert torch.equal(merged[k], v), k


# ---------------------------------------------------------------------------------------------
# failures: every surviving rank exits with a message naming the failed one
# ---------------------------------------------------------------------------------------------
def _failing_worker(rank, world, victim, how):
    net, exe = make_learner(0, "dgl")
    runner = build_stage(exe, world, balance="1,1,2", input_shape=(3, IMG, IMG), timeout_s=20)
    data = batches([8] * 40)

    def fetch(t):
        # a local epoch needs nothing back from later stages: without a pause the first stage can
        # send all 40 batches and finish before the victim fails at its fourth
        time.sleep(0.05)
        return data[t]

    if rank == victim:
        # the victim dies at its fourth batch: the others are mid-epoch, sending and receiving
        orig = runner._local_modules
        calls = [0]

        def dying(*a):
            calls[0] += 1
            if calls[0] == 4:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on this rank only
                time.sleep(5)
            return orig(*a)

        runner._local_modules = dying
    runner.local_epoch([8] * 40, fetch if runner.first else None)
    return "finished"


@pytest.mark.parametrize("how,victim", [("kill", 1), ("interrupt", 2)])
def test_one_rank_fails_all_exit(how, victim, one_thread):
    t0 = time.monotonic()
    results = run_local_group(_failing_worker, 3, victim, how, timeout_s=20, join_timeout_s=40)
    assert time.monotonic() - t0 < 40
    assert all(r != ("hung",) for r in results), results
    if how == "kill":
        assert results[victim] is None  # killed: no report
    for r, res in enumerate(results):
        if r == victim and how == "kill":
            continue
        assert res is not None and res[0] == "error", (r, res)
        msg = res[1]
        assert msg.startswith("PipelineError: pipeline stage"), msg
        assert "\n" not in msg
        if how == "interrupt":
            assert f"stage {victim} (rank {victim}) was interrupted (Ctrl-C)" in msg, msg


def test_a_wait_that_completes_at_once_still_sees_a_peers_failure():
    """A send to a dead peer can complete at once (its bytes fit the socket buffer): the wait must
    still read the failure flag, or a rank upstream of the failure runs its epoch into the void."""
    done = threading.Event()
    done.set()
    pending = SimpleNamespace(done=done, error=None)
    stage = SimpleNamespace(_pollable=False, timeout_s=5.0, stage=0, rank=0,
                            _waiter=SimpleNamespace(submit=lambda works: pending),
                            _failed_elsewhere=lambda: "pipeline stage 2 (rank 2) was interrupted (Ctrl-C)")
    stage._gave_up = lambda outcome, what: StageRunner._gave_up(stage, outcome, what)
    with pytest.raises(PipelineError) as e:
        StageRunner._wait(stage, [object()], "sending batch to stage 1")
    assert str(e.value) == ("pipeline stage 0 (rank 0) stopped while waiting for sending batch to stage 1: "
                            "pipeline stage 2 (rank 2) was interrupted (Ctrl-C)")


def _late_failing_worker(rank, world):
    """An epoch as the trainer runs it, the last stage failing at its last batch: stage 0 (no
    pause) has long sent everything by then, and its local epoch returns."""
    net, exe = make_learner(0, "dgl")
    runner = build_stage(exe, world, balance="1,1,2", input_shape=(3, IMG, IMG), timeout_s=20)
    sizes = [8] * 12
    data = batches(sizes)
    if rank == world - 1:
        orig, calls = runner._local_modules, [0]

        def failing(*a):
            calls[0] += 1
            if calls[0] == len(sizes):
                raise RuntimeError("no memory left for the last batch")
            return orig(*a)

        runner._local_modules = failing
    run_epoch(runner, phase="local", lr=0.05, sizes=sizes, batch_fn=data.__getitem__)
    return "finished"


def test_a_late_failure_reaches_the_stages_that_finished():
    """No stage reports an epoch done that a later stage failed: the failure reaches the finished
    stages in the epoch's closing collective, with the failed rank's own message."""
    results = run_local_group(_late_failing_worker, 3, timeout_s=20, join_timeout_s=40)
    want = "pipeline stage 2 (rank 2) failed: RuntimeError: no memory left for the last batch"
    for r, res in enumerate(results):
        assert res is not None and res[0] == "error", (r, res)
        assert res[1].startswith("PipelineError: pipeline stage") and want in res[1], (r, res[1])


def _late_store_reader(rank, world):
    store = torch.distributed.distributed_c10d._get_default_store()
    if rank == 0:
        return "left"
    # a pipeline rank still at work polls the failure flag in the store that rank 0 hosts
    time.sleep(1.0)
    store.set("late", b"read")
    return store.get("late").decode()


def test_the_store_host_waits_for_every_rank():
    """A first stage whose sends all fit the socket buffers finishes before the last stage has
    received its batches: the launcher must keep rank 0 (the store's host) up until every rank is
    done, or the ranks still at work fail with "store unreachable"."""
    assert run_local_group(_late_store_reader, 2, timeout_s=20) == [("ok", "left"), ("ok", "read")]


# ---------------------------------------------------------------------------------------------
# balance
# ---------------------------------------------------------------------------------------------
def test_balance_by_time_hand_cases():
    assert balance_by_time([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance_by_time([4, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]  # period 4 either way: the data stage lighter
    assert balance_by_time([1, 2, 3, 4, 5, 6], 3) == [(0, 3), (3, 5), (5, 6)]  # 6, 9, 6 -> period 9
    assert balance_by_time([5, 1, 1, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(UserError):
        balance_by_time([1, 1], 3)


def test_parse_balance():
    assert parse_balance("1,3", 4, 2) == [(0, 1), (1, 4)]
    for bad in ("1,2", "4,0", "a,b", "1,1,2"):
        with pytest.raises(UserError):
            parse_balance(bad, 4, 2)


# ---------------------------------------------------------------------------------------------
# the real launcher
# ---------------------------------------------------------------------------------------------
def test_torchrun_two_stages(tmp_path):
    """``torchrun --nproc_per_node=2``: the process group from torchrun's environment, a local and
    a global epoch, the same parameters as one process."""
    import subprocess
    import sys

    from pgl_fast.distributed.pipeline import _free_port

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_torchrun_main.py")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # the checkout under test, whatever an installed copy points at
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "--max-restarts=0", script, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, results = {}, []
    for r in range(2):
        saved = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        merged.update(saved["state"])
        results.append(saved["res"])
    ref_phases, ref_eval = _reference([("local", 1), ("global", 1)])
    ref = ref_phases[-1]["state"]
    assert merged.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for res in results:  # run_epoch: the same metrics on both ranks, those of one process
        assert res["train"]["train_acc"] == ref_phases[-1]["stats"]["train_acc"]
        torch.testing.assert_close(torch.tensor(res["train"]["losses"]), torch.tensor(ref_phases[-1]["stats"]["losses"]))
        assert res["eval"]["test_acc"] == ref_eval["test_acc"]
