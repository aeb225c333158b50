"""Fused Triton kernels for the auxiliary heads (installed as ``pgl_fast.kernels``).

Public API:

* :func:`conv_bn_relu` / :func:`conv_bn_relu_module`: fused 3x3 conv -> BatchNorm2d -> ReLU
  (-> global average pool) that saves only its input and per-channel statistics for backward.
* :func:`reference_conv_bn_relu`: the eager PyTorch reference the tests and benchmarks share.
* :func:`triton_available`: ``(ok, reason)`` for a device, so callers can fall back to eager.

Importing this package does not fail where Triton is missing: the kernel module guards its
``import triton`` and reports the problem through :func:`triton_available` and a ``RuntimeError``
on use. Set ``TRITON_INTERPRET=1`` *before* importing this package to run the kernels on the CPU.
"""

import importlib

from .reference import reference_conv_bn_relu

__all__ = ["conv_bn_relu", "conv_bn_relu_module", "reference_conv_bn_relu", "triton_available"]
_LAZY = ("conv_bn_relu", "conv_bn_relu_module", "triton_available")


def __getattr__(name: str):
    # The kernel module imports triton (~80 MiB resident, about a second), which a CPU run with eager
    # heads -- the default there -- never uses: it is imported on the first use of its names.
    if name in _LAZY:
        mod = importlib.import_module(".conv_bn_relu", __name__)
        # importing the submodule bound its name to the module: the package's name is the function
        globals().update({n: getattr(mod, n) for n in _LAZY})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
