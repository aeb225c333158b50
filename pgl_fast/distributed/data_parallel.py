"""Data parallel training for every method (bp, dgl, infopro, pgl) on ``torch.distributed``.

How a run is split
------------------
Every rank draws the same epoch permutation (same seed, same generator) and cuts it into the same
global batches of ``--batch-size B`` as a single process would. Rank r trains on
``global_batch.tensor_split(world)[r]``: a contiguous piece of B/world samples (the first B %
world ranks get one more when B does not divide). So ``--batch-size`` stays the *global* batch,
the learning rate needs no rescaling, the union of all ranks' shards of an epoch is exactly the
single-process epoch, and, with ``--sync-bn``, N steps of 2 ranks x B/2 compute the same
parameters as N steps of 1 process x B (within floating-point summation order). A global batch
with fewer samples than ranks (a last partial batch only) cannot give every rank a sample:
:func:`shard_batches` drops it on all ranks alike, and a Trainer run refuses such an epoch with
one line (:func:`check_epoch_split`) rather than train on a different epoch than one process.

Data augmentation draws its random crops and flips for the whole global batch from the shared
generator and applies this rank's slice (:func:`augment_shard`), so the generator advances in
lock step on every rank and every image is augmented exactly as in the single-process run.

Gradients
---------
Every rank's loss is a mean over its own n_r samples, so the single-process gradient (the mean
over all N = sum n_r samples) is ``sum_r (n_r / N) grad_r``: each rank scales its gradients by
``n_r / N`` and they are all-reduced with a sum (for equal shards: the plain average).

Why not ``torch.nn.parallel.DistributedDataParallel``: a local step runs J backwards per batch,
one per module, and steps module j's own optimizer right after its backward, before module j+1
has even run its forward. DDP assumes one forward and one backward of the wrapped module per
iteration: wrapping the whole network fails with "Expected to mark a variable ready only once"
or silently never reduces the parameters whose backward happens in a later autograd call, and
submodules called directly (the learner calls ``blocks[j]``, ``heads[j]`` and ``classifier`` one
by one, never the wrapper's forward) skip its hooks and are silently never synchronised. One DDP
wrapper per module would work for local steps, but module j's block and its head are called
separately (two wrappers, or a forward that is not the learner's), a global step calls the units
one by one (checkpointed segments), and every wrapper adds its reducer's bookkeeping per call.
Instead each module's gradients are flattened
into one bucket (one collective per module), all-reduced asynchronously on a process group of
their own right after that module's backward, and waited on just before its optimizer step, which
is deferred by one module: in a local step module j's all-reduce runs while module j+1 does its
forward and backward. That is exact: module j's parameters are not used again in this step (the
next module's input was computed before any update), and at most two modules' gradients are alive
at a time, as local learning wants. Global steps have DDP semantics: every module's gradients
are averaged before its step, and its bucket is launched from inside the backward, by
``register_post_accumulate_grad_hook`` hooks, the moment its last gradient is accumulated (module
J-1's first, while the backward of modules J-2..0 still runs).

Batch norm
----------
Default: per-rank batch norm, as DDP users expect: statistics over each rank's B/world samples.
The running statistics of rank 0 are the model's -- exactly what DDP's buffer broadcast from
rank 0 leaves -- so rank 0 checkpoints its own and they are broadcast to every rank before each
evaluation. ``--sync-bn``: statistics over the global batch (``sync_bn.py``), equal on all ranks.

Statistics and checkpoints
--------------------------
The learner's step statistics (:class:`DistStepStats`) read as the global epoch on every rank, and
a mid-epoch checkpoint stores their global sums, so rank 0 alone writes a checkpoint that every
rank restores (:class:`DistStepStats` puts the sums back on rank 0 only).

Evaluation
----------
Every rank evaluates a contiguous slice of the test set (:func:`eval_shard`); the correct counts,
the loss sum and the sample counts are all-reduced, so the accuracy and loss are those of the
whole test set.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .. import data as data_mod
from ..core.learner import LocalLearner, StepStats
from ..errors import UserError
from .context import DistContext
from .sync_bn import BNSync, bypassed_bn, convert_sync_bn


# -- data ----------------------------------------------------------------------------------------
def shard_sizes(n: int, world: int) -> list[int]:
    """Samples each rank takes from a global batch of ``n`` (``tensor_split``'s sizes)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_batch(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous piece of one global batch of indices."""
    return idx.tensor_split(world)[rank]


def global_batches(perm_or_batches, batch_size: int | None = None, world: int = 1) -> list[torch.Tensor]:
    """The global batches of an epoch, every one with at least ``world`` samples: a list of index
    tensors as is, or a permutation cut into ``batch_size`` chunks. A batch with fewer samples than
    ranks can only be the epoch's last partial batch; it is dropped."""
    if isinstance(perm_or_batches, torch.Tensor):
        if batch_size is None or batch_size < 1:
            raise ValueError("global_batches: a permutation needs batch_size >= 1")
        batches = list(perm_or_batches.split(batch_size))
    else:
        batches = list(perm_or_batches)
    return [b for b in batches if b.numel() >= world]


def shard_batches(perm_or_batches, rank: int, world: int, batch_size: int | None = None) -> list[torch.Tensor]:
    """This rank's shard of every global batch of an epoch (see the module docstring): a list of
    index tensors, one per step. ``perm_or_batches``: the epoch's global batches (as
    ``data.epoch_batches`` returns them) or its permutation plus ``batch_size``. Every rank gets
    the same number of steps; the union over ranks is the epoch, less a last batch with fewer
    samples than ranks."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_batches: rank {rank} is not in 0..{world - 1}")
    if batch_size is not None and batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the {world} ranks: every rank needs at "
                        f"least one sample of each global batch; use --batch-size {world} or more")
    return [shard_batch(b, rank, world) for b in global_batches(perm_or_batches, batch_size, world)]


def augment_shard(augment, x_local: torch.Tensor, generator, global_n: int, rank: int, world: int) -> torch.Tensor:
    """Augment this rank's shard exactly as the single-process run augments these images: draw the
    random parameters for the whole global batch of ``global_n`` (so the generator advances as
    it does in one process, on every rank alike) and apply this rank's slice of them."""
    if shard_sizes(global_n, world)[rank] != x_local.shape[0]:
        raise ValueError(f"augment_shard: rank {rank}'s shard has {x_local.shape[0]} images, its slice of a "
                         f"global batch of {global_n} has {shard_sizes(global_n, world)[rank]}")
    params = augment.sample_params(global_n, generator)
    return augment.apply(x_local, *(None if p is None else p.tensor_split(world)[rank] for p in params))


def eval_shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of the test set that this rank evaluates (contiguous, sizes differ by at most one)."""
    sizes = shard_sizes(n, world)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


# -- statistics ----------------------------------------------------------------------------------
_NEVER = 2 ** 62


def reduce_step_stats(stats: StepStats, ctx: DistContext) -> dict:
    """``stats.read()`` over all ranks: loss sums, correct counts and samples summed, the first
    non-finite step the earliest any rank saw. Leaves ``stats`` (this rank's accumulators)
    untouched. Call it on every rank (two collectives)."""
    if not ctx.distributed:
        return StepStats.read(stats)
    sums = torch.cat([stats.loss_sum, stats.final_correct.double().view(1), stats.samples_t.double().view(1)])
    ctx.all_reduce_(sums)
    bad = torch.cat([stats.first_bad, stats.first_bad_grad])
    bad = torch.where(bad < 0, torch.full_like(bad, _NEVER), bad)
    ctx.all_reduce_(bad, op="min")
    bad = torch.where(bad == _NEVER, torch.full_like(bad, -1), bad).tolist()
    J = stats.loss_sum.numel()
    sums = sums.tolist()
    samples = int(round(sums[J + 1]))
    n = max(samples, 1)
    return {
        "losses": [v / n for v in sums[:J]],
        "train_acc": int(round(sums[J])) / n,
        "samples": samples,
        "first_bad": bad[:J],
        "first_bad_grad": bad[J:],
    }


# -- gradient buckets ----------------------------------------------------------------------------
class _Bucket:
    """One module's gradients, flattened (one tensor per dtype), scaled by this rank's share and
    all-reduced asynchronously; ``finish`` waits and writes the sums back into ``.grad``."""

    def __init__(self, grads: list[torch.Tensor], weight: float, group):
        self.groups = []
        by_dtype: dict = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            flat = _flatten_dense_tensors(gs)
            if weight != 1.0:
                flat.mul_(weight)
            work = dist.all_reduce(flat, group=group, async_op=True)
            self.groups.append((gs, flat, work))

    def finish(self) -> None:
        for gs, flat, work in self.groups:
            work.wait()
            for g, synced in zip(gs, _unflatten_dense_tensors(flat, gs)):
                g.copy_(synced)
        self.groups = []


def broadcast_module_(module: torch.nn.Module, ctx: DistContext, src: int = 0, *, buffers_only: bool = False) -> None:
    """Parameters (unless ``buffers_only``) and buffers of ``module`` from rank ``src``, in place,
    one flattened broadcast per dtype."""
    if not ctx.distributed:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for ts in by_dtype.values():
            flat = _flatten_dense_tensors([t.data for t in ts])
            ctx.broadcast_(flat, src=src)
            for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                t.data.copy_(v)


def _signature(module: torch.nn.Module) -> list:
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in module.state_dict().items()]


# -- the learner ---------------------------------------------------------------------------------
class DistStepStats(StepStats):
    """The learner's epoch accumulators, read over all ranks.

    ``read()`` is collective (:func:`reduce_step_stats`): the trainer's every read -- the epoch's
    metrics, the non-finite guard before a checkpoint -- sees the global epoch, and every rank
    raises the same error. ``state_dict()`` is collective too and saves the *global* sums so far
    (what a mid-epoch checkpoint needs: one state, whatever the world size); ``load_state_dict``
    puts them on rank 0 and zeros on the others, so the sum over ranks continues from them.
    ``local_read()`` is this rank's own accumulators."""

    def __init__(self, J: int, device: torch.device, ctx: DistContext):
        super().__init__(J, device)
        self.ctx = ctx

    def local_read(self) -> dict:
        return super().read()

    def read(self) -> dict:
        return reduce_step_stats(self, self.ctx)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if not self.ctx.distributed:
            return state
        sums = torch.cat([self.loss_sum, self.final_correct.double().view(1), self.samples_t.double().view(1)])
        self.ctx.all_reduce_(sums)
        bad = torch.cat([self.first_bad, self.first_bad_grad])
        bad = torch.where(bad < 0, torch.full_like(bad, _NEVER), bad)
        self.ctx.all_reduce_(bad, op="min")
        bad = torch.where(bad == _NEVER, torch.full_like(bad, -1), bad).cpu()
        J = self.loss_sum.numel()
        sums = sums.cpu()
        state.update(loss_sum=sums[:J].clone(), final_correct=sums[J].round().long(),
                     samples_t=sums[J + 1].round().long(), first_bad=bad[:J].clone(), first_bad_grad=bad[J:].clone())
        return state

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        if self.ctx.distributed and not self.ctx.is_main:
            for t in (self.loss_sum, self.final_correct, self.samples_t):
                t.zero_()


class DataParallelLearner(LocalLearner):
    """A :class:`~pgl_fast.core.learner.LocalLearner` whose modules' gradients are synchronised
    across ranks before each optimizer step. Same arguments plus ``ctx`` (the
    :class:`DistContext`), ``sync_bn`` and ``sync_bn_impl``; in the single-process context it is
    exactly a LocalLearner. Construction is collective (every rank, same arguments): it checks that
    every rank built the same network, converts batch norm for ``sync_bn``, and copies rank 0's
    parameters and buffers to every rank (DDP's start).

    Each rank's ``step(x, y, image01, global_batch=n)`` gets its shard of a global batch of ``n``
    samples (None: found with one small all-reduce); ``evaluate`` gets its shard of the test set and
    returns the whole test set's figures on every rank."""

    def __init__(self, local_model, method, *, ctx: DistContext, sync_bn: bool = False, sync_bn_impl: str = "auto",
                 **kwargs):
        if ctx.distributed and kwargs.get("cuda_graphs"):
            raise UserError("--cuda-graphs with data parallel is not supported: a captured local step cannot "
                            "hold the gradient all-reduces; drop --cuda-graphs under torchrun")
        super().__init__(local_model, method, **kwargs)  # the method may add modules (InfoPro's decoders)
        self.ctx = ctx
        net = self.model
        self.bn_sync: BNSync | None = None
        if ctx.distributed:
            sigs = ctx.all_gather_object(_signature(net))
            if any(sig != sigs[0] for sig in sigs):
                bad = [r for r, sig in enumerate(sigs) if sig != sigs[0]]
                raise UserError(f"data parallel: ranks {bad} built a different network from rank 0 (every rank "
                                "must get the same command line)")
            if sync_bn:
                if self.compiled is not None:
                    raise UserError("--sync-bn with --compile is not supported: the compiled pieces would trace "
                                    "the batch-norm all-reduces; drop one of the two flags")
                self.bn_sync = convert_sync_bn(net, ctx, sync_bn_impl)
            broadcast_module_(net, ctx)  # every replica begins from rank 0's weights
        self.stats = DistStepStats(self.J, self.device, ctx)
        if self.graphed is not None:
            # the CUDA-graph machinery (single process only) was built by the base constructor
            # around the stats it made there: its snapshot of the training state must hold the
            # stats a captured step writes and the trainer reads, which are these
            self.graphed.stats = self.stats
        self.eval_counts = None
        self._pending: list[tuple[int, _Bucket]] = []
        self._weight = 1.0 / ctx.world_size
        self._next_global: int | None = None
        self.events: list | None = None  # set to [] to record ("reduce"|"step", j) in order (tests)
        self._bn_checked = False
        # global steps: a module's bucket is launched from inside the backward, by a hook on each of
        # its parameters, as soon as the last of them has its gradient (DDP's overlap of the
        # all-reduce with the rest of the backward); step_module then only waits for it
        self._in_global = False
        self._launched: dict[int, _Bucket] = {}
        self._expected = [sum(1 for g in o.param_groups for p in g["params"] if p.requires_grad)
                          for o in self.optimizers]
        self._ready = [0] * self.J
        if ctx.distributed:
            for j, o in enumerate(self.optimizers):
                for g in o.param_groups:
                    for p in g["params"]:
                        if p.requires_grad:
                            p.register_post_accumulate_grad_hook(self._grad_hook(j))

    def start_epoch(self, epoch: int) -> float | None:
        self._bn_checked = False
        return super().start_epoch(epoch)

    # -- per step --------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None, *,
             global_batch: int | None = None) -> torch.Tensor:
        """One step of the current phase on this rank's shard of a global batch of ``global_batch``;
        returns this rank's per-module losses (on its shard) as ``LocalLearner.step`` does."""
        self._next_global = global_batch
        return super().step(x, y, image01)

    def set_global_batch(self, n: int | None) -> None:
        """The global batch size of the next step (for callers that use ``local_step``/``global_step``)."""
        self._next_global = n

    def _begin(self, n_local: int) -> None:
        if not self.ctx.distributed:
            return
        if self.bn_sync is not None and not self._bn_checked:  # once per epoch: lean blocks can be set later
            bypass = bypassed_bn(self.model)
            if bypass:
                raise UserError("--sync-bn: these parts compute batch norm without calling it and would not "
                                f"synchronise: {', '.join(bypass[:3])}; drop --lean-blocks / use --head-kernels eager")
            self._bn_checked = True
        n_global = self._next_global
        self._next_global = None
        if n_global is None:
            n_global = int(round(self.ctx.all_reduce_sum([n_local])[0]))
        if not 0 < n_local <= n_global:
            raise ValueError(f"data parallel: this rank's shard has {n_local} samples of a global batch of {n_global}")
        self._weight = n_local / n_global
        if self.bn_sync is not None:
            self.bn_sync.set_step(n_local, n_global)

    def run_local_step(self, x, y, image01=None) -> None:
        self._begin(x.shape[0])
        super().run_local_step(x, y, image01)

    def global_step(self, x, y, image01=None) -> None:
        self._begin(x.shape[0])
        self._ready = [0] * self.J
        self._in_global = self.ctx.distributed
        try:
            super().global_step(x, y, image01)
        finally:
            self._in_global = False
            self._launched.clear()

    def _grad_hook(self, j: int):
        def hook(p: torch.Tensor) -> None:
            if not self._in_global:
                return
            self._ready[j] += 1
            if self._ready[j] == self._expected[j]:  # the module's last gradient of this step
                self._launched[j] = self._launch(j)
        return hook

    def _launch(self, j: int) -> _Bucket:
        opt = self.optimizers[j]
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if self.events is not None:
            self.events.append(("reduce", j))
        return _Bucket(grads, self._weight, self.ctx.grad_group)

    def step_module(self, j: int) -> None:
        """Launch module j's bucket (unless the backward already did); finish (wait, then step)
        the module before it."""
        if not self.ctx.distributed:
            return super().step_module(j)
        # a module whose parameters did not all get a gradient in this global step is launched here
        bucket = self._launched.pop(j, None) or self._launch(j)
        self._pending.append((j, bucket))
        # lag of one module: finish every bucket but the one just launched
        while len(self._pending) > 1:
            self._finish_one()

    def _finish_one(self) -> None:
        j, bucket = self._pending.pop(0)
        bucket.finish()
        if self.events is not None:
            self.events.append(("step", j))
        super().step_module(j)

    def end_step(self) -> None:
        while self._pending:
            self._finish_one()
        super().end_step()

    # -- buffers, evaluation ---------------------------------------------------------------------
    def sync_buffers(self) -> None:
        """Rank 0's batch-norm running statistics on every rank (collective). With per-rank batch
        norm they are what the model is evaluated with (and what rank 0 checkpoints); with
        ``--sync-bn`` they are equal everywhere already."""
        broadcast_module_(self.model, self.ctx, buffers_only=True)

    @torch.no_grad()
    def evaluate(self, batches, eval_heads: bool = True) -> dict:
        """Collective: ``batches`` are this rank's shard of the test set (:func:`eval_shard`); the
        result is for the whole test set, on every rank, plus ``test_samples`` (how many images
        that was, so a shard evaluated twice or not at all shows)."""
        self.sync_buffers()
        res = super().evaluate(batches, eval_heads)
        c = self.eval_counts
        if not self.ctx.distributed:
            return dict(res, test_samples=c["total"])
        packed = torch.cat([c["correct"].double().view(1), c["loss_sum"].double().view(1),
                            torch.tensor([float(c["total"])], dtype=torch.float64, device=self.device),
                            c["head_correct"].double().view(-1)])
        self.ctx.all_reduce_(packed)
        correct, loss_sum, total = packed[0].round().long(), packed[1], int(packed[2].round().item())
        head_correct = packed[3:].round().long()
        self.eval_counts = {"correct": correct, "loss_sum": loss_sum, "head_correct": head_correct, "total": total}
        n = max(total, 1)
        return {
            "test_acc": correct.item() / n,
            "test_loss": loss_sum.item() / n,
            "head_acc": [v / n for v in head_correct.tolist()] if res["head_acc"] is not None else None,
            "test_samples": total,
        }


def check_epoch_split(n_train: int, batch_size: int, world: int, drop_last: bool) -> None:
    """Refuse, as one line, a run whose epochs cannot give every rank a sample of every step: a
    global batch smaller than the world, or a last partial batch of fewer images than ranks (the
    trainer runs every batch of the epoch on every rank, so it cannot skip one)."""
    if batch_size < world:
        raise UserError(f"--batch-size {batch_size} is smaller than the {world} ranks: every rank needs at "
                        f"least one sample of each global batch; use --batch-size {world} or more")
    rest = n_train % batch_size
    if not drop_last and 0 < rest < world:
        raise UserError(f"the last batch of each epoch has {rest} of the {n_train} training images, fewer than the "
                        f"{world} ranks; use --drop-last, or a --batch-size or --train-subset that leaves at least "
                        f"{world} (or none)")


def steps_per_epoch(n_train: int, batch_size: int, world: int, drop_last: bool) -> int:
    """Steps every rank runs in an epoch of ``n_train`` images (:func:`shard_batches`)."""
    full, rest = divmod(n_train, batch_size)
    return full + (1 if rest >= max(world, 1) and not drop_last else 0)


class ShardedData:
    """The Trainer's data object for one rank: wraps the trainer's own (``trainer.data``) so that the
    loop is unchanged -- ``epoch_batches`` still returns the *global* batches (every rank draws the
    same permutation, so a mid-epoch checkpoint's order is the same on every rank), ``train_batch``
    turns a global batch into this rank's shard (augmented as one process augments it) and tells
    the learner the global batch size, ``test_batches`` yields this rank's slice of the test set.

    Tensor data (images on the device): the shard is cut from the indices before anything is read,
    augmented with :func:`augment_shard`. A loader's batches: every rank reads the whole batch and
    keeps its piece (the loader's own augmentation; no sampler needed, the order is the loader's)."""

    def __init__(self, data, ctx: DistContext, learner: "DataParallelLearner"):
        self.data, self.ctx, self.learner = data, ctx, learner
        self.resumable_mid_epoch = data.resumable_mid_epoch
        self.num_train, self.num_test = data.num_train, data.num_test
        self.tensor = hasattr(data, "train_x")

    def __getattr__(self, name):  # everything else (spec, uint8, ...) is the wrapped object's
        return getattr(self.__dict__["data"], name)

    def epoch_batches(self, batch_size: int, gen, drop_last: bool):
        check_epoch_split(self.num_train, batch_size, self.ctx.world_size, drop_last)
        return self.data.epoch_batches(batch_size, gen, drop_last)

    def train_batch(self, batch, gen, needs_image: bool):
        r, w = self.ctx.rank, self.ctx.world_size
        if not self.tensor:
            x, y, image01 = self.data.train_batch(batch, gen, needs_image)
            self.learner.set_global_batch(int(y.shape[0]))
            return (x.tensor_split(w)[r], y.tensor_split(w)[r], None if image01 is None else image01.tensor_split(w)[r])
        d = self.data
        n = int(batch.numel())
        idx = shard_batch(batch, r, w)
        xb = d.train_x[idx]
        self.learner.set_global_batch(n)
        if not d.uint8:
            return xb, d.train_y[idx], None
        if d.augment is not None:
            xb = augment_shard(d.augment, xb, gen, n, r, w)
        x = data_mod.normalize(xb, d.spec, torch.float32, d.channels_last)
        return x, d.train_y[idx], xb.float().div_(255) if needs_image else None

    def test_batches(self):
        r, w = self.ctx.rank, self.ctx.world_size
        if not self.tensor:
            for x, y in self.data.test_batches():
                yield x.tensor_split(w)[r], y.tensor_split(w)[r]
            return
        d = self.data
        lo, hi = eval_shard(self.num_test, r, w)
        for i in range(lo, hi, d.test_batch_size):
            j = min(i + d.test_batch_size, hi)
            x = d.test_x[i:j]
            if d.uint8:
                x = data_mod.normalize(x, d.spec, torch.float32, d.channels_last)
            yield x, d.test_y[i:j]


__all__ = [
    "DataParallelLearner", "DistStepStats", "ShardedData", "augment_shard", "broadcast_module_", "check_epoch_split",
    "eval_shard", "global_batches", "reduce_step_stats", "shard_batch", "shard_batches", "shard_sizes",
    "steps_per_epoch",
]
