"""The one eager reference for the fused aux-head kernels.

Tests and benchmarks both import this module, so what the fused kernels are checked against and
what they are timed against cannot drift apart. Everything here is plain PyTorch (cuDNN on CUDA):
``F.conv2d`` -> ``F.batch_norm`` -> ``relu`` -> optional mean over H, W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TF32_TOLERANCE", "TOLERANCES", "reference_conv_bn_relu", "saved_tensor_bytes"]

# (atol, rtol) of the fused kernels against this reference computed in float64, per input dtype;
# shared by the tests and the benchmarks' correctness checks. atol is relative to the largest
# |reference| value of the compared tensor (outputs and gradients have very different magnitudes),
# rtol is per element.
TOLERANCES = {
    # fp32: operands are exact; only the fp32 accumulation/reduction order differs from float64
    # (observed <= 1e-6 of max); 1e-5 leaves room for bigger reductions on the GPU. Holds for IEEE
    # fp32 dots only: with TF32 (torch.backends.cudnn.allow_tf32 on CUDA) see TF32_TOLERANCE.
    torch.float32: (1e-5, 1e-5),
    # fp16: conv output, statistics and BN are fp32; the errors come from rounding the stored output
    # and the transient BN-input gradient to fp16 (2**-11 relative), the latter summed again by the
    # dgrad/wgrad convs (observed ~6e-4 of max); 4e-3 = 8 ulps.
    torch.float16: (4e-3, 4e-3),
    # bf16: same path with 2**-8 precision; the CPU interpreter even *truncates* fp32 -> bf16
    # stores (the GPU rounds to nearest), so a stored value can be off by one full bf16 ulp
    # (0.4%), and dgrad/wgrad sum those (observed ~5e-3 of max); 2e-2 = 5 ulps.
    torch.bfloat16: (2e-2, 2e-2),
}
# fp32 inputs with TF32 dots: the conv operands are rounded to a 10-bit mantissa (2**-11 relative,
# like fp16) before an fp32-accumulated dot, so fp16's budget applies; cuDNN's own TF32 convs in
# backward add the same kind of error.
TF32_TOLERANCE = (4e-3, 4e-3)


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
