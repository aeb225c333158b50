"""Driven by test_pipeline.py under torchrun: each rank trains its stage of the tiny network for one
local epoch and one global epoch and saves its modules' state to OUT/rank<r>.pt."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_pipeline as tp  # noqa: E402

from pgl_fast.distributed.pipeline import (PipelineError, build_stage, exit_on_error, init_pipeline_group,  # noqa: E402
                                           run_epoch)


def main(out: str) -> int:
    torch.set_num_threads(1)
    init_pipeline_group(timeout_s=60)
    net, exe = tp.make_learner(0)
    runner = build_stage(exe, dist.get_world_size(), input_shape=(3, tp.IMG, tp.IMG), timeout_s=60)
    data, test = tp.batches(), tp.batches([8, 5], seed=11)
    try:
        for phase in ("local", "global"):
            res = run_epoch(runner, phase=phase, lr=0.05, sizes=tp.SIZES, batch_fn=lambda t: data[t],
                            test_sizes=[8, 5], test_fn=lambda t: test[t])
    except PipelineError as e:
        exit_on_error(e)
    torch.save({"state": tp.snapshot(net, runner.modules), "res": res}, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
