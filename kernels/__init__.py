"""Fused Triton kernels for the auxiliary heads (installed as ``pgl_fast.kernels``).

Public API:

* :func:`conv_bn_relu` / :func:`conv_bn_relu_module`: fused 3x3 conv -> BatchNorm2d -> ReLU
  (-> global average pool) that saves only its input and per-channel statistics for backward.
* :func:`reference_conv_bn_relu`: the eager PyTorch reference the tests and benchmarks share.
* :func:`triton_available`: ``(ok, reason)`` for a device, so callers can fall back to eager.

Importing this package never imports Triton (so it works where Triton is missing, and
``TRITON_INTERPRET`` may still be set afterwards); the kernel module is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .reference import reference_conv_bn_relu

__all__ = ["conv_bn_relu", "conv_bn_relu_module", "reference_conv_bn_relu", "triton_available"]

_LAZY = {"conv_bn_relu", "conv_bn_relu_module", "triton_available"}

if TYPE_CHECKING:  # pragma: no cover
    from .conv_bn_relu import conv_bn_relu, conv_bn_relu_module, triton_available


def __getattr__(name: str):
    if name in _LAZY:
        # conv_bn_relu.py itself imports without triton (it reports it via triton_available)
        module = importlib.import_module(".conv_bn_relu", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
