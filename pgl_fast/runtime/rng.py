"""The random streams that training itself draws from (dropout), apart from the data order.

The data order and the augmentation come from the trainer's own seeded generator, shared by every
rank. What draws from torch's *default* generators during a step is the model: dropout (and any
random op a user's network adds). Two rules keep those draws exact in every combination:

- **One stream per rank.** Under data parallel every rank starts from the same ``--seed`` (the
  network is built identically everywhere), so without more every rank would draw the *same*
  dropout masks for its different samples. Each rank's default generators are therefore reseeded
  with :func:`rank_seed` ``(seed, rank)``: distinct for distinct ranks, the same on every restart.
  The masks of a global batch are then the union of the ranks' independent draws. They are not
  the masks one process would draw for the whole batch: that would need every rank to draw the
  masks of the whole global batch and keep its slice, inside every dropout layer of the user's
  network (world-size times the random numbers, and a dropout replaced by a slicing one), and
  still not equal torch's fused single-process dropout kernel, which draws in its own layout.
- **Side work leaves the streams untouched.** Work that runs training steps only to throw them
  away (the CUDA-graph warm-up) runs inside :func:`preserved_rng`, which puts back the CPU
  generator and the device generator's seed and Philox offset.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """The splitmix64 finaliser: a bijection of 64-bit integers that scatters nearby inputs."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
    return z ^ (z >> 31)


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """The seed of rank ``rank``'s default generators in a run seeded with ``seed`` (``more``:
    further integers folded in, e.g. where a stream is re-derived). For a fixed ``seed`` distinct
    ranks get distinct seeds: every fold is a bijection of the 64-bit state."""
    z = int(seed) & _MASK64
    for v in (rank, *more):
        z = _mix64((z + (int(v) + 1) * _GOLDEN) & _MASK64)
    return z


def seed_rank_streams(seed: int, rank: int, *more: int) -> int:
    """Seed torch's default generators (the CPU one and every CUDA device's) for ``rank``; returns
    the seed used."""
    s = rank_seed(seed, rank, *more)
    torch.manual_seed(s)
    return s


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Run the body, then restore the CPU generator and, for a CUDA ``device``, that device's
    generator (its seed and Philox offset), so that the body's random draws leave no trace."""
    device = torch.device(device)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
