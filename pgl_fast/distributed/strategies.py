"""Strategies: how one process takes part in a run. The :class:`~pgl_fast.training.trainer.Trainer`'s epoch
loop is the same whatever the strategy; what differs between one process, data parallel and the
module pipeline lives here, behind one small interface (in the spirit of Lightning Fabric's
strategies):

- :class:`SingleProcess`: this process trains every module on every whole batch.
- :class:`DataParallel`: under torchrun, every rank trains its shard of each batch with a
  :class:`~pgl_fast.distributed.DataParallelLearner` (which all-reduces each module's gradients and
  the step statistics); rank 0 writes the output dir; a signal that reaches some ranks stops all of
  them at the same step.
- :class:`Pipeline`: under torchrun, rank r trains a contiguous group of modules (a
  :class:`~pgl_fast.distributed.pipeline.StageRunner`), activations flow forward and, in global
  epochs, gradients backward between neighbours; each rank saves its own modules next to rank 0's
  checkpoint.

A strategy answers: who writes (``io``), how a chunk of an epoch's steps runs (:meth:`train`), how
the epoch's statistics are read (:meth:`read_stats`) and the test set evaluated (:meth:`evaluate`),
what a checkpoint adds (:meth:`before_checkpoint`, :meth:`after_checkpoint`, :meth:`restore`), and
how ranks agree on a signal (:meth:`agree_on_signal`).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch.distributed as dist

from ..training import checkpoint as ckpt
from ..data.batches import TensorData
from ..errors import UserError
from .context import DistContext
from .data_parallel import ShardedData


class Strategy:
    """One process: trains every module on the whole batch and writes the output dir."""

    name = "single"
    probes_model = True      # the trainer checks a sample batch against the whole model
    handles_signals = True   # SIGINT/SIGTERM save a checkpoint and stop
    shows_progress = True    # a progress bar or heartbeat lines
    # ranks that do not write still run the epoch end (its collectives) after the checkpoint
    collective_epoch_end = True

    def bind(self, trainer) -> None:
        """Called once by the Trainer: check what this strategy supports and wrap the data."""
        self.trainer = trainer
        self.learner = trainer.learner
        ctx = getattr(trainer.learner, "ctx", None)
        if ctx is not None and ctx.distributed:
            raise UserError(f"Trainer: the learner trains on {ctx.world_size} ranks; use strategy=DataParallel()")
        self.io = DistContext()

    def wrap_data(self, data):
        return data

    def steps_per_call(self, save_every: int, steps: int) -> int:
        """How many steps one :meth:`train` call runs: one, so that progress, checkpoints and
        signals happen between any two steps."""
        return 1

    def train(self, phase: str, batches: Sequence, steps: range, fetch: Callable[[int], tuple]) -> None:
        for t in steps:
            self.learner.step(*fetch(t))

    def read_stats(self) -> dict:
        return self.learner.stats.read()

    def restore_epoch_stats(self, mid: dict) -> None:
        """A run resumed inside an epoch: the accumulators of the epoch's done steps."""
        self.learner.stats.load_state_dict(mid["stats"])

    def evaluate(self) -> dict:
        return self.trainer.evaluate()

    def agree_on_signal(self, signum: int | None) -> int | None:
        return signum

    def restore(self, resume_state: dict, output_dir: str) -> None:
        """What a checkpoint holds beyond the learner's state (already loaded)."""

    def before_checkpoint(self, output_dir: str, epoch: int, step: int) -> str | None:
        """Runs on every rank before rank 0 writes its checkpoint; returns the checkpoint's tag for
        files saved alongside it (None: none)."""
        return None

    def after_checkpoint(self, output_dir: str) -> None:
        """Runs on every rank after rank 0 wrote (and pruned) its checkpoints."""

    def header(self) -> dict:
        return {}

    def record_extra(self, stats: dict) -> dict:
        """Fields of this strategy in an epoch's metrics record."""
        return {}


SingleProcess = Strategy


class DataParallel(Strategy):
    """Every rank trains its shard of each global batch (the learner a ``DataParallelLearner``)."""

    name = "data_parallel"

    def bind(self, trainer) -> None:
        self.trainer = trainer
        self.learner = trainer.learner
        ctx = getattr(trainer.learner, "ctx", None)
        if ctx is None or not ctx.distributed:
            raise UserError("strategy=DataParallel() needs a DataParallelLearner under torchrun (WORLD_SIZE > 1)")
        self.io = ctx

    def wrap_data(self, data):
        # a stream decodes only this rank's shard of each global batch itself
        shard = getattr(data, "shard", None)
        return shard(self.io, self.learner) if shard is not None else ShardedData(data, self.io, self.learner)

    def agree_on_signal(self, signum: int | None) -> int | None:
        # a signal that reached some ranks stops all of them at this step
        return self.io.max_int(signum or 0) or None


class Pipeline(Strategy):
    """This rank is one stage of a module pipeline (``runner``: its
    :class:`~pgl_fast.distributed.pipeline.StageRunner`)."""

    name = "pipeline"
    probes_model = False       # a stage holds only its own modules
    handles_signals = False    # Ctrl-C stops every rank at once (PipelineError), from the last checkpoint
    shows_progress = False
    collective_epoch_end = False

    def __init__(self, runner):
        self.runner = runner

    def bind(self, trainer) -> None:
        self.trainer = trainer
        self.learner = learner = trainer.learner
        ctx = getattr(learner, "ctx", None)
        if ctx is not None and ctx.distributed:
            raise UserError("--pipeline S with data parallel is not supported: launch exactly S ranks "
                            "(WORLD_SIZE must equal S) with a plain LocalLearner")
        if not isinstance(trainer.data, TensorData):
            raise UserError("Trainer: a pipeline needs tensor data (x, y): every rank must know the batch sizes")
        if learner is not self.runner.learner:
            # build_stage refused what a stage cannot run for the runner's learner; it must be this one
            raise UserError("Trainer: strategy=Pipeline(runner) needs the runner built from the trainer's own "
                            "learner (build_stage(learner, ...))")
        # the pipeline's ranks decide who writes (rank 0) and share rank 0's decisions
        self.io = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=learner.device,
                              backend=dist.get_backend())

    def steps_per_call(self, save_every: int, steps: int) -> int:
        # the stages run the epoch in chunks of --save-every batches (a checkpoint after each)
        return save_every or steps

    def train(self, phase: str, batches: Sequence, steps: range, fetch: Callable[[int], tuple]) -> None:
        sizes = [int(b.numel()) for b in batches]
        self.runner.train_epoch(phase, sizes, fetch if self.runner.first else None, steps)

    def read_stats(self) -> dict:
        return self.runner.reduce_stats()

    def restore_epoch_stats(self, mid: dict) -> None:
        self.runner.restore_stats()  # each stage's own share came back with its stage file

    def evaluate(self) -> dict:
        tr = self.trainer
        tests = list(tr.data.test_batches()) if self.runner.first else []
        tb, nt = tr.test_batch_size, tr.data.num_test
        return self.runner.evaluate([min(tb, nt - i) for i in range(0, nt, tb)],
                                    (lambda t: tests[t]) if self.runner.first else None, tr.eval_heads)

    def restore(self, resume_state: dict, output_dir: str) -> None:
        # this stage's modules, optimizers and accumulators
        self.runner.load(ckpt.checkpoint_dir(output_dir), tag=resume_state["pipeline_tag"])

    def before_checkpoint(self, output_dir: str, epoch: int, step: int) -> str | None:
        # every stage's file first, then rank 0's checkpoint (the one resume looks for) names them
        tag = os.path.splitext(ckpt.checkpoint_name(epoch, step))[0]
        self.runner.save(ckpt.checkpoint_dir(output_dir), tag)
        dist.barrier()
        return tag

    def after_checkpoint(self, output_dir: str) -> None:
        dist.barrier()  # rank 0 has pruned its checkpoints: the stages prune their files alike
        self.runner.prune(ckpt.checkpoint_dir(output_dir),
                          [os.path.splitext(os.path.basename(c))[0] for c in ckpt.list_checkpoints(output_dir)])

    def header(self) -> dict:
        r = self.runner
        return {"pipeline": {"stages": r.S, "module_ranges": r.ranges, "depth": r.depth,
                             "micro_batches": r.micro_batches}}

    def record_extra(self, stats: dict) -> dict:
        return {"peak_inflight_mib": [b / 2 ** 20 for b in stats["peak_inflight_bytes"]]}


def default_strategy(learner) -> Strategy:
    """The strategy a learner implies: data parallel for a learner spread over ranks, else one process."""
    ctx = getattr(learner, "ctx", None)
    return DataParallel() if ctx is not None and ctx.distributed else SingleProcess()


__all__ = ["DataParallel", "Pipeline", "SingleProcess", "Strategy", "default_strategy"]
