"""Non-finite losses and gradients stop a run with a message naming epoch, step, phase and module,
exit code 3, and never a poisoned checkpoint.

NaN/inf is injected without touching engine code: a forward hook on one backbone module (its
output goes non-finite, so that module's loss is the first bad one), a hook on one parameter's
gradient (finite loss, non-finite gradient), or a poisoned input batch from ``normalize``. Hooks
count training calls only (the test set is evaluated under ``no_grad`` / in eval mode).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pgl_fast.data import batches as data_mod  # where the trainer's batches are normalised
import pgl_fast.train as train_mod
from pgl_fast.config import config_from_args
from pgl_fast.train import NonFiniteError, main, run

from helpers import tiny_cli_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6  # 48 images / batch 8
BASE = tiny_cli_args(train=48, test=16, batch=8)
LOCAL = ["--method", "pgl", "-P", "2", "-Q", "1", "--epochs", "2"]   # epochs 1-2 local
# epoch 1 local, 2 global; unplanned global steps run each unit's forward once per step, so the
# hooks' call counts index the steps (checkpointing would run it again in the backward)
GLOBAL = ["--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "--global-memory", "none"]
VALUES = {"nan": math.nan, "inf": math.inf}


def call_index(epoch, step):
    """0-based index of the training call at 1-based (epoch, step)."""
    return (epoch - 1) * STEPS + (step - 1)


def poison_output(monkeypatch, module, epoch, step, value):
    """Module ``module``'s output becomes ``out + value`` in the training forward of (epoch, step).

    The hook sits on the module's last unit, not on ``net.blocks[module]``: the global step may run
    the units one by one (or in checkpointed segments) instead of calling the module."""
    target, build = call_index(epoch, step), train_mod.build_model
    calls = [0]

    def hook(mod, inp, out):
        if not mod.training:
            return None
        calls[0] += 1
        return out + value if calls[0] - 1 == target else None

    def build_with_hook(*a, **k):
        net = build(*a, **k)
        net.blocks[module][-1].register_forward_hook(hook)
        return net

    monkeypatch.setattr(train_mod, "build_model", build_with_hook)
    return calls


def poison_grad(monkeypatch, module, epoch, step, value):
    """The gradient of net.blocks[module]'s first parameter gets ``+ value`` in the backward of
    (epoch, step); the losses of that step stay finite."""
    target, build = call_index(epoch, step), train_mod.build_model
    calls = [0]

    def hook(g):
        calls[0] += 1
        return g + value if calls[0] - 1 == target else None

    def build_with_hook(*a, **k):
        net = build(*a, **k)
        next(net.blocks[module].parameters()).register_hook(hook)
        return net

    monkeypatch.setattr(train_mod, "build_model", build_with_hook)
    return calls


def poison_input(monkeypatch, epoch, step, value):
    """One pixel of the normalised training batch of (epoch, step) becomes ``value``."""
    target, normalize = call_index(epoch, step), data_mod.normalize
    calls = [0]

    def poisoned(x, *a, **k):
        out = normalize(x, *a, **k)
        if not torch.is_grad_enabled():  # test batches (evaluate runs under no_grad)
            return out
        calls[0] += 1
        if calls[0] - 1 == target:
            out = out.clone()
            out[0, 0, 0, 0] = value
        return out

    monkeypatch.setattr(data_mod, "normalize", poisoned)
    return calls


pytestmark = pytest.mark.usefixtures("one_thread")


def ckpt_names(out):
    d = os.path.join(out, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def read_epochs(out):
    path = os.path.join(out, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


def assert_last_good(out, epoch, step):
    """The newest checkpoint is ckpt-e{epoch}-s{step}, loads, holds only finite numbers, and the
    run's outputs stop at the last completed epoch."""
    names = ckpt_names(out)
    assert names and names[-1] == f"ckpt-e{epoch:04d}-s{step:06d}.pt", names
    assert not any(n.endswith(".tmp") for n in names)
    state = torch.load(os.path.join(out, "checkpoints", names[-1]), map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (epoch, step)
    for k, t in state["model"].items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), f"model.{k} is not finite"
    for opt in state["optimizers"]:
        for s in opt["state"].values():
            assert torch.isfinite(s["momentum_buffer"]).all()
    assert [r["epoch"] for r in state["records"]] == list(range(1, epoch + 1))
    if step:
        stats = state["mid_epoch"]["stats"]
        assert (stats["first_bad"] < 0).all() and (stats["first_bad_grad"] < 0).all()
    assert read_epochs(out) == list(range(1, epoch + 1))
    assert not os.path.exists(os.path.join(out, "summary.json"))


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def cfg_for(out, *extra):
    return config_from_args(BASE + list(extra) + ["-o", str(out)])


# -- losses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", list(VALUES))
def test_local_phase_loss_exit_code_3_and_resume(tmp_path, monkeypatch, capsys, value):
    out = tmp_path / "run"
    calls = poison_output(monkeypatch, 2, epoch=2, step=4, value=VALUES[value])
    assert main(BASE + LOCAL + ["-o", str(out)]) == 3
    assert calls[0] == 2 * STEPS  # epoch 2 ran to its end, then stopped
    assert one_error_line(capsys) == ("error: non-finite loss at epoch 2, step 4, phase local, module 2 (local loss); "
                                      "the last checkpoint is intact")
    assert_last_good(out, 1, 0)
    # the last good checkpoint really is usable: resuming (no injection now) finishes the run
    monkeypatch.undo()
    assert main(BASE + LOCAL + ["-o", str(out), "--resume", "auto"]) == 0
    assert read_epochs(out) == [1, 2]
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("value,module,kind", [("nan", 1, "local loss"), ("inf", 3, "final loss")])
def test_global_phase_loss(tmp_path, monkeypatch, value, module, kind):
    out = tmp_path / "run"
    poison_output(monkeypatch, module, epoch=2, step=3, value=VALUES[value])
    with pytest.raises(NonFiniteError) as e:
        run(cfg_for(out, *GLOBAL))
    assert str(e.value) == f"non-finite loss at epoch 2, step 3, phase global, module {module} ({kind})"
    assert_last_good(out, 1, 0)


@pytest.mark.parametrize("value", list(VALUES))
def test_save_every_writes_no_checkpoint_after_the_bad_step(tmp_path, monkeypatch, capsys, value):
    out = tmp_path / "run"
    calls = poison_output(monkeypatch, 2, epoch=2, step=3, value=VALUES[value])
    assert main(BASE + LOCAL + ["--save-every", "2", "-o", str(out)]) == 3
    assert calls[0] == STEPS + 4  # stopped at the next would-be checkpoint, not at the epoch end
    line = one_error_line(capsys)
    assert line.startswith("error: non-finite loss at epoch 2, step 3, phase local, module 2 (local loss)")
    assert "mid-epoch checkpoint" in line
    assert_last_good(out, 1, 2)  # step 2's checkpoint, written before the bad step 3; none for step 4
    assert ckpt_names(out) == ["ckpt-e0001-s000000.pt", "ckpt-e0001-s000002.pt"]


def test_save_every_global_phase(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_output(monkeypatch, 1, epoch=2, step=1, value=math.nan)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at epoch 2, step 1, phase global, module 1 "
                                             r"\(local loss\) \(found before a mid-epoch checkpoint\)$"):
        run(cfg_for(out, *GLOBAL, "--save-every", "2"))
    assert_last_good(out, 1, 0)


@pytest.mark.parametrize("value", list(VALUES))
def test_poisoned_input_names_module_0(tmp_path, monkeypatch, value):
    out = tmp_path / "run"
    poison_input(monkeypatch, epoch=1, step=2, value=VALUES[value])
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at epoch 1, step 2, phase local, module 0 "
                                             r"\(local loss\) \(found before a mid-epoch checkpoint\)$"):
        run(cfg_for(out, *LOCAL, "--save-every", "1"))
    assert_last_good(out, 0, 1)


# -- gradients (every loss finite) --------------------------------------------------------------
@pytest.mark.parametrize("value,phase,args,epoch", [("nan", "local", LOCAL, 1), ("inf", "global", GLOBAL, 2)],
                         ids=["local-nan", "global-inf"])
def test_nonfinite_gradient_with_finite_loss(tmp_path, monkeypatch, value, phase, args, epoch):
    out = tmp_path / "run"
    # the last step of the epoch: no later step can turn the bad weights into a bad loss first
    poison_grad(monkeypatch, 1, epoch=epoch, step=STEPS, value=VALUES[value])
    with pytest.raises(NonFiniteError) as e:
        run(cfg_for(out, *args))
    assert str(e.value) == f"non-finite gradient at epoch {epoch}, step {STEPS}, phase {phase}, module 1 (local loss)"
    if epoch == 1:
        assert ckpt_names(out) == []
    else:
        assert_last_good(out, epoch - 1, 0)


def test_nonfinite_gradient_before_a_mid_epoch_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_grad(monkeypatch, 2, epoch=1, step=2, value=math.inf)
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient at epoch 1, step 2, phase local, module 2 "
                                             r"\(local loss\) \(found before a mid-epoch checkpoint\)$"):
        run(cfg_for(out, *LOCAL, "--save-every", "2"))
    assert ckpt_names(out) == []  # the step-2 checkpoint would have held poisoned weights


def test_gradient_reported_when_it_comes_before_a_bad_loss(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_grad(monkeypatch, 1, epoch=1, step=3, value=math.nan)
    with pytest.raises(NonFiniteError) as e:
        run(cfg_for(out, *LOCAL))
    assert str(e.value) == "non-finite gradient at epoch 1, step 3, phase local, module 1 (local loss)"


# -- a real process -------------------------------------------------------------------------------
SCRIPT = """
import math, sys, torch
import pgl_fast.data.batches as d
from pgl_fast.train import main
orig, n = d.normalize, [0]
def poisoned(x, *a, **k):
    out = orig(x, *a, **k)
    if torch.is_grad_enabled():
        n[0] += 1
        if n[0] == 3:
            out = out * math.nan
    return out
d.normalize = poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_real_process_exit_code_3_one_line(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, *BASE, *LOCAL, "--save-every", "2", "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["error: non-finite loss at epoch 1, step 3, phase local, module 0 (local loss) "
                     "(found before a mid-epoch checkpoint); the last checkpoint is intact"], r.stderr
    assert ckpt_names(str(out)) == ["ckpt-e0000-s000002.pt"]
