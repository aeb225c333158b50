"""Scale-out on ``torch.distributed``: the launch context, data parallel training and the module
pipeline.

    torchrun --nproc_per_node=N -m pgl_fast.train ... [--sync-bn]     # data parallel
    torchrun --nproc_per_node=S -m pgl_fast.train ... --pipeline S    # S pipeline stages

``context.DistContext`` is who this process is (rank, world, device, process groups): the one
process-group set-up of both modes; ``data_parallel`` shards the data, synchronises each module's
gradients and gathers the evaluation; ``sync_bn`` is batch norm over all ranks' shards;
``pipeline`` runs contiguous groups of modules on successive ranks (imported on use: ``from
pgl_fast.distributed.pipeline import build_stage``); ``cost_model`` predicts what a pipeline gains.
"""
from .context import DistContext, launched_by_torchrun
from .data_parallel import (DataParallelLearner, DistStepStats, ShardedData, augment_shard, broadcast_module_,
                            check_epoch_split, eval_shard, global_batches, reduce_step_stats, shard_batch,
                            shard_batches, shard_sizes, steps_per_epoch)
from .sync_bn import AllReduceBatchNorm, BNSync, convert_sync_bn

__all__ = [
    "AllReduceBatchNorm", "BNSync", "DataParallelLearner", "DistContext", "DistStepStats", "ShardedData",
    "augment_shard", "broadcast_module_", "check_epoch_split", "convert_sync_bn", "eval_shard", "global_batches",
    "launched_by_torchrun", "reduce_step_stats", "shard_batch", "shard_batches", "shard_sizes", "steps_per_epoch",
]
