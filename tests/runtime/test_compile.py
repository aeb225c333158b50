"""``--compile``: the compiled learner trains to the eager learner's numbers, compiles a bounded
number of graphs (nothing new on PGL phase switches), updates BN running statistics once under
checkpointing, and keeps checkpoints interchangeable with eager runs.

References are independent of the code under test: the eager ``LocalLearner`` (whose semantics
``test_methods.py`` checks against the paper's equations) and a plain ``torch.no_grad`` forward.
Every test uses the same tiny shapes (resnet8, J=2, 32x32 inputs, batch 16 plus a partial batch
of 8), so the compiled graphs of one test are reused by the next: Dynamo caches them per code
object, and networks of the same structure pass the same guards.
"""
import copy
import json
import os

import pytest
import torch

from pgl_fast.runtime.compile import COMPILE_MODES, compile_count
from pgl_fast.config import TrainConfig
from pgl_fast.errors import UserError
from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import DGL, PGL, InfoPro
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.runtime.optim import sgd
from pgl_fast.train import main

# PGL: a local phase with a last partial batch, a global phase, local again (nothing new to compile)
SCHEDULE = [("local", 16), ("local", 8), ("global", 16), ("local", 16), ("local", 8)]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def _pair(dtype=torch.float64, amp_dtype=None, channels_last=False, checkpoint_global=False, method="pgl",
          lr=0.1, momentum=0.9, weight_decay=5e-4, segments=None):
    """(compiled learner, eager learner) on two identical networks."""
    torch.manual_seed(0)
    net = cifar_resnet("resnet8", 2, num_classes=10, image_size=32, aux="1c2f").to(dtype)
    ref = copy.deepcopy(net)

    def learner(model, compile):
        # a fresh method object per learner: nothing is shared between the two but the starting weights
        m = {"pgl": lambda: PGL(1, 1), "dgl": DGL}[method]()
        return LocalLearner(model, m, optimizer=sgd(lr=lr, momentum=momentum, nesterov=momentum > 0,
                                                     weight_decay=weight_decay),
                            amp=amp_dtype, compile=compile, channels_last=channels_last,
                            checkpoint_global=segments if segments is not None else checkpoint_global)

    return learner(net, "default"), learner(ref, None)


def _batch(n, seed, dtype=torch.float64, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g)


def _step(learner, phase, x, y):
    (learner.local_step if phase == "local" else learner.global_step)(x, y)


def _train_both(lc, le, schedule, dtype=torch.float64, channels_last=False):
    """Run the schedule on both learners: (compiled stats, eager stats, graphs compiled per step)."""
    added = []
    for i, (phase, n) in enumerate(schedule):
        x, y = _batch(n, i, dtype, channels_last)
        before = compile_count()
        _step(lc, phase, x, y)
        added.append(compile_count() - before)
        _step(le, phase, x, y)
    return lc.stats.read(), le.stats.read(), added


def _assert_nets_close(a, b, rtol, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)
        else:
            assert torch.equal(sa[k], sb[k]), k  # num_batches_tracked


# float64: Inductor's kernels and the eager ones then agree to rounding, so any difference in what is
# computed (a missing detach, a loss on the wrong features, BN statistics updated twice) shows up.
@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_global", [False, True], ids=["plain", "checkpointed"])
def test_compiled_pgl_equals_eager(checkpoint_global):
    lc, le = _pair(checkpoint_global=checkpoint_global)
    rc, re_, added = _train_both(lc, le, SCHEDULE)
    _assert_nets_close(lc.model, le.model, rtol=1e-9, atol=1e-11)
    for a, b in zip(lc.optimizers, le.optimizers):
        for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
            torch.testing.assert_close(a.state[pa]["momentum_buffer"], b.state[pb]["momentum_buffer"],
                                       rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.tensor(rc["losses"]), torch.tensor(re_["losses"]), rtol=1e-10, atol=0.0)
    assert rc["train_acc"] == re_["train_acc"]
    # back in the local phase after the global one, both batch shapes: nothing new is compiled
    assert added[3:] == [0, 0], added


@pytest.mark.slow
def test_compiled_checkpointed_global_step_updates_bn_running_stats_once():
    learner, _ = _pair(checkpoint_global=True, lr=0.0, momentum=0.0, weight_decay=0.0)
    ref = copy.deepcopy(learner.model)
    x, y = _batch(16, 0)
    learner.global_step(x, y)
    with torch.no_grad():
        h = x
        for blk in ref.blocks:
            h = blk(h)
    got = dict(learner.model.named_buffers())
    for n, b in ref.named_buffers():
        if n.startswith("blocks."):
            if b.is_floating_point():
                torch.testing.assert_close(got[n], b, rtol=1e-10, atol=1e-12, msg=n)
            else:
                assert torch.equal(got[n], b), n  # exactly one update, not two


@pytest.mark.slow
def test_compiled_channels_last_equals_eager():
    lc, le = _pair(channels_last=True)
    # the learner puts both networks in channels-last itself
    for learner in (lc, le):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in learner.model.parameters() if p.dim() == 4)
    _train_both(lc, le, [("local", 16)] * 2, channels_last=True)
    _assert_nets_close(lc.model, le.model, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_compiled_infopro_equals_eager():
    """InfoPro's loss (decoder reconstruction + SupCon, per-module lambdas) traced as the learner
    defines it."""
    torch.manual_seed(0)
    net = cifar_resnet("resnet8", 2, num_classes=10, image_size=32, aux="1c2f", decoders=True,
                       head_out_dim=128).double()
    ref = copy.deepcopy(net)

    def learner(model, compile):
        return LocalLearner(model, InfoPro(contrast=True, lambdas=((5.0, 0.5),)), amp=None, compile=compile,
                            optimizer=sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))

    lc, le = learner(net, "default"), learner(ref, None)
    for i in range(2):
        x, y = _batch(16, i)
        image01 = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        lc.local_step(x, y, image01)
        le.local_step(x, y, image01)
    _assert_nets_close(lc.model, le.model, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.tensor(lc.stats.read()["losses"]), torch.tensor(le.stats.read()["losses"]),
                               rtol=1e-10, atol=0.0)


@pytest.mark.slow
def test_compiled_dgl_equals_eager_bf16_autocast():
    lc, le = _pair(dtype=torch.float32, amp_dtype=torch.bfloat16, method="dgl", lr=0.05)
    rc, re_, _ = _train_both(lc, le, [("local", 16)] * 3, dtype=torch.float32)
    # bf16 products round differently in fused kernels: a bf16 tolerance after three SGD steps
    torch.testing.assert_close(torch.tensor(rc["losses"]), torch.tensor(re_["losses"]), rtol=2e-2, atol=0.0)
    _assert_nets_close(lc.model, le.model, rtol=2e-2, atol=2e-2)


# -- the CLI: flags, header, checkpoints interchangeable with eager runs ---------------------------
ARGS = ["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16", "--arch", "resnet8",
        "-J", "2", "-b", "16", "--lr", "0.05", "--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "3",
        "--progress", "off", "--no-head-eval"]


def _final_model(out):
    d = os.path.join(out, "checkpoints")
    return torch.load(os.path.join(d, sorted(os.listdir(d))[-1]), map_location="cpu", weights_only=True)["model"]


def _assert_models_close(a, b):
    # fp32: Inductor's fp32 reductions (BN statistics and gradients) round differently from eager's;
    # exactness is what the float64 tests above check
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=5e-3, msg=k)


@pytest.mark.slow
def test_cli_compiled_and_eager_runs_resume_each_other(tmp_path):
    runs = {}
    for name, extra in (("compiled", ["--compile"]), ("eager", [])):
        out = str(tmp_path / name)
        assert main(ARGS + extra + ["-o", out]) == 0
        runs[name] = out
    with open(os.path.join(runs["compiled"], "header.json")) as f:
        assert json.load(f)["compile"] == "default"
    with open(os.path.join(runs["eager"], "header.json")) as f:
        assert json.load(f)["compile"] is None
    compiled, eager = _final_model(runs["compiled"]), _final_model(runs["eager"])
    assert "_orig_mod" not in "".join(compiled)
    _assert_models_close(compiled, eager)
    # epoch 3 (local, after the global epoch 2) resumed from the other kind of run's checkpoint
    for name, src, extra in (("eager_from_compiled", "compiled", []), ("compiled_from_eager", "eager", ["--compile"])):
        out = str(tmp_path / name)
        second = os.path.join(runs[src], "checkpoints", "ckpt-e0002-s000000.pt")
        assert main(ARGS + extra + ["-o", out, "--resume", second]) == 0
        _assert_models_close(_final_model(out), eager)


@pytest.mark.parametrize("extra, flag", [
    (["--compile-mode", "max-autotune"], "--compile-mode"),
    (["--compile", "--cuda-graphs", "--compile-mode", "reduce-overhead"], "--compile-mode"),
    (["--compile", "--cuda-graphs", "--compile-mode", "max-autotune"], "--compile-mode"),
    (["--compile", "--lean-blocks"], "--compile"),
    (["--compile", "--head-kernels", "triton"], "--head-kernels"),
], ids=["mode-without-compile", "reduce-overhead-with-graphs", "max-autotune-with-graphs", "lean", "triton-heads"])
def test_bad_compile_flags_are_one_line_errors(extra, flag, capsys):
    assert main(ARGS + extra + ["-o", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag}:") and "\n" not in err, err


def test_compile_flags_accepted_and_modes_listed():
    for mode in COMPILE_MODES:
        cfg = TrainConfig(compile=True, compile_mode=mode)
        assert cfg.compile_mode == mode
    # the two modes that do not capture CUDA graphs themselves compose with --cuda-graphs
    TrainConfig(compile=True, cuda_graphs=True, compile_mode="max-autotune-no-cudagraphs")
    with pytest.raises(UserError, match="--compile-mode"):
        TrainConfig(compile_mode="fast")
