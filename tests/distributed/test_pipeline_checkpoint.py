"""Pipeline checkpoints: the stage files hold weights only (read with ``weights_only=True``, a file
with anything else refused), and the run's main checkpoint, written by rank 0, holds the whole
trained network, the other stages' modules included."""
from __future__ import annotations

import glob
import os

import torch

from pgl_fast.distributed.pipeline import build_stage, run_local_group

from test_pipeline import IMG, _ok, make_learner, snapshot


class Sneaky:
    """Not a tensor, a number, a string or a container: a weights-only load refuses it."""


def _trainer_worker(rank, world, out_dir):
    from pgl_fast import Pipeline, Trainer
    from pgl_fast.errors import UserError

    net, learner = make_learner(0)  # PGL(1, 1): a local epoch, then a global one
    runner = build_stage(learner, world, input_shape=(3, IMG, IMG), timeout_s=30)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, IMG, IMG), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (24,), generator=g)
    mismatch = None
    try:  # a runner built for another learner: the trainer's learner was never checked by build_stage
        Trainer(make_learner(0)[1], (x[:16], y[:16]), (x[16:], y[16:]), epochs=2, batch_size=8, progress="off",
                output_dir=out_dir + f"-other{rank}", strategy=Pipeline(runner)).fit()
    except UserError as e:
        mismatch = str(e)
    Trainer(learner, (x[:16], y[:16]), (x[16:], y[16:]), epochs=2, batch_size=8, progress="off",
            output_dir=out_dir, overwrite=True, strategy=Pipeline(runner)).fit()
    # a stage file with an object that is not weights: loading it must be refused, not run
    ckdir = os.path.join(out_dir, "checkpoints")
    tag = sorted(n for n in os.listdir(ckdir) if n.startswith("ckpt-"))[-1][:-3]
    state = torch.load(runner.checkpoint_path(ckdir, tag), weights_only=True)
    state["extra"] = Sneaky()
    bad_dir = os.path.join(out_dir, f"bad{rank}")
    os.makedirs(bad_dir)
    torch.save(state, runner.checkpoint_path(bad_dir, tag))
    refused = None
    try:
        runner.load(bad_dir, tag)
    except UserError as e:
        refused = str(e)
    return {"modules": runner.modules, "state": snapshot(net, runner.modules), "refused": refused,
            "mismatch": mismatch}


def test_pipeline_checkpoints_weights_only_and_whole_model(tmp_path, one_thread):
    from pgl_fast.training.checkpoint import list_checkpoints, load_checkpoint

    outs = _ok(run_local_group(_trainer_worker, 2, str(tmp_path), timeout_s=60))
    # every stage file loads as weights only (any object that sneaks into one fails this load)
    files = sorted(glob.glob(str(tmp_path / "checkpoints" / "pipeline-stage*-of2-*.pt")))
    assert len(files) == 4  # two stages x the two kept checkpoints
    for f in files:
        st = torch.load(f, weights_only=True)
        assert st["stages"] == 2 and st["modules"]
    for r, o in enumerate(outs):
        assert o["refused"] is not None and "not a weights-only stage file" in o["refused"], (r, o["refused"])
        assert o["mismatch"] is not None and "built from the trainer's own learner" in o["mismatch"], o["mismatch"]
    # the main checkpoint (rank 0 writes it) holds stage 1's trained modules, not rank 0's stale copies
    main = load_checkpoint(list_checkpoints(str(tmp_path))[-1])["model"]
    init = make_learner(0)[0].state_dict()
    assert outs[1]["modules"] == [2, 3]
    stage1 = outs[1]["state"]
    assert any(k.startswith("blocks.2.") for k in stage1) and any(k.startswith("classifier.") for k in stage1)
    moved = 0
    for k, v in stage1.items():
        assert torch.equal(main[k], v), k
        moved += not torch.equal(init[k], v)
    assert moved > len(stage1) // 2  # they did train
    for k, v in outs[0]["state"].items():  # and stage 0's own, of course
        assert torch.equal(main[k], v), k
