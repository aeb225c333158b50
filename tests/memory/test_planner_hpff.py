"""The memory planner and the profiler build the step of the run's own local objective: HPFF's
(its second heads, its patch decoders, its local step keeping two modules' graphs alive) and
InfoPro's (its decoders), both fed an image batch as the trainer feeds the learner; the predicted
local-step peak must equal a direct tracker measurement at the target batch."""
import pytest
import torch

from pgl_fast.memory import planner
from pgl_fast.config.build import step_factory
from pgl_fast.config import TrainConfig
from pgl_fast.memory.profile import build_step, measure_step
from pgl_fast.train import main

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(arch="resnet8", J=4, aux="1c2f", image_size=16, split="layerwise")
# resnet8 at J=4 has no published InfoPro lambdas: a run passes them, and so does the planner
LAMBDAS = {"ixx_1": 1.0, "ixy_1": 0.5, "ixx_2": 0.5, "ixy_2": 1.0}
BATCH = 32


def _param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@pytest.mark.parametrize("objective,options,extra", [
    ("hpff", {"hpff_base": "infopro"}, ("hpff_heads", "hpff_decoders")),
    ("infopro", LAMBDAS, ("decoders",)),
], ids=["hpff", "infopro"])
def test_local_prediction_builds_the_objective_and_matches_measurement(objective, options, extra):
    plain = planner.predict(method="pgl", batch=BATCH, candidates=(), **KW)["local"]
    pred = planner.predict(method="pgl", batch=BATCH, candidates=(), pgl_local=objective,
                           local_options=tuple(options.items()), **KW)["local"]
    setup = build_step("local", batch=BATCH, head_kernels="eager", pgl_local=objective, local_options=options, **KW)
    assert setup.image01 is not None and tuple(setup.image01.shape) == (BATCH, 3, 16, 16)
    added = _param_bytes(*(getattr(setup.net, name) for name in extra))
    assert added > 0
    setup.warm_up(2)
    direct = measure_step(setup, steps=1, measure="tracker")["peak_bytes"]
    # the tolerance of the planner's other direct comparisons (tests/memory/test_planner.py)
    assert 0.98 * direct <= pred <= 1.08 * direct, (pred, direct)
    # the objective's networks (parameters and their momentum buffers, always alive) come on top of
    # the plain heads' step, and with them their activations
    assert pred > plain + 2 * added, (pred, plain, added)


def test_hpff_local_step_holds_two_modules():
    """HPFF over DGL's loss adds only a second head per cut to DGL's networks; its local step
    keeps module j-1's graph alive while module j runs, so its peak exceeds DGL's by more than
    the second heads' bytes: at least the activations of the smallest module at the batch."""
    plain = planner.predict(method="pgl", batch=BATCH, candidates=(), **KW)["local"]
    pred = planner.predict(method="pgl", batch=BATCH, candidates=(), pgl_local="hpff",
                           local_options=(("hpff_base", "dgl"),), **KW)["local"]
    setup = build_step("local", batch=4, head_kernels="eager", pgl_local="hpff", local_options={"hpff_base": "dgl"},
                       **KW)
    assert setup.image01 is None  # the cross-entropy base reconstructs nothing
    heads = 2 * _param_bytes(setup.net.hpff_heads)  # parameters and momentum buffers
    # a module's output alone (fp32, per sample): the smallest of the cut features
    smallest_output = min(4 * c * h * w for c, h, w in (setup.net.out_shape(j) for j in range(setup.net.J - 1)))
    assert pred >= plain + heads + BATCH * smallest_output, (pred, plain, heads, smallest_output)


def test_planner_measures_the_runs_objective_with_its_flags():
    def local_step(**flags):  # the config the planner's local step of this run trains with
        return step_factory(TrainConfig(**flags), 10, 32).config(
            "local", batch=4, dtype="fp32", device=torch.device("cpu"), head_kernels="eager",
            channels_last=False, seed=0)

    assert local_step(method="hpff").pgl_local == "hpff"
    assert local_step(method="pgl", pgl_local="infopro").pgl_local == "infopro"
    step = local_step(method="pgl", pgl_local="hpff", hpff_base="dgl", hpff_patches=4)
    assert (step.pgl_local, step.hpff_base, step.hpff_patches) == ("hpff", "dgl", 4)
    step = local_step(method="hpff")  # HPFF's published lambdas, resolved
    assert (step.hpff_base, step.ixx_1, step.ixy_1, step.ixx_2, step.ixy_2) == ("infopro", 5.0, 0.5, 0.0, 0.0)
    step = local_step(method="pgl", pgl_local="man", man_base="infopro")
    assert (step.pgl_local, step.man_base, step.infopro_loss) == ("man", "infopro", "contrast")
    assert step_factory(TrainConfig(method="bp"), 10, 32).bp



def test_plan_flag_for_pgl_over_hpff(capsys):
    args = ["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16", "--arch", "resnet8",
            "-J", "4", "--split", "layerwise", "-b", "16", "--lr", "0.05", "--method", "pgl", "-P", "1", "-Q", "1",
            "--pgl-local", "hpff", "--plan"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "local steps" in out and out.count("<- will run") == 1
