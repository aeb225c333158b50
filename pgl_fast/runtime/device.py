"""Which CUDA device is *current* while the engine launches work.

A tensor on ``cuda:1`` makes torch's own operators run on device 1 whatever device is current,
but several things follow the current device instead: a new ``torch.cuda.Stream`` and the
CUDA-graph capture stream, ``torch.cuda.current_stream()`` and the events recorded on it, a graph's
replay, and Triton launches (which take the current device's stream while the pointers are device
1's). So every place that launches work -- the learner's steps and evaluation, the graph capture
and replay, the head-kernel measurement, the trainer's loop -- enters the model's device with
:func:`device_context`. It is a context, not a ``torch.cuda.set_device`` at construction: it holds
whatever the caller, another learner on another device or a library did to the current device in
between, and it gives the caller's current device back afterwards. Entering it costs two driver
calls (get and set the device), nothing next to a training step.
"""
from __future__ import annotations

import contextlib

import torch


def device_context(device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device with an index; a no-op for the CPU (and for
    a bare ``cuda``, which means the current device already)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)
