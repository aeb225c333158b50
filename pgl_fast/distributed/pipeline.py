"""Decoupled modules pipelined across ranks (``--pipeline S``).

S ranks each own a contiguous group of the J local modules. The ranks form a chain: stage 0 reads
the data, stage r receives the activations (and labels) of batch t from stage r-1 and sends its own
output on to stage r+1.

**Local steps** (DGL, InfoPro, PGL's local epochs) need no backward between ranks: stage r runs its
modules' local steps on batch t, posts the *detached* output to stage r+1 (``isend``) and starts batch
t+1 at once. This is exactly sequential DGL, with no staleness: in a single process module j's input
for batch t is computed by module j-1 *before* module j-1 steps on batch t, and that is the very tensor
stage r receives. So S ranks reproduce the single-process parameters (bitwise where the kernels are
deterministic, which they are on the CPU with one thread per rank). Each rank keeps at most ``depth``
sends outstanding towards the next stage and ``depth`` receives posted ahead from the previous one;
the bytes those messages hold (activations, labels) are the pipeline's activation memory in flight,
reported per rank as ``peak_inflight_bytes``: at most ``depth * batch * (input + output bytes per
sample + 16)``, on top of the one module's graph a local step keeps alive anyway.

**Global steps** (PGL's global epochs) are a synchronous pipelined forward and backward, GPipe-style:
the batch is cut into ``micro_batches`` pieces; every stage runs the forwards of all micro-batches
(each aux head takes its module's *detached* output and backpropagates its own loss at once, eq. 4;
InfoPro's image travels with every micro-batch, as in local epochs, for its decoders), the last
stage backpropagates the final loss of each micro-batch (scaled by its share of the batch, so the
sum is the batch mean), and only then do the gradients of the stage inputs travel back along the
chain, micro-batch by micro-batch (eq. 3: the backbone learns from the final loss only). Then every
stage steps its modules. All activations before any gradient, in micro-batch order on every stage
(:func:`p2p_order`), means each neighbour pair posts its matching sends and receives in the same
order: NCCL runs a pair's point-to-point operations in order on one stream, and a send larger than
its buffer blocks until the receive is posted, so any other order between a pair can wait in a
cycle. With one
micro-batch this is the single-process global step; with more, batch norm normalises each
micro-batch with its own statistics (and updates its running statistics once per micro-batch), so the
result differs from a full-batch step by that much -- it is a different, equally valid, batch-norm
computation, not an approximation of the gradient arithmetic. Every stage but the last keeps the
graphs of all its micro-batches until their gradients come back (as GPipe does; 1F1B would bound
that to S micro-batches and is not implemented), i.e. the same activations the single-process global
step holds for its modules; the last stage keeps only its input gradients.

Why not ``torch.distributed.pipelining``: its schedules compute a loss only at the last stage and
hand intermediate stages nothing but the activations. Here every stage needs the labels (each aux head
has its own loss), the aux losses must be backpropagated inside the stage on detached features, and
the local epochs never run a backward across ranks at all, which no schedule expresses. Shipping the
labels as a stage output would make the schedule treat an integer tensor as an activation to
differentiate. Plain point-to-point ``isend``/``irecv`` of activations and gradients serves both
phases with one transport, one failure path and one set of shapes.

**Failure and shutdown.** gloo's point-to-point works cannot be polled (they report completion
only from ``wait``) and a timed-out ``wait`` closes the connection, so every blocking ``wait`` runs
on a helper thread while the main thread waits on an event in quarter-second slices: Ctrl-C reaches
it, and between slices it checks a failure flag in the process group's store and a deadline. NCCL's
``wait`` does not block the host at all, so its works are polled (``is_completed``) on the main
thread with the same flag and deadline (:func:`poll_works`); a message counts as in flight (against
``depth`` and in ``peak_inflight_bytes``) until it has really completed on the GPU. A rank
that raises (any error, or Ctrl-C's ``KeyboardInterrupt``) writes the flag with its message before it
leaves; every other rank then stops at its next wait with :class:`PipelineError` naming the rank that
failed and why. A rank that dies without a word (killed) closes its sockets, so its neighbours' waits
fail, they raise and set the flag, and the rest follow; a rank that hangs is caught by the deadline.
No rank blocks forever on a message. A local epoch asks nothing of the later stages, so a stage
upstream of a late failure can finish its epoch (its last sends complete into the socket buffers);
the failure reaches it in the collective that closes every epoch (:meth:`StageRunner.reduce_stats`),
which then raises the failed rank's message. (The few collectives -- the batch-size check at an epoch's
start, the metric reductions at its end -- block in gloo itself, bounded by the process group's
timeout.)

**Checkpoints.** :meth:`StageRunner.state_dict` holds only the stage's own modules (backbone, aux
heads, decoders, classifier on the last stage) and their optimizers; :meth:`StageRunner.save` /
:meth:`StageRunner.load` write and read one file per stage (tensors and plain containers, read with
``weights_only=True``), so the pipeline resumes where it stopped. ``save`` first gathers every
stage's trained modules into every rank's network (:meth:`StageRunner.gather_model`), so the run's
main checkpoint, written by rank 0, holds the whole trained network; the other stages' optimizer
state lives only in their stage files.

**Process group.** :func:`init_pipeline_group` joins torchrun's group through the same
:class:`~pgl_fast.distributed.context.DistContext` data parallel uses (gloo on the CPU, NCCL on
``cuda:LOCAL_RANK``, a timeout); an already initialised default group is used as is.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NoReturn, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

from ..core.learner import StepStats
from ..errors import UserError
from .context import DistContext, launched_by_torchrun

# one flag per torchrun restart round: a restarted group must not see the last round's failure
FAIL_KEY = f"pgl_fast/pipeline/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
DEFAULT_TIMEOUT_S = 300.0


class PipelineError(RuntimeError):
    """The pipeline stopped: this rank or another failed. The message is one line naming both."""


# ----------------------------------------------------------------------------------------------
# balance: which modules each stage owns
# ----------------------------------------------------------------------------------------------
def balance_by_time(times: Sequence[float], S: int) -> list[tuple[int, int]]:
    """S contiguous module ranges ``[(start, end), ...]`` minimising the slowest stage's summed time
    (the pipeline's period). Exact dynamic programme over all cut positions; ties go to the
    partition whose earlier stages are lighter, since stage 0 also reads the data."""
    J = len(times)
    if not 1 <= S <= J:
        raise UserError(f"--pipeline {S}: needs 1 <= S <= J modules (J={J})")
    if any(t < 0 for t in times):
        raise UserError("--pipeline-balance: module times must be >= 0")
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + float(t))
    INF = float("inf")
    # best[s][j]: smallest max-stage time splitting modules [0, j) into s stages; cut[s][j]: last cut
    best = [[INF] * (J + 1) for _ in range(S + 1)]
    cut = [[0] * (J + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(1, S + 1):
        for j in range(s, J - (S - s) + 1):
            for i in range(j - 1, s - 2, -1):  # the last stage takes modules [i, j); later i = lighter last
                v = max(best[s - 1][i], prefix[j] - prefix[i])
                if v < best[s][j] - 1e-12:
                    best[s][j], cut[s][j] = v, i
    ranges, j = [], J
    for s in range(S, 0, -1):
        i = cut[s][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def parse_balance(spec: str, J: int, S: int) -> list[tuple[int, int]]:
    """``--pipeline-balance 2,1,1``: the number of modules of each stage, in order."""
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise UserError(f"--pipeline-balance {spec!r}: give S comma-separated module counts, e.g. 2,2") from None
    if len(counts) != S or any(c < 1 for c in counts) or sum(counts) != J:
        raise UserError(f"--pipeline-balance {spec!r}: needs {S} counts >= 1 summing to J={J}")
    ranges, a = [], 0
    for c in counts:
        ranges.append((a, a + c))
        a += c
    return ranges


# ----------------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------------
def init_pipeline_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "auto"):
    """The pipeline's process group: the run's one :class:`~pgl_fast.distributed.context.DistContext`
    (torchrun's environment, gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``, a timeout). An already
    initialised default group is used as is. Returns the context (the caller shuts it down)."""
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           device=torch.device("cuda", torch.cuda.current_device())
                           if dist.get_backend() == "nccl" else torch.device("cpu"),
                           backend=dist.get_backend(), timeout_s=timeout_s)
    if not launched_by_torchrun():
        raise UserError("--pipeline needs torchrun (e.g. torchrun --nproc_per_node=S -m pgl_fast.train ...)")
    return DistContext.from_env(device, backend=backend, timeout_s=timeout_s)


def _default_store():
    try:
        return _get_default_store()
    except Exception:  # pragma: no cover - no store: failures still surface as communication errors
        return None


def p2p_order(stage: int, S: int, M: int) -> list[tuple[str, int, str, int]]:
    """The point-to-point operations stage ``stage`` of ``S`` posts in one global step of ``M``
    micro-batches, in order: ``(kind, peer stage, what, micro-batch)`` with kind "send" or "recv"
    and what "act" (activations, labels, image) or "grad" (the input gradient). The executor
    (:meth:`StageRunner._global_step`) follows it; it is spelled out here so that it can be checked
    without ranks: every neighbour pair posts its matching operations in the same order (all
    activations, then all gradients), so no rank waits in a cycle even if every send blocks until
    its receive is posted."""
    ops: list[tuple[str, int, str, int]] = []
    for m in range(M):
        if stage > 0:
            ops.append(("recv", stage - 1, "act", m))
        if stage < S - 1:
            ops.append(("send", stage + 1, "act", m))
    for m in range(M):
        if stage < S - 1:
            ops.append(("recv", stage + 1, "grad", m))
        if stage > 0:
            ops.append(("send", stage - 1, "grad", m))
    return ops


# ----------------------------------------------------------------------------------------------
# the stage runner
# ----------------------------------------------------------------------------------------------
@dataclass
class _Meter:
    """Bytes held by the messages in flight on this rank (both queues), and their peak."""

    bytes: int = 0
    peak: int = 0


@dataclass
class _Inflight:
    """Posted messages in order; their tensors' bytes count on the shared meter."""

    meter: _Meter = field(default_factory=_Meter)
    items: deque = field(default_factory=deque)

    def push(self, works, tensors) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors)
        self.items.append((works, tensors, n))
        self.meter.bytes += n
        self.meter.peak = max(self.meter.peak, self.meter.bytes)

    def pop(self):
        works, tensors, n = self.items.popleft()
        self.meter.bytes -= n
        return works, tensors


class _Pending:
    def __init__(self, works):
        self.works, self.done, self.error = works, threading.Event(), None


class _Waiter:
    """One daemon thread that runs the blocking ``Work.wait`` calls, in order."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="pgl-pipeline-wait", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            p = self.queue.get()
            try:
                for w in p.works:
                    w.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                p.error = e
            p.done.set()

    def submit(self, works) -> _Pending:
        p = _Pending(works)
        self.queue.put(p)
        return p


def poll_works(works, timeout_s: float, failed_elsewhere: Callable[[], str | None], *,
               check_every_s: float = 0.25, clock=time.monotonic, sleep=time.sleep):
    """Wait on the host until every work reports ``is_completed()`` (NCCL: its CUDA event has
    fired), checking ``failed_elsewhere()`` every ``check_every_s`` (a store round trip, so not on
    every poll) and giving up after ``timeout_s``. Returns None once all completed (after a final
    ``wait()``, which orders the current stream after the transfers and raises a work's own error),
    else why it gave up: ``("failed", message)`` or ``("timeout", None)``. The poll interval grows
    from 10 us to 1 ms: a transfer that lands in microseconds is not delayed by a long sleep, and a
    long one costs no busy core."""
    deadline = clock() + timeout_s
    next_check = clock()
    pause = 1e-5
    while not all(w.is_completed() for w in works):
        now = clock()
        if now >= next_check:
            other = failed_elsewhere()
            if other is not None:
                return ("failed", other)
            next_check = now + check_every_s
        if now >= deadline:
            return ("timeout", None)
        sleep(pause)
        pause = min(2 * pause, 1e-3)
    for w in works:
        w.wait()
    return None


class StageRunner:
    """One rank's part of the pipeline: modules ``ranges[stage]`` of ``learner``'s model.

    Every rank builds the whole model the same way (same seed), and trains only its own modules.
    ``depth`` bounds the batches in flight between neighbours; ``micro_batches`` is the GPipe
    micro-batch count of global steps (1: exactly the single-process step)."""

    def __init__(self, learner, ranges: Sequence[tuple[int, int]], *, stage: int | None = None,
                 ranks: Sequence[int] | None = None, group=None, depth: int = 2, micro_batches: int = 1,
                 input_shape: tuple[int, ...] = (3, 32, 32), timeout_s: float = DEFAULT_TIMEOUT_S):
        self.learner = learner  # the stage runs the learner's own step pieces on its modules
        self.model = learner.model
        method = learner.method
        self.has_heads = bool(method.has_heads) and len(self.model.heads) > 0
        self.needs_image = bool(method.needs_image)
        self.J = self.model.J
        self.ranges = [tuple(r) for r in ranges]
        self.S = len(self.ranges)
        if self.ranges[0][0] != 0 or self.ranges[-1][1] != self.J or any(
                a >= b for a, b in self.ranges) or any(self.ranges[i][1] != self.ranges[i + 1][0]
                                                       for i in range(self.S - 1)):
            raise UserError(f"--pipeline-balance: stage ranges {self.ranges} must cover modules 0..{self.J - 1} "
                            "contiguously, each non-empty")
        if depth < 1:
            raise UserError(f"--pipeline-depth: must be >= 1, got {depth}")
        if micro_batches < 1:
            raise UserError(f"--pipeline-micro-batches: must be >= 1, got {micro_batches}")
        self.group = group
        self.ranks = list(ranks) if ranks is not None else list(range(self.S))
        if len(self.ranks) != self.S:
            raise UserError(f"--pipeline {self.S}: {len(self.ranks)} ranks given for {self.S} stages")
        me = dist.get_rank()
        if stage is None:
            if me not in self.ranks:
                raise UserError(f"rank {me} is not one of the pipeline's ranks {self.ranks}")
            stage = self.ranks.index(me)
        self.stage = stage
        self.first, self.last = stage == 0, stage == self.S - 1
        self.prev = self.ranks[stage - 1] if not self.first else None
        self.next = self.ranks[stage + 1] if not self.last else None
        self.modules = list(range(*self.ranges[stage]))
        self.depth = depth
        self.micro_batches = micro_batches
        self.timeout_s = timeout_s
        self.device = next(self.model.parameters()).device
        self.store = _default_store()
        self.rank = dist.get_rank()
        self._waiter = _Waiter()
        # NCCL's works complete on the GPU, unseen by a host ``wait``: they are polled (see _wait)
        self._pollable = dist.get_backend(group) == "nccl"
        self.stats: StepStats = learner.stats  # the learner's own accumulators: step_module checks into them
        self.peak_inflight_bytes = 0  # over the last epoch: bytes of the messages posted and not yet completed
        # parameters' dtype: a float64 network is probed (and trained) in float64
        self._param_dtype = next(self.model.parameters()).dtype
        self._in_shape, self._in_dtype = self._probe(input_shape)
        # InfoPro's image01 travels with the batch, in the dtype its loss computes in (that of the
        # parameters, at least fp32: see models.heads.upcast), so casting it before sending changes
        # nothing the loss sees, and the receiver knows the dtype to post
        self._image_shape = tuple(input_shape)
        self._image_dtype = torch.promote_types(self._param_dtype, torch.float32)

    # -- shapes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _probe(self, input_shape):
        """Per-sample shape and dtype of this stage's input: a one-sample forward of the modules
        before it, in eval mode so that no batch-norm statistic moves."""
        was = self.model.training
        self.model.eval()
        try:
            h = torch.zeros((1, *input_shape), device=self.device, dtype=self._param_dtype)
            with self.learner.autocast():
                for j in range(self.modules[0]):
                    h = self.model.blocks[j](h)
        finally:
            self.model.train(was)
        return tuple(h.shape[1:]), h.dtype

    # -- failure handling ------------------------------------------------------------------------
    def _flag(self) -> str | None:
        """A peer's failure message, if one was written (raises when the store is unreachable)."""
        if self.store is not None and self.store.check([FAIL_KEY]):
            return self.store.get(FAIL_KEY).decode()
        return None

    def _failed_elsewhere(self) -> str | None:
        try:
            return self._flag()
        except Exception as e:  # the store's host is gone: so is the run
            return f"the rendezvous store is unreachable ({type(e).__name__}; its host rank exited?)"

    def _announce(self, msg: str) -> None:
        if self.store is None:
            return
        with contextlib.suppress(Exception):
            if not self.store.check([FAIL_KEY]):
                self.store.set(FAIL_KEY, msg)

    def _wait(self, works, what: str) -> None:
        """Wait until ``works`` have really completed, while Ctrl-C, a peer's failure flag and the
        deadline can still stop the wait.

        gloo's point-to-point works neither report completion before ``wait`` nor survive a
        timed-out ``wait`` (the connection is closed), so their blocking wait runs on a helper
        thread while this (main) thread waits on an event in short slices. NCCL's ``wait`` does not
        block the host at all (it only orders the current CUDA stream after the transfer), so
        returning from it proves nothing: a dead or hung peer would surface only at the NCCL
        watchdog, and a send "waited" for would still hold its GPU buffer. Their works are polled
        from the host instead (:func:`poll_works`)."""
        if not works:
            return
        error = None
        if self._pollable:
            try:
                outcome = poll_works(works, self.timeout_s, self._failed_elsewhere)
            except Exception as e:  # noqa: BLE001 - a work's own error, reported like gloo's below
                outcome, error = None, e
            if outcome is not None:
                self._gave_up(outcome, what)
        else:
            pending = self._waiter.submit(works)
            deadline = time.monotonic() + self.timeout_s
            while not pending.done.wait(0.25):
                other = self._failed_elsewhere()
                if other is not None:
                    self._gave_up(("failed", other), what)
                if time.monotonic() >= deadline:
                    self._gave_up(("timeout", None), what)
            error = pending.error
        if error is not None:
            # a peer that failed first has usually said why by now
            other = self._failed_elsewhere()
            if other is None:
                time.sleep(0.5)
                other = self._failed_elsewhere()
            first = str(error).splitlines()[0] if str(error) else ""
            cause = other or f"{type(error).__name__}: {first}"
            raise PipelineError(f"pipeline stage {self.stage} (rank {self.rank}) lost {what}: {cause}") from None
        # a wait that completed at once never looked at the flag: a send to a dead peer can complete
        # (the bytes fit the socket buffer), and a rank upstream of the failure would then run its
        # whole epoch into the void and report success
        other = self._failed_elsewhere()
        if other is not None:
            self._gave_up(("failed", other), what)

    def _gave_up(self, outcome, what: str) -> NoReturn:
        kind, other = outcome
        if kind == "failed":
            raise PipelineError(f"pipeline stage {self.stage} (rank {self.rank}) stopped while waiting for "
                                f"{what}: {other}")
        raise PipelineError(f"pipeline stage {self.stage} (rank {self.rank}): no progress on {what} for "
                            f"{self.timeout_s:.0f} s (a peer hung?)")

    @contextlib.contextmanager
    def guard(self):
        """Around every piece of pipeline work: an error or Ctrl-C here is announced to every rank
        (the failure flag) and re-raised as one :class:`PipelineError` line."""
        try:
            yield
        except PipelineError as e:
            self._announce(str(e))
            raise
        except KeyboardInterrupt:
            msg = f"pipeline stage {self.stage} (rank {self.rank}) was interrupted (Ctrl-C)"
            self._announce(msg)
            raise PipelineError(msg) from None
        except Exception as e:
            # a collective that fails because a peer left (gloo: the connection closed) says nothing
            # of why; the peer wrote its reason to the flag before it left
            other = None
            with contextlib.suppress(Exception):
                other = self._flag()
            if other is not None:
                raise PipelineError(f"pipeline stage {self.stage} (rank {self.rank}) stopped: {other}") from e
            first = str(e).splitlines()[0] if str(e) else ""
            msg = f"pipeline stage {self.stage} (rank {self.rank}) failed: {type(e).__name__}: {first}"
            self._announce(msg)
            raise PipelineError(msg) from e

    # -- point to point --------------------------------------------------------------------------
    def _p2p(self, ops):
        return dist.batch_isend_irecv(ops) if ops else []

    def _post_recv(self, n: int, with_image: bool = False):
        """Receive buffers for a batch of ``n``: activations, labels (and InfoPro's image01)."""
        tensors = [torch.empty((n, *self._in_shape), dtype=self._in_dtype, device=self.device),
                   torch.empty((n,), dtype=torch.int64, device=self.device)]
        if with_image:
            tensors.append(torch.empty((n, *self._image_shape), dtype=self._image_dtype, device=self.device))
        works = self._p2p([dist.P2POp(dist.irecv, t, self.prev, self.group) for t in tensors])
        return works, tensors

    def _post_send(self, tensors, dst=None):
        """Activations go forward (default: to the next stage); gradients go back (``dst``)."""
        tensors = [t.contiguous() for t in tensors]
        dst = self.next if dst is None else dst
        return self._p2p([dist.P2POp(dist.isend, t, dst, self.group) for t in tensors]), tensors

    _KINDS = {"local": 1, "global": 2, "eval": 3}

    def _check_sizes(self, sizes: Sequence[int], kind: str) -> list[int]:
        """Every stage must run the same kind of pass (local, global, evaluation) over the same batch
        sizes (they size the receive buffers): stage 0's are broadcast and compared, so a rank that
        resumed elsewhere or was given other data fails here with a message, not in a hang."""
        sizes = [int(s) for s in sizes]
        mine = torch.tensor([self._KINDS[kind]] + sizes, dtype=torch.int64, device=self.device)
        count = torch.tensor([mine.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(count, self.ranks[0], group=self.group)
        ref = mine.clone() if int(count) == mine.numel() else torch.zeros(int(count), dtype=torch.int64,
                                                                          device=self.device)
        dist.broadcast(ref, self.ranks[0], group=self.group)
        if not torch.equal(ref, mine):
            theirs = {v: k for k, v in self._KINDS.items()}.get(int(ref[0]), "?")
            raise PipelineError(f"pipeline stage {self.stage} (rank {self.rank}) was to run a {kind} pass over "
                                f"{len(sizes)} batches, stage 0 a {theirs} pass over {int(count) - 1} (or other batch "
                                "sizes): every rank must resume from the same checkpoint and run the same data flags")
        return sizes

    # -- local epochs ----------------------------------------------------------------------------
    def _local_modules(self, h, y, image01, n):
        learner = self.learner
        h = learner.prepare_input(h)
        for j in self.modules:
            h = learner.local_module(j, h, y, image01, n)
        learner.end_step()
        return h.detach()

    def local_epoch(self, sizes: Sequence[int], batch_fn: Callable[[int], tuple] | None,
                    steps: Sequence[int] | None = None) -> None:
        """Local steps on every batch of the epoch. ``sizes``: the batch sizes (all ranks);
        ``batch_fn(t) -> (x, y, image01 or None)``: stage 0 only; ``steps``: the batch indices to
        run (default all; a resumed epoch starts later)."""
        with self.guard():
            self._local_epoch(self._check_sizes(sizes, "local"), batch_fn, steps)

    def _local_epoch(self, sizes, batch_fn, steps):
        steps = list(range(len(sizes))) if steps is None else list(steps)
        meter = _Meter()
        recvs, sends = _Inflight(meter), _Inflight(meter)
        # receives for the first `depth` batches are posted at once: they overlap this rank's compute
        posted = 0
        if not self.first:
            while posted < min(self.depth, len(steps)):
                recvs.push(*self._post_recv(sizes[steps[posted]], self.needs_image))
                posted += 1
        for k, t in enumerate(steps):
            n = sizes[t]
            if self.first:
                x, y, image01 = self._fetch(batch_fn, t, n)
            else:
                works, tensors = recvs.pop()
                self._wait(works, f"batch {t} from stage {self.stage - 1}")
                x, y = tensors[0], tensors[1]
                image01 = tensors[2] if self.needs_image else None
                if posted < len(steps):
                    recvs.push(*self._post_recv(sizes[steps[posted]], self.needs_image))
                    posted += 1
            out = self._local_modules(x, y, image01, n)
            if self.last:
                self.stats.add_correct(out, y)
            else:
                # at most `depth` batches queued towards the next stage: wait for the oldest first
                while len(sends.items) >= self.depth:
                    self._wait(sends.pop()[0], f"sending batch to stage {self.stage + 1}")
                send = [out, y] + ([image01.to(self._image_dtype)] if self.needs_image else [])
                sends.push(*self._post_send(send))
            self.stats.end_step(n)
            del x, out
        while sends.items:
            self._wait(sends.pop()[0], f"sending batch to stage {self.stage + 1}")
        self.peak_inflight_bytes = meter.peak

    def _fetch(self, batch_fn, t, n, need_image=None):
        if batch_fn is None:
            raise PipelineError("pipeline stage 0 needs the data (batch_fn)")
        b = batch_fn(t)
        x, y = b[0], b[1]
        image01 = b[2] if len(b) > 2 else None
        if x.shape[0] != n or y.shape[0] != n:
            raise PipelineError(f"pipeline stage 0: batch {t} has {x.shape[0]} samples, the epoch said {n}")
        if (self.needs_image if need_image is None else need_image) and image01 is None:
            raise PipelineError("pipeline stage 0: InfoPro's decoders need image01 with every batch")
        return x, y, image01

    # -- global epochs ---------------------------------------------------------------------------
    def global_epoch(self, sizes: Sequence[int], batch_fn: Callable[[int], tuple] | None,
                     steps: Sequence[int] | None = None) -> None:
        """Synchronous pipelined global steps on every batch of the epoch (arguments as
        :meth:`local_epoch`)."""
        with self.guard():
            sizes = self._check_sizes(sizes, "global")
            meter = _Meter()
            for t in (range(len(sizes)) if steps is None else steps):
                x = y = image01 = None
                if self.first:
                    x, y, image01 = self._fetch(batch_fn, t, sizes[t])
                self._global_step(sizes[t], x, y, image01, t, meter)
            self.peak_inflight_bytes = meter.peak

    def global_step(self, n: int, x=None, y=None, image01=None) -> None:
        """One pipelined global step on a batch of ``n`` (``x``, ``y`` and, for InfoPro's decoders,
        ``image01`` on stage 0 only)."""
        with self.guard():
            if self.first and self.needs_image and image01 is None:
                raise UserError("global_step: InfoPro's decoders need image01 on stage 0")
            meter = _Meter()
            self._global_step(n, x, y, image01, 0, meter)
            self.peak_inflight_bytes = meter.peak

    def _global_step(self, n, x, y, image01, t, meter):
        """GPipe order: the forwards of all micro-batches, then their backwards, in micro-batch
        order on every stage (:func:`p2p_order`). Each neighbour pair then posts its matching
        operations in the same order, which is what NCCL needs: its sends and receives between two
        ranks run in order on one stream and, past its buffer size, a send blocks until the receive
        is posted -- a last stage that sent gradient m before receiving micro-batch m+1, while its
        predecessor was still sending micro-batch m+1 before receiving gradient m, waited forever.
        The last stage still runs each micro-batch's backward at once (its graph is freed at once);
        only the input gradients wait for the backward phase."""
        model, learner, stats = self.model, self.learner, self.stats
        M = min(self.micro_batches, n)
        # the same cut on every rank: torch.tensor_split's sizes
        parts = [len(c) for c in torch.arange(n).tensor_split(M)]
        with_image = self.needs_image  # InfoPro's heads reconstruct the image on every stage
        sends, recvs = _Inflight(meter), _Inflight(meter)
        saved, logits_all, ys = [], [], []
        final_sum = None
        # forward phase
        for m, nm in enumerate(parts):
            if self.first:
                a = sum(parts[:m])
                h_in, y_m = x[a:a + nm], y[a:a + nm]
                img_m = image01[a:a + nm].to(self._image_dtype) if with_image else None
            else:
                recvs.push(*self._post_recv(nm, with_image))
                works, tensors = recvs.pop()
                self._wait(works, f"micro-batch {m} of batch {t} from stage {self.stage - 1}")
                h_in, y_m = tensors[0].requires_grad_(True), tensors[1]
                img_m = tensors[2] if with_image else None
            w = nm / n
            h = learner.prepare_input(h_in)
            for j in self.modules:
                with learner.autocast():
                    h = model.blocks[j](h)
                if j < self.J - 1 and self.has_heads:
                    # eq. 4: the head's own loss on detached features, its graph freed right here
                    learner.head_loss(j, h, y_m, img_m, nm, weight=w)
            if self.last:
                logits, loss = learner.final_backward(h, y_m, weight=w)  # eq. 3: the backbone from the final loss only
                final_sum = loss.detach() * w if final_sum is None else final_sum + loss.detach() * w
                logits_all.append(logits.detach())
                ys.append(y_m)
                saved.append((h_in, None))
                del logits, loss
            else:
                sends.push(*self._post_send([h.detach(), y_m] + ([img_m] if with_image else [])))
                saved.append((h_in, h))
        # every forward message is delivered before any gradient is waited for
        while sends.items:
            self._wait(sends.pop()[0], f"sending a micro-batch of batch {t} to stage {self.stage + 1}")
        # backward phase
        for m, (h_in, h) in enumerate(saved):
            if not self.last:
                recvs.push(*self._p2p_recv_grad(h))
                works, (g,) = recvs.pop()
                self._wait(works, f"gradients of micro-batch {m} of batch {t} from stage {self.stage + 1}")
                h.backward(g.to(h.dtype))
                del g
            if not self.first:
                sends.push(*self._post_send([h_in.grad], self.prev))
                h_in.grad = None
            saved[m] = None  # this micro-batch's graph is done with
        while sends.items:
            self._wait(sends.pop()[0], f"sending gradients of batch {t} to stage {self.stage - 1}")
        del saved
        learner.step_modules(self.modules)
        if self.last:
            stats.add(self.J - 1, final_sum, n)
            stats.add_correct(torch.cat(logits_all), torch.cat(ys))
        stats.end_step(n)

    def _p2p_recv_grad(self, h):
        g = torch.empty_like(h, memory_format=torch.contiguous_format)
        return self._p2p([dist.P2POp(dist.irecv, g, self.next, self.group)]), (g,)

    # -- epochs, evaluation and metrics ----------------------------------------------------------
    def train_epoch(self, phase: str, sizes, batch_fn, steps=None) -> None:
        """``phase``: "local" or "global" (the learner's phase of this epoch)."""
        if phase == "local":
            self.local_epoch(sizes, batch_fn, steps)
        elif phase == "global":
            self.global_epoch(sizes, batch_fn, steps)
        else:
            raise UserError(f"pipeline phase {phase!r} is not local or global")

    def reduce_stats(self) -> dict:
        """Every module's losses, the accuracy and the non-finite markers of this epoch, summed over
        the stages (each contributed only its own modules); the same dict ``StepStats.read`` gives, on
        every rank."""
        with self.guard():
            s = self.stats
            own = torch.zeros(self.J, dtype=torch.bool, device=s.loss_sum.device)
            own[self.modules] = True
            loss = torch.where(own, s.loss_sum, torch.zeros_like(s.loss_sum))
            correct = s.final_correct.clone() if self.last else torch.zeros_like(s.final_correct)
            bad = torch.stack([s.first_bad, s.first_bad_grad])
            bad = torch.where(own.unsqueeze(0), bad, torch.full_like(bad, -1))
            for t, op in ((loss, dist.ReduceOp.SUM), (correct, dist.ReduceOp.SUM), (bad, dist.ReduceOp.MAX)):
                dist.all_reduce(t, op=op, group=self.group)
            # the sums go into a copy: this rank's accumulators stay its own (a mid-epoch call, e.g. the
            # finiteness check before a checkpoint, must not count the other stages twice later)
            whole = StepStats(self.J, s.loss_sum.device)
            whole.load_state_dict(s.state_dict())
            whole.loss_sum.copy_(loss)
            whole.final_correct.copy_(correct)
            whole.first_bad.copy_(bad[0])
            whole.first_bad_grad.copy_(bad[1])
            peak = torch.tensor([self.peak_inflight_bytes], dtype=torch.int64, device=s.loss_sum.device)
            peaks = [torch.zeros_like(peak) for _ in range(self.S)]
            dist.all_gather(peaks, peak, group=self.group)
            out = whole.read()
            out["peak_inflight_bytes"] = [int(p) for p in peaks]
            return out

    @torch.no_grad()
    def evaluate(self, sizes, batch_fn, eval_heads: bool = True) -> dict:
        """Test accuracy and loss of the network and of every aux head, pipelined like the local
        epochs (no backward), gathered to every rank: the dict ``LocalLearner.evaluate`` returns."""
        with self.guard():
            sizes = self._check_sizes(sizes, "eval")
            model, dev = self.model, self.device
            was = model.training
            model.eval()
            learner = self.learner
            n_heads = learner.scored_heads(eval_heads)
            head_correct = torch.zeros(max(self.J - 1, 1), dtype=torch.int64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            sends = _Inflight()
            try:
                for t, n in enumerate(sizes):
                    if self.first:
                        x, y, _ = self._fetch(batch_fn, t, n, need_image=False)
                    else:
                        works, tensors = self._post_recv(n)
                        self._wait(works, f"test batch {t} from stage {self.stage - 1}")
                        x, y = tensors[0], tensors[1]
                    h = learner.prepare_input(x)
                    with learner.autocast():
                        for j in self.modules:
                            h = learner.eval_module(j, h, y, head_correct, n_heads)
                        if self.last:
                            logits = model.classifier(h)
                    if self.last:
                        learner.eval_score(logits, y, correct, loss_sum)
                    else:
                        while len(sends.items) >= self.depth:
                            self._wait(sends.pop()[0], f"sending test batch to stage {self.stage + 1}")
                        sends.push(*self._post_send([h, y]))
                while sends.items:
                    self._wait(sends.pop()[0], f"sending test batch to stage {self.stage + 1}")
            finally:
                model.train(was)
            for v in (head_correct, correct, loss_sum):
                dist.all_reduce(v, group=self.group)
            total = max(sum(sizes), 1)
            return {"test_acc": correct.item() / total, "test_loss": loss_sum.item() / total,
                    "head_acc": [c / total for c in head_correct[:n_heads].tolist()] if n_heads else None}

    # -- checkpoints -----------------------------------------------------------------------------
    def _owned(self, stage: int | None = None):
        """The modules stage ``stage`` (default: this one) trains, by name."""
        stage = self.stage if stage is None else stage
        m = self.model
        modules = range(*self.ranges[stage])
        parts = {f"blocks.{j}": m.blocks[j] for j in modules}
        parts.update({f"heads.{j}": m.heads[j] for j in modules if j < len(m.heads)})
        parts.update({f"decoders.{j}": m.decoders[j] for j in modules if j < len(m.decoders)})
        if stage == self.S - 1:
            parts["classifier"] = m.classifier
        return parts

    @torch.no_grad()
    def gather_model(self) -> None:
        """Every stage's trained modules (parameters and buffers) into every rank's copy of the
        network, broadcast from the rank that trains them: afterwards ``model`` on any rank is the
        whole trained network. Collective: every rank calls it. :meth:`save` does, so that the run's
        main checkpoint (rank 0's ``learner.state_dict()``) holds the trained network, usable for
        evaluation or export, rather than untrained copies of the other stages' modules; it costs one
        broadcast of the parameters per checkpoint. The copies only overwrite modules this rank
        never computes with, so training is unaffected."""
        for s in range(self.S):
            tensors = [t for part in self._owned(s).values() for t in part.state_dict().values()]
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            for dtype, group in by_dtype.items():
                if s == self.stage:
                    flat = torch.cat([t.reshape(-1) for t in group])
                else:
                    flat = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=self.device)
                dist.broadcast(flat, self.ranks[s], group=self.group)
                if s != self.stage:
                    for t, chunk in zip(group, flat.split([t.numel() for t in group])):
                        t.copy_(chunk.view(t.shape))

    def state_dict(self) -> dict:
        scaler = self.learner.scaler
        return {
            "stage": self.stage, "stages": self.S, "ranges": self.ranges, "J": self.J,
            "modules": {k: v.state_dict() for k, v in self._owned().items()},
            "optimizers": {j: self.learner.optimizers[j].state_dict() for j in self.modules},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "stats": self.stats.state_dict(),  # this stage's share of a mid-epoch checkpoint's accumulators
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["stage"], state["stages"], [tuple(r) for r in state["ranges"]], state["J"]) != (
                self.stage, self.S, self.ranges, self.J):
            raise UserError(f"--resume: the checkpoint is stage {state['stage']} of {state['stages']} with module "
                            f"ranges {state['ranges']}; this run is stage {self.stage} of {self.S} with {self.ranges} "
                            "(resume with the same --pipeline and --pipeline-balance)")
        parts = self._owned()
        for k, sd in state["modules"].items():
            parts[k].load_state_dict(sd)
        for j, sd in state["optimizers"].items():
            self.learner.optimizers[int(j)].load_state_dict(sd)
        if state.get("scaler") is not None and self.learner.scaler is not None:
            self.learner.scaler.load_state_dict(state["scaler"])
        self._saved_stats = state.get("stats")
        self.restore_stats()

    def restore_stats(self) -> None:
        """The accumulators of the last loaded checkpoint again: a mid-epoch resume calls it after
        the epoch's start has reset them (each stage holds its own modules' share)."""
        if getattr(self, "_saved_stats", None) is not None:
            self.stats.load_state_dict(self._saved_stats)

    def checkpoint_path(self, directory: str, tag: str | None = None) -> str:
        """``tag``: the name of the run checkpoint this stage file belongs to (e.g. its epoch), so that
        several kept checkpoints each have their stage files."""
        suffix = f"-{tag}" if tag else ""
        return os.path.join(directory, f"pipeline-stage{self.stage}-of{self.S}{suffix}.pt")

    def save(self, directory: str, tag: str | None = None) -> str:
        """This stage's file, written atomically (a crash mid-write leaves the previous one). It
        holds tensors, numbers, strings and containers only: :meth:`load` reads it with
        ``weights_only=True``. Collective: first every stage's trained modules are gathered into
        every rank's network (:meth:`gather_model`), so rank 0's main checkpoint is the whole
        trained network."""
        with self.guard():
            self.gather_model()
        os.makedirs(directory, exist_ok=True)
        path = self.checkpoint_path(directory, tag)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def prune(self, directory: str, keep_tags) -> None:
        """Delete this stage's files whose tag is not in ``keep_tags`` (the run checkpoints that are
        still kept): stage files follow the run's own checkpoint pruning."""
        prefix = f"pipeline-stage{self.stage}-of{self.S}-"
        keep = set(keep_tags)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            if name.startswith(prefix) and name.endswith(".pt") and name[len(prefix):-3] not in keep:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))

    def load(self, directory: str, tag: str | None = None) -> None:
        path = self.checkpoint_path(directory, tag)
        if not os.path.exists(path):
            raise UserError(f"--resume: {path} is missing (was the run saved with --pipeline {self.S}?)")
        try:
            # weights only: a checkpoint holds tensors and plain containers, never code to run
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # truncated, corrupt, or holding something other than weights
            raise UserError(f"--resume: {path} is corrupt or not a weights-only stage file "
                            f"({type(e).__name__})") from None
        self.load_state_dict(state)


def build_stage(learner, S: int, *, balance: str | Sequence[float] | None = None, depth: int = 2,
                micro_batches: int = 1, input_shape=(3, 32, 32), timeout_s: float = DEFAULT_TIMEOUT_S,
                group=None, ranks=None) -> StageRunner:
    """The stage runner of this rank. ``balance``: None = equal module counts (larger stages last,
    like ``--split even``), a string "2,1,1" = module counts per stage, a sequence of J floats =
    measured seconds per module (balanced by :func:`balance_by_time`)."""
    model = learner.model
    J = model.J
    # a stage runs its modules' eager steps itself: what the learner would have done otherwise
    # (compiled pieces, checkpointed or graphed steps, fp16 loss scaling) is refused, never ignored
    for on, what in ((learner.compiled is not None, "compile"), (learner.checkpoint_global, "checkpoint_global"),
                     (learner.graphed is not None, "cuda_graphs"), (learner.scaler is not None, "fp16 amp")):
        if on:
            raise UserError(f"build_stage: a pipeline stage runs eager steps; build the LocalLearner without {what}")
    why = learner.method.refusal("pipeline")
    if why:
        raise UserError(f"build_stage: {why}")
    if not 1 <= S <= J:
        raise UserError(f"--pipeline {S}: needs 1 <= S <= J (J={J} modules)")
    if balance is None:
        base, extra = divmod(J, S)
        counts = [base] * (S - extra) + [base + 1] * extra
        ranges = parse_balance(",".join(map(str, counts)), J, S)
    elif isinstance(balance, str):
        ranges = parse_balance(balance, J, S)
    else:
        if len(balance) != J:
            raise UserError(f"--pipeline-balance: {len(balance)} module times for J={J} modules")
        ranges = balance_by_time(balance, S)
    runner = StageRunner(learner, ranges, depth=depth, micro_batches=micro_batches, input_shape=input_shape,
                         timeout_s=timeout_s, group=group, ranks=ranks)
    return runner


def run_epoch(runner: StageRunner, *, phase: str, lr: float | None, sizes: Sequence[int], batch_fn,
              test_sizes: Sequence[int] | None = None, test_fn=None, eval_heads: bool = True,
              steps: Sequence[int] | None = None) -> dict:
    """One epoch as the trainer runs it, on every rank: the lr, the phase's steps, the stats
    gathered over the stages, the pipelined evaluation. ``batch_fn`` / ``test_fn`` are used on stage 0
    only (pass them everywhere or None elsewhere). Returns ``{"train": <StepStats.read() dict with
    peak_inflight_bytes per rank>, "eval": <evaluate dict or None>, "train_seconds": float}``."""
    if lr is not None:
        runner.learner.set_lr(lr)
    runner.model.train()
    if not steps or steps[0] == 0:
        runner.stats.reset()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    t0 = time.perf_counter()
    runner.train_epoch(phase, sizes, batch_fn if runner.first else None, steps)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    seconds = time.perf_counter() - t0
    train = runner.reduce_stats()
    ev = None
    if test_sizes is not None:
        ev = runner.evaluate(test_sizes, test_fn if runner.first else None, eval_heads)
    return {"train": train, "eval": ev, "train_seconds": seconds}


def exit_on_error(e: BaseException) -> None:
    """The CLI's way out of a failed pipeline: the one-line message on stderr and an immediate exit
    (status 130 for Ctrl-C, else 1). It skips the interpreter's teardown, which can block in the
    process group's destructor while a peer is gone."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130 if "interrupted" in msg else 1)


# ----------------------------------------------------------------------------------------------
# a local launcher (tests, benchmarks): S processes on this machine, gloo
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DONE_KEY = "pgl_fast/launcher/done"


def _leave_together(store, rank: int, world: int, *, failed: bool, timeout_s: float) -> None:
    """Rank 0 hosts the rendezvous store, and a pipeline rank polls it (the failure flag) while it
    waits for a peer: rank 0 leaving first makes every rank still at work fail with "store
    unreachable" -- a first stage whose sends all fit the socket buffers finishes its epoch before
    the last stage has received it. So every rank counts itself out, and rank 0 stays until all have,
    or (a rank killed never counts) until the failure flag has been up a second or its own run
    failed two seconds ago, or the deadline."""
    if store is None:
        return
    with contextlib.suppress(Exception):  # a store already gone: nothing left to keep up
        store.add(_DONE_KEY, 1)
        if rank != 0:
            return
        start = time.monotonic()
        flagged = None
        while time.monotonic() - start < timeout_s:
            if store.add(_DONE_KEY, 0) >= world:
                return
            now = time.monotonic()
            if flagged is None and store.check([FAIL_KEY]):
                flagged = now
            if (flagged is not None and now - flagged >= 1.0) or (failed and now - start >= 2.0):
                return
            time.sleep(0.02)


def _child(rank, world, port, fn, args, out_dir, threads, timeout_s):
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    code, result, store = 0, None, None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # held here so that rank 0's store outlives an ``fn`` that leaves the process group
        store = _default_store()
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent as text
        code = 1
        result = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    _leave_together(store, rank, world, failed=code != 0, timeout_s=timeout_s)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # a clean exit can block in the process group's teardown while a peer is dead: leave at once
    os._exit(code)


def run_local_group(fn, world: int, *args, threads: int = 1, timeout_s: float = 60.0,
                    join_timeout_s: float | None = None, on_start=None) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group; returns
    each rank's ``("ok", value)`` or ``("error", message, traceback)`` (``None``: no report, the rank
    died). ``on_start(processes)`` runs in the parent once they are started (tests kill one there).
    Any process still alive after ``join_timeout_s`` is killed and reported as ``("hung",)``."""
    # forkserver: the children fork from one clean server process that has imported torch once
    # (per parent), instead of each importing it again as "spawn" would; unlike a plain fork they
    # inherit no OpenMP or other threads from the parent
    ctx = mp.get_context("forkserver")
    # (torch.optim imports torch._dynamo on the first optimizer: a few seconds per process otherwise)
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", __name__])
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, out_dir, threads, timeout_s))
                 for r in range(world)]
        for p in procs:
            p.start()
        if on_start is not None:
            on_start(procs)
        deadline = time.monotonic() + (join_timeout_s if join_timeout_s is not None else timeout_s + 60)
        results = []
        for r, p in enumerate(procs):
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                p.kill()
                p.join()
                results.append(("hung",))
                continue
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append(None)
        return results
