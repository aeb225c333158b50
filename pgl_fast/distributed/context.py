"""Who this process is in a ``torchrun`` launch, and the collectives the engine needs.

``DistContext.from_env()`` reads what ``torchrun`` (``python -m torch.distributed.run``) exports
-- ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
-- and joins the default process group: gloo on the CPU, NCCL on CUDA (one device per local
rank, ``cuda:LOCAL_RANK``). Without
those variables it returns the single-process context, whose collectives are no-ops, so the same
training code runs either way.

Every process group is created with a timeout: a peer that died or hangs makes the others fail
with an error after ``timeout_s`` instead of blocking forever (torchrun tears the group down when a
worker exits with an error, but not when one is stuck).

Gradient buckets go through a second process group of their own (``grad_group``): they are
launched asynchronously and stay in flight while the next module's forward runs, and that forward
may itself issue blocking collectives (synchronised batch norm). NCCL runs one group's
collectives in order on one stream, so within one group those would wait behind the bucket; with
two groups they proceed independently (every rank issues the same sequence on each group, which
is all that matching requires).
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import UserError

# the variables torchrun sets for every worker; RANK and WORLD_SIZE decide whether we were launched
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = float(os.environ.get("PGL_FAST_DIST_TIMEOUT", "600"))


def launched_by_torchrun(env=None) -> bool:
    """True when this process is one worker of a torchrun launch (``WORLD_SIZE`` is set)."""
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env or "RANK" in env


def _int_var(env, name: str) -> int:
    raw = env.get(name)
    if raw is None:
        present = ", ".join(k for k in _LAUNCH_VARS if k in env) or "none"
        raise UserError(f"distributed launch: {name} is not set (found: {present}); start the run with "
                        "torchrun --nproc_per_node=N -m pgl_fast.train ..., or set RANK, WORLD_SIZE, LOCAL_RANK, "
                        "MASTER_ADDR and MASTER_PORT yourself")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"distributed launch: {name}={raw!r} is not an integer") from None


@dataclass
class DistContext:
    """This process's place in the run. ``world_size == 1`` is the single-process context: every
    collective returns its input unchanged and nothing is initialised."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    grad_group: object = None  # process group for gradient buckets (None: the default group)
    owns_group: bool = False   # whether shutdown() should destroy the default group

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "auto", *, backend: str | None = None, timeout_s: float | None = None,
                 env=None) -> "DistContext":
        """The context of this process: joined to torchrun's group when launched by it, else the
        single-process context on ``device`` ("auto": CUDA when available)."""
        env = os.environ if env is None else env
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        if timeout_s <= 0:
            raise UserError(f"distributed timeout must be > 0 seconds, got {timeout_s:g}")
        if not launched_by_torchrun(env):
            return cls(device=_single_device(device))
        rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
        local_rank = _int_var(env, "LOCAL_RANK")
        if world < 1 or not 0 <= rank < world:
            raise UserError(f"distributed launch: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        if local_rank < 0:
            raise UserError(f"distributed launch: LOCAL_RANK={local_rank} must be >= 0")
        dev = _rank_device(device, local_rank, int(env.get("LOCAL_WORLD_SIZE", world)))
        if backend is None:
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise UserError("distributed backend nccl needs CUDA devices; use gloo on the CPU")
        if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()) or (
                backend == "nccl" and not dist.is_nccl_available()):
            raise UserError(f"distributed backend {backend} is not available in this torch build")
        if world == 1:
            # torchrun --nproc_per_node=1: nothing to synchronise with
            return cls(device=dev, backend=None, timeout_s=timeout_s, local_rank=local_rank)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            _ = env.get(name) or _int_var(env, name)  # raises the one-line error when missing
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = datetime.timedelta(seconds=timeout_s)
        owns = False
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                        **({"device_id": dev} if dev.type == "cuda" else {}))
            except (RuntimeError, ValueError) as e:  # rendezvous failures: address in use, peer gone ...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"distributed launch: rank {rank} could not join the process group at "
                                f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} ({first})") from None
            owns = True
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise UserError(f"distributed launch: a process group already exists with rank {dist.get_rank()} of "
                            f"{dist.get_world_size()}, but the environment says rank {rank} of {world}")
        grad_group = dist.new_group(backend=backend, timeout=timeout)
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                   timeout_s=timeout_s, grad_group=grad_group, owns_group=owns)

    # -- who am I --------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, summaries and checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"DistContext(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"device={self.device}, backend={self.backend})")

    # -- collectives (no-ops in the single-process context) ---------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks: ``sum``, ``mean``, ``max`` or ``min``. Returns ``tensor``."""
        if not self.distributed:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"all_reduce_: op must be one of {', '.join(ops)}, got {op!r}")
        dist.all_reduce(tensor, op=ops[op])
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_sum(self, values) -> list:
        """Sum of a list of Python numbers over ranks (one collective, float64 on this rank's device)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.all_reduce_(t).tolist()

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value`` (one collective): how ranks agree on a signal that
        reached only some of them -- ``signum = ctx.max_int(signum or 0) or None`` at each step
        boundary makes every rank checkpoint and stop at the same step."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        return int(self.all_reduce_(t, op="max").item())

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, obj=None, src: int = 0):
        """``obj`` from rank ``src`` on every rank (pickled; for small things: paths, decisions)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn, *args, **kwargs):
        """Run ``fn`` on rank 0 only and hand its result to every rank. An exception on rank 0 is
        re-raised on every rank (a UserError with its own message), so that a decision which fails
        -- a bad ``--resume`` path, a refused output directory -- stops all ranks with the same one
        line instead of leaving the others waiting in the next collective."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
        if not self.distributed:
            if error is not None:
                raise error
            return result
        sent = self.broadcast_object((result, _picklable_error(error)) if self.is_main else None)
        if self.is_main and error is not None:
            raise error  # the original, with its traceback
        result, error = sent
        if error is not None:
            raise error
        return result

    def shutdown(self) -> None:
        """Leave the process group (only if this context created it)."""
        if self.distributed and self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            finally:
                self.owns_group = False


def _picklable_error(error: Exception | None) -> Exception | None:
    """``error`` itself when it pickles (UserError and the builtins do), else a UserError with its
    first line: the other ranks need the message, not the object."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return UserError(f"rank 0: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def _single_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
    return dev


def _rank_device(device: str, local_rank: int, local_world: int) -> torch.device:
    """One device per local rank: cuda:LOCAL_RANK on a GPU machine, the CPU otherwise."""
    kind = torch.device("cuda" if torch.cuda.is_available() else "cpu").type if device == "auto" \
        else torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise UserError(f"distributed launch: LOCAL_RANK={local_rank} but only {n} GPU(s) are visible; "
                            f"use --nproc_per_node={n} or fewer")
        if device not in ("auto", "cuda") and torch.device(device).index not in (None, local_rank):
            raise UserError(f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
