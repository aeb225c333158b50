"""The one eager reference for the fused aux-head kernels.

Tests and benchmarks both import this module, so what the fused kernels are checked against and
what they are timed against cannot drift apart. Everything here is plain PyTorch (cuDNN on CUDA):
``F.conv2d`` -> ``F.batch_norm`` -> ``relu`` -> optional mean over H, W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reference_conv_bn_relu", "saved_tensor_bytes"]


def reference_conv_bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    stride: int,
    training: bool,
    momentum: float,
    eps: float,
    pool: bool,
) -> torch.Tensor:
    """Eager 3x3 conv (padding 1, no bias) -> BatchNorm2d -> ReLU -> optional global average pool.

    Same semantics as :func:`pgl_fast.kernels.conv_bn_relu`: the conv runs in ``x.dtype`` (the weight
    is cast to it, as autocast would), ``training=True`` normalises with batch statistics and updates
    ``running_mean``/``running_var`` in place (unbiased variance, ``momentum``), ``training=False``
    normalises with the running statistics. Returns ``[B, C_out]`` when ``pool`` else
    ``[B, C_out, H_out, W_out]``.
    """
    y = F.conv2d(x, weight.to(x.dtype), bias=None, stride=stride, padding=1)
    y = F.batch_norm(
        y, running_mean, running_var, bn_weight, bn_bias, training=training, momentum=momentum, eps=eps
    )
    y = torch.relu(y)
    return y.mean(dim=(2, 3)) if pool else y


def saved_tensor_bytes(fn) -> tuple[int, object]:
    """Run ``fn()`` and return ``(bytes saved for backward, fn's result)``.

    Counts every tensor autograd packs (``torch.autograd.graph.saved_tensors_hooks``) as
    ``numel * element_size``, each storage once (keyed by its data pointer), so a tensor saved by
    two ops, or an op's input that is also the previous op's output, is not counted twice. A
    measurement helper shared by the tests and the benchmarks.
    """
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        sizes[key] = max(sizes.get(key, 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(sizes.values()), result
