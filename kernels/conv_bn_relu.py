"""Fused 3x3 conv -> training BatchNorm2d -> ReLU (-> global average pool) for the aux heads.

Why: an eager head saves the conv output *and* the ReLU output for backward, two full-resolution
tensors per head per step. Here the forward keeps only the head input ``x``, the (tiny) weights and
the per-channel batch ``mean``/``rstd``; everything at full resolution is recomputed from ``x`` when
needed (the "conv + statistics, finalize, apply" split that cuDNN uses to fuse BatchNorm into a
convolution).

The pieces, bottom up::

    _conv3x3_tile                         shared @triton.jit helper: one implicit-GEMM conv tile
    _conv_bn_relu_fwd_stats_kernel        pass 1: conv + per-sample, per-channel mean / M2
    _conv_bn_relu_fwd_kernel              pass 2: conv again + BN + ReLU + (GAP | store)
    _conv_bn_relu_bwd_reduce_kernel       bwd 1: conv again + ReLU mask -> sum(dz), sum(dz * xhat)
    _conv_bn_relu_bwd_kernel              bwd 2: conv again -> BN-input gradient dy
    conv_bn_relu_fwd / conv_bn_relu_bwd   launchers (checks, allocation, launch, tiny finalizes)
    record_launches                       the launchers' launches on meta tensors, not run
                                          (kernels/lowering.py compiles exactly those for a GPU)
    _ConvBnReLUFunction                   torch.autograd.Function
    conv_bn_relu, conv_bn_relu_module     public API

Work split: every program owns one sample and one block of output channels and walks that
sample's output positions tile by tile, so the per-sample pooled sums and the per-sample statistic
partials are produced without atomics (deterministic run to run). The partials (``[B, C_out]``
fp32) are reduced in torch ("finalize"; a few tiny launches). Under
``torch.use_deterministic_algorithms(True)`` nothing here raises: the finalize ops are deterministic
and ``aten.convolution_backward`` then restricts cuDNN to its deterministic algorithms.

Statistics: each program merges its tiles' (mean, M2) with Chan's parallel formula, and the
finalize merges the samples the same way, so the variance never comes from E[y^2] - E[y]^2
(catastrophic cancellation when |mean| >> std). Conv accumulation, statistics, BN and the pooled sum
are fp32; the conv operands are in ``x.dtype`` (the weight is cast to it, as autocast does); the
result is stored once in ``x.dtype``.

Backward choices:

* The BN-input gradient ``dy`` ([B, C_out, H_out, W_out], ``x.dtype``) is materialised
  *transiently* inside backward and freed before backward returns; nothing full-resolution is kept
  between forward and backward.
* The two convolution GEMMs of backward, dgrad (transposed conv of ``dy``) and wgrad, are done by
  ``torch.ops.aten.convolution_backward`` (cuDNN on CUDA). A Triton dgrad with stride 2 and a
  split-K wgrad are possible, but at these widths (16-64 channels) they are not expected to beat
  cuDNN's GEMMs, and the memory win does not depend on them. The ReLU/BN/pool parts of backward are
  Triton.

Precision of fp32 inputs on CUDA follows ``torch.backends.cudnn.allow_tf32`` (what ``F.conv2d``
would do): TF32 tensor cores when it is on, exact IEEE fp32 dots otherwise.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, NamedTuple

import torch
from torch import nn

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install that fails while importing
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _NoTriton:
        """Stand-in so this module still imports (and can explain itself) without triton."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

__all__ = ["conv_bn_relu", "conv_bn_relu_module", "triton_available", "conv_bn_relu_fwd", "conv_bn_relu_bwd"]

_NO_DEVICE_MSG = (
    "Triton head kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU; use --head-kernels eager"
)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _conv3x3_tile(
    x_ptr,  # [B, C_in, H, W] input, any dense layout (strides below)
    w_ptr,  # [3, 3, C_in, C_out] weight, contiguous, already in the dot dtype
    pid_b,  # int64 sample index of this program
    offs_p,  # [BLOCK_M] flattened output positions oh * W_out + ow
    p_mask,  # [BLOCK_M] offs_p < H_out * W_out
    offs_n,  # [BLOCK_N] output channels
    n_mask,  # [BLOCK_N] offs_n < C_out
    # sizes
    C_in, H, W, C_out, W_out,
    # input strides (elements)
    stride_xb, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Implicit-GEMM tile of a 3x3, padding-1 conv: [BLOCK_M positions, BLOCK_N channels], fp32."""
    oh = offs_p // W_out
    ow = offs_p % W_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # pid_b is int64, so the sample offset cannot overflow at B=1024 x large images; offsets
    # inside one sample (< C_in*H*W elements) stay comfortably in int32.
    x_sample = x_ptr + pid_b * stride_xb
    for kh in tl.static_range(3):
        ih = oh * STRIDE + (kh - 1)
        h_ok = (ih >= 0) & (ih < H)
        for kw in tl.static_range(3):
            iw = ow * STRIDE + (kw - 1)
            # zero padding = masked loads outside the image
            m_ok = p_mask & h_ok & (iw >= 0) & (iw < W)
            x_rows = x_sample + ih * stride_xh + iw * stride_xw
            w_tap = w_ptr + (kh * 3 + kw) * C_in * C_out
            for c0 in range(0, C_in, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < C_in
                a = tl.load(
                    x_rows[:, None] + offs_k[None, :] * stride_xc,
                    mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_tap + offs_k[:, None] * C_out + offs_n[None, :],
                    mask=k_ok[:, None] & n_mask[None, :],
                    other=0.0,
                )
                if DOT_FP32:
                    # fp32 inputs, or the CPU interpreter (whose numpy dot cannot take bf16);
                    # bf16/fp16 -> fp32 is exact, so the result equals a 16-bit dot with fp32 acc.
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _conv_bn_relu_fwd_stats_kernel(
    x_ptr,  # [B, C_in, H, W]
    w_ptr,  # [3, 3, C_in, C_out]
    mean_part_ptr,  # [B, C_out] fp32 out: per-sample channel mean of the conv output
    m2_part_ptr,  # [B, C_out] fp32 out: per-sample sum of squared deviations from that mean
    # sizes
    C_in, H, W, C_out, H_out, W_out,
    # input strides
    stride_xb, stride_xc, stride_xh, stride_xw,
    # meta-parameters
    STRIDE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # int64 program ids: pid_b feeds pointer offsets that can exceed 2**31 at large batch/size
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    P = H_out * W_out

    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_M):
        offs_p = p0 + tl.arange(0, BLOCK_M)
        p_mask = offs_p < P
        y = _conv3x3_tile(
            x_ptr, w_ptr, pid_b, offs_p, p_mask, offs_n, n_mask,
            C_in, H, W, C_out, W_out,
            stride_xb, stride_xc, stride_xh, stride_xw,
            STRIDE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
        )
        valid = p_mask[:, None]
        n_t = tl.minimum(P - p0, BLOCK_M).to(tl.float32)
        t_mean = tl.sum(tl.where(valid, y, 0.0), axis=0) / n_t
        d = tl.where(valid, y - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        # Chan et al. merge of the running (count, mean, m2) with this tile's (n_t, t_mean, t_m2);
        # every earlier tile was full, so the running count is simply p0
        count = tl.cast(p0, tl.float32)
        new_count = count + n_t
        delta = t_mean - mean
        mean = mean + delta * (n_t / new_count)
        m2 = m2 + t_m2 + delta * delta * (count * n_t / new_count)

    part = pid_b * C_out + offs_n
    tl.store(mean_part_ptr + part, mean, mask=n_mask)
    tl.store(m2_part_ptr + part, m2, mask=n_mask)


@triton.jit
def _conv_bn_relu_fwd_kernel(
    x_ptr,  # [B, C_in, H, W]
    w_ptr,  # [3, 3, C_in, C_out]
    mean_ptr,  # [C_out] fp32 normalisation mean (batch or running)
    rstd_ptr,  # [C_out] fp32 1 / sqrt(var + eps)
    gamma_ptr,  # [C_out] BN weight
    beta_ptr,  # [C_out] BN bias
    out_ptr,  # [B, C_out] (POOL) or [B, C_out, H_out, W_out], x.dtype
    # sizes
    C_in, H, W, C_out, H_out, W_out,
    # input strides
    stride_xb, stride_xc, stride_xh, stride_xw,
    # output strides (h/w unused when POOL)
    stride_ob, stride_oc, stride_oh, stride_ow,
    # meta-parameters
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # int64 sample index guards the output/input offsets against int32 overflow
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    P = H_out * W_out

    mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    scale = gamma * rstd

    pooled = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_M):
        offs_p = p0 + tl.arange(0, BLOCK_M)
        p_mask = offs_p < P
        y = _conv3x3_tile(
            x_ptr, w_ptr, pid_b, offs_p, p_mask, offs_n, n_mask,
            C_in, H, W, C_out, W_out,
            stride_xb, stride_xc, stride_xh, stride_xw,
            STRIDE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
        )
        # (y - mean) first: keeps precision when |mean| >> std
        r = tl.maximum((y - mean[None, :]) * scale[None, :] + beta[None, :], 0.0)
        if POOL:
            pooled += tl.sum(tl.where(p_mask[:, None], r, 0.0), axis=0)
        else:
            oh = offs_p // W_out
            ow = offs_p % W_out
            o_ptrs = (
                out_ptr
                + pid_b * stride_ob
                + offs_n[None, :] * stride_oc
                + (oh * stride_oh + ow * stride_ow)[:, None]
            )
            tl.store(o_ptrs, r.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & n_mask[None, :])
    if POOL:
        pooled = pooled / P
        tl.store(out_ptr + pid_b * stride_ob + offs_n * stride_oc, pooled.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _conv_bn_relu_bwd_reduce_kernel(
    x_ptr,  # [B, C_in, H, W]
    w_ptr,  # [3, 3, C_in, C_out]
    mean_ptr,  # [C_out] fp32
    rstd_ptr,  # [C_out] fp32
    gamma_ptr,  # [C_out]
    beta_ptr,  # [C_out]
    dout_ptr,  # [B, C_out] (POOL) or [B, C_out, H_out, W_out] upstream gradient, any strides
    sum_dz_part_ptr,  # [B, C_out] fp32 out: per-sample sum of the BN-output gradient (-> dbeta)
    sum_dzx_part_ptr,  # [B, C_out] fp32 out: per-sample sum of dz * xhat (-> dgamma)
    # sizes
    C_in, H, W, C_out, H_out, W_out,
    # input strides
    stride_xb, stride_xc, stride_xh, stride_xw,
    # upstream-gradient strides (h/w unused when POOL; may be 0 for expanded grads)
    stride_gb, stride_gc, stride_gh, stride_gw,
    # meta-parameters
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # int64 sample index: see _conv_bn_relu_fwd_kernel
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    P = H_out * W_out

    mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if POOL:
        # d(mean over P positions)/d(position) = 1/P, the same for every position of the sample
        g_pool = tl.load(dout_ptr + pid_b * stride_gb + offs_n * stride_gc, mask=n_mask, other=0.0)
        g_pool = g_pool.to(tl.float32) / P

    sum_dz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_dzx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_M):
        offs_p = p0 + tl.arange(0, BLOCK_M)
        p_mask = offs_p < P
        y = _conv3x3_tile(
            x_ptr, w_ptr, pid_b, offs_p, p_mask, offs_n, n_mask,
            C_in, H, W, C_out, W_out,
            stride_xb, stride_xc, stride_xh, stride_xw,
            STRIDE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
        )
        xhat = (y - mean[None, :]) * rstd[None, :]
        # ReLU mask recomputed from x: z = gamma * xhat + beta > 0
        live = ((xhat * gamma[None, :] + beta[None, :]) > 0.0) & p_mask[:, None] & n_mask[None, :]
        if POOL:
            dz = tl.where(live, g_pool[None, :], 0.0)
        else:
            oh = offs_p // W_out
            ow = offs_p % W_out
            g_ptrs = (
                dout_ptr
                + pid_b * stride_gb
                + offs_n[None, :] * stride_gc
                + (oh * stride_gh + ow * stride_gw)[:, None]
            )
            g = tl.load(g_ptrs, mask=live, other=0.0).to(tl.float32)
            dz = tl.where(live, g, 0.0)
        sum_dz += tl.sum(dz, axis=0)
        sum_dzx += tl.sum(dz * xhat, axis=0)

    part = pid_b * C_out + offs_n
    tl.store(sum_dz_part_ptr + part, sum_dz, mask=n_mask)
    tl.store(sum_dzx_part_ptr + part, sum_dzx, mask=n_mask)


@triton.jit
def _conv_bn_relu_bwd_kernel(
    x_ptr,  # [B, C_in, H, W]
    w_ptr,  # [3, 3, C_in, C_out]
    mean_ptr,  # [C_out] fp32
    rstd_ptr,  # [C_out] fp32
    gamma_ptr,  # [C_out]
    beta_ptr,  # [C_out]
    dbeta_ptr,  # [C_out] fp32: sum over the batch of dz
    dgamma_ptr,  # [C_out] fp32: sum over the batch of dz * xhat
    dout_ptr,  # upstream gradient, as in _conv_bn_relu_bwd_reduce_kernel
    dy_ptr,  # [B, C_out, H_out, W_out] out: gradient w.r.t. the conv output, x.dtype
    inv_count,  # 1 / (B * H_out * W_out)
    # sizes
    C_in, H, W, C_out, H_out, W_out,
    # input strides
    stride_xb, stride_xc, stride_xh, stride_xw,
    # upstream-gradient strides
    stride_gb, stride_gc, stride_gh, stride_gw,
    # dy strides
    stride_db, stride_dc, stride_dh, stride_dw,
    # meta-parameters
    STRIDE: tl.constexpr,
    POOL: tl.constexpr,
    TRAINING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # int64 sample index: see _conv_bn_relu_fwd_kernel
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    P = H_out * W_out

    mean = tl.load(mean_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    scale = gamma * rstd
    if TRAINING:
        # batch statistics depend on every y: dy = gamma*rstd*(dz - mean(dz) - xhat*mean(dz*xhat))
        mean_dz = tl.load(dbeta_ptr + offs_n, mask=n_mask, other=0.0) * inv_count
        mean_dzx = tl.load(dgamma_ptr + offs_n, mask=n_mask, other=0.0) * inv_count
    if POOL:
        g_pool = tl.load(dout_ptr + pid_b * stride_gb + offs_n * stride_gc, mask=n_mask, other=0.0)
        g_pool = g_pool.to(tl.float32) / P

    for p0 in range(0, P, BLOCK_M):
        offs_p = p0 + tl.arange(0, BLOCK_M)
        p_mask = offs_p < P
        y = _conv3x3_tile(
            x_ptr, w_ptr, pid_b, offs_p, p_mask, offs_n, n_mask,
            C_in, H, W, C_out, W_out,
            stride_xb, stride_xc, stride_xh, stride_xw,
            STRIDE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
        )
        xhat = (y - mean[None, :]) * rstd[None, :]
        valid = p_mask[:, None] & n_mask[None, :]
        live = ((xhat * gamma[None, :] + beta[None, :]) > 0.0) & valid
        oh = offs_p // W_out
        ow = offs_p % W_out
        if POOL:
            dz = tl.where(live, g_pool[None, :], 0.0)
        else:
            g_ptrs = (
                dout_ptr
                + pid_b * stride_gb
                + offs_n[None, :] * stride_gc
                + (oh * stride_gh + ow * stride_gw)[:, None]
            )
            g = tl.load(g_ptrs, mask=live, other=0.0).to(tl.float32)
            dz = tl.where(live, g, 0.0)
        if TRAINING:
            dy = scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])
        else:
            # eval mode: mean/rstd are constants (running statistics)
            dy = scale[None, :] * dz
        d_ptrs = (
            dy_ptr
            + pid_b * stride_db
            + offs_n[None, :] * stride_dc
            + (oh * stride_dh + ow * stride_dw)[:, None]
        )
        tl.store(d_ptrs, dy.to(dy_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launch settings and availability
# ----------------------------------------------------------------------------------------------


class KernelConfig(NamedTuple):
    """One launch configuration shared by all four kernels of a call."""

    block_m: int  # output positions per tile (a program loops over its sample's tiles)
    block_n: int  # output channels per program
    block_k: int  # input channels per dot
    num_warps: int


# Hand-listed configurations, no autotuning: a tuning run launches and times candidate kernels,
# which must never happen inside a CUDA-graph capture. _pick_config chooses among these by shape; the tests run each
# of them. block_k adapts to C_in and block_n to C_out inside _pick_config.
CONFIGS: dict[str, KernelConfig] = {
    # small heads (H_out*W_out <= 64, e.g. 8x8): one tile per sample
    "m64": KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4),
    # larger heads (16x16 and up): fewer, fatter tiles
    "m128": KernelConfig(block_m=128, block_n=64, block_k=64, num_warps=4),
    # minimum legal tl.dot tile, exercises every masking path with C_in/C_out > block
    "m16": KernelConfig(block_m=16, block_n=16, block_k=16, num_warps=2),
}


def _interpreting() -> bool:
    """Whether this module's kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    return _TRITON_IMPORT_ERROR is None and type(_conv_bn_relu_fwd_kernel).__name__ == "InterpretedFunction"


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the fused head kernels can run on ``device`` (default: CUDA if present), and why not.

    Returns ``(ok, reason)``; ``reason`` is a one-line message suitable for an error or a log.
    """
    if _TRITON_IMPORT_ERROR is not None:
        return False, f"{_NO_DEVICE_MSG} (triton is not importable: {_TRITON_IMPORT_ERROR})"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available; " + _NO_DEVICE_MSG
        return True, "triton interpreter on CUDA tensors (slow)" if _interpreting() else "triton on CUDA"
    if device.type == "cpu":
        if _interpreting():
            return True, "triton interpreter (TRITON_INTERPRET=1) on the CPU"
        if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
            return False, (
                "TRITON_INTERPRET=1 was set after pgl_fast.kernels.conv_bn_relu was imported; "
                "set it before importing, or use --head-kernels eager"
            )
        return False, _NO_DEVICE_MSG
    return False, f"device {device.type!r} is not supported; " + _NO_DEVICE_MSG


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pick_config(p: int, c_in: int, c_out: int, interpret: bool) -> KernelConfig:
    """Launch settings for H_out*W_out = ``p`` positions per sample."""
    base = CONFIGS["m64"] if p <= 64 else CONFIGS["m128"]
    block_m = base.block_m
    if interpret:
        # The interpreter pays per op, not per element: fewer, larger tiles run much faster.
        block_m = min(max(_next_pow2(p), 16), 1024)
    return _fit_config(KernelConfig(block_m, base.block_n, base.block_k, base.num_warps), c_in, c_out)


def _fit_config(cfg: KernelConfig, c_in: int, c_out: int) -> KernelConfig:
    """Shrink block_k/block_n to the channel counts (never below 16, the smallest tl.dot size)."""
    block_k = min(cfg.block_k, max(16, _next_pow2(c_in)))
    block_n = min(cfg.block_n, max(16, _next_pow2(c_out)))
    return KernelConfig(cfg.block_m, block_n, block_k, cfg.num_warps)


def _dot_settings(x: torch.Tensor, interpret: bool, on_cuda: bool) -> tuple[bool, str | None]:
    """(DOT_FP32, INPUT_PRECISION) for this input."""
    if x.dtype == torch.float32:
        # match F.conv2d: cuDNN uses TF32 for fp32 convs when torch.backends.cudnn.allow_tf32
        use_tf32 = on_cuda and not interpret and torch.backends.cudnn.allow_tf32
        return True, "tf32" if use_tf32 else "ieee"
    # 16-bit operands: input_precision only concerns fp32 x fp32 dots, leave tl.dot's default.
    # The interpreter cannot dot bf16 natively (numpy), so there the operands are upcast (exactly).
    return interpret, None


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _require_runnable(device: torch.device) -> None:
    ok, reason = triton_available(device)
    if not ok:
        raise RuntimeError(reason)


class KernelLaunch(NamedTuple):
    """One kernel launch as a launcher makes it: ``kernel[grid](*args, **meta)``."""

    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # positional arguments (tensors, ints, floats)
    meta: dict  # constexpr keyword arguments and num_warps


# Launches collected by record_launches(), or None when launching for real.
_RECORDED: list[KernelLaunch] | None = None


@contextlib.contextmanager
def record_launches():
    """Collect the kernel launches of the launchers instead of running them.

    Inside the context the launchers accept ``meta`` tensors (and only those), decide every launch
    setting as for compiled kernels on a CUDA device (no interpreter tiles; fp32 follows
    ``torch.backends.cudnn.allow_tf32``) and append a :class:`KernelLaunch` per launch to the list
    this yields. The torch parts of the launchers (finalize, dgrad/wgrad) run on the meta tensors,
    so forward and backward go through exactly the code training runs. This is how the
    ahead-of-time compile checks (``kernels/lowering.py``) list what a real run would launch.
    """
    global _RECORDED
    if _RECORDED is not None:
        raise RuntimeError("record_launches() cannot be nested")
    _RECORDED = []
    try:
        yield _RECORDED
    finally:
        _RECORDED = None


def _launch_target(device: torch.device) -> tuple[bool, bool]:
    """``(interpret, on_cuda)`` for a launch on ``device``; raises when the kernels cannot run there."""
    if _RECORDED is not None:
        if device.type != "meta":
            raise RuntimeError(f"record_launches() takes meta tensors only, got a tensor on {device}")
        return False, True
    _require_runnable(device)
    return _interpreting(), device.type == "cuda"


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    if _RECORDED is not None:
        _RECORDED.append(KernelLaunch(kernel, tuple(grid), args, dict(meta)))
    else:
        kernel[grid](*args, **meta)


def _check_param(name: str, t: torch.Tensor | None, c_out: int, device: torch.device, optional: bool) -> None:
    if t is None:
        if optional:
            return
        raise ValueError(f"conv_bn_relu: {name} is required here")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"conv_bn_relu: {name} must be a tensor, got {type(t).__name__}")
    if t.shape != (c_out,):
        raise ValueError(f"conv_bn_relu: {name} must have shape [{c_out}] (C_out), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"conv_bn_relu: {name} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"conv_bn_relu: {name} is on {t.device} but x is on {device}")


def _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, training) -> None:
    """Shape/dtype/device/layout checks shared by the launchers; one-line ValueErrors."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"conv_bn_relu: x must be 4-D [B, C_in, H, W], got {shape}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"conv_bn_relu: x dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if min(x.shape) < 1:
        raise ValueError(f"conv_bn_relu: x must be non-empty, got shape {tuple(x.shape)}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("conv_bn_relu: x must be contiguous (NCHW) or channels_last; call .contiguous() first")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"conv_bn_relu: weight must be [C_out, C_in, 3, 3], got {shape}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv_bn_relu: weight has C_in={weight.shape[1]} but x has {x.shape[1]} channels"
        )
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"conv_bn_relu: weight dtype must be float32, bfloat16 or float16, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"conv_bn_relu: weight is on {weight.device} but x is on {x.device}")
    if stride not in (1, 2) or isinstance(stride, bool):
        raise ValueError(f"conv_bn_relu: stride must be 1 or 2, got {stride!r}")
    c_out = weight.shape[0]
    _check_param("bn_weight", bn_weight, c_out, x.device, optional=False)
    _check_param("bn_bias", bn_bias, c_out, x.device, optional=False)
    _check_param("running_mean", running_mean, c_out, x.device, optional=training)
    _check_param("running_var", running_var, c_out, x.device, optional=training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("conv_bn_relu: pass both running_mean and running_var, or neither")


def _out_size(n: int, stride: int) -> int:
    # 3x3 kernel, padding 1
    return (n - 1) // stride + 1


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # a tensor that is contiguous both ways (e.g. C=1 or H=W=1) is treated as NCHW
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def _prep_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> [3, 3, C_in, C_out] in the dot dtype (tiny copy), so a [K, N] weight
    tile is contiguous along the output channels."""
    return weight.detach().to(dtype).permute(2, 3, 1, 0).contiguous()


def conv_bn_relu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    stride: int,
    training: bool,
    momentum: float,
    eps: float,
    pool: bool,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher. Returns ``(out, mean, rstd)``; ``mean``/``rstd`` are the fp32 per-channel
    statistics used to normalise (batch statistics when ``training``, else the running ones).

    Updates ``running_mean``/``running_var`` in place when ``training`` and they are given.
    """
    _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, training)
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    H_out, W_out = _out_size(H, stride), _out_size(W, stride)
    P = H_out * W_out
    count = B * P
    if training and count < 2:
        raise ValueError(
            f"conv_bn_relu: expected more than 1 value per channel when training, got input {tuple(x.shape)}"
        )
    interpret, on_cuda = _launch_target(x.device)
    cfg = _pick_config(P, C_in, C_out, interpret) if config is None else _fit_config(config, C_in, C_out)
    dot_fp32, precision = _dot_settings(x, interpret, on_cuda)
    w_k = _prep_weight(weight, x.dtype)
    grid = (B, triton.cdiv(C_out, cfg.block_n))
    meta = dict(
        STRIDE=stride, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, num_warps=cfg.num_warps,
    )
    sizes = (C_in, H, W, C_out, H_out, W_out)

    if training:
        mean_part = torch.empty((B, C_out), device=x.device, dtype=torch.float32)
        m2_part = torch.empty_like(mean_part)
        _launch(_conv_bn_relu_fwd_stats_kernel, grid, x, w_k, mean_part, m2_part, *sizes, *x.stride(), **meta)
        # Finalize (tiny [B, C_out] tensors): every sample holds exactly P values, so Chan's merge is
        # mean = average of sample means, M2 = sum of sample M2 + P * sum of squared mean offsets.
        mean = mean_part.mean(dim=0)
        m2 = m2_part.sum(dim=0) + P * (mean_part - mean).square().sum(dim=0)
        rstd = torch.rsqrt(m2 / count + eps)
        if running_mean is not None:
            with torch.no_grad():
                # torch semantics: running var uses the unbiased estimate M2 / (N - 1)
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((m2 / (count - 1)).to(running_var.dtype), momentum)
    else:
        mean = running_mean.detach().to(torch.float32).contiguous()
        rstd = torch.rsqrt(running_var.detach().to(torch.float32) + eps)

    if pool:
        out = torch.empty((B, C_out), device=x.device, dtype=x.dtype)
        out_strides = (out.stride(0), out.stride(1), 0, 0)
    else:
        out = torch.empty((B, C_out, H_out, W_out), device=x.device, dtype=x.dtype,
                          memory_format=_memory_format(x))
        out_strides = out.stride()
    _launch(
        _conv_bn_relu_fwd_kernel, grid,
        x, w_k, mean, rstd, bn_weight.detach().contiguous(), bn_bias.detach().contiguous(), out,
        *sizes, *x.stride(), *out_strides, POOL=pool, **meta,
    )
    return out, mean, rstd


def conv_bn_relu_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    stride: int,
    training: bool,
    pool: bool,
    needs_input_grad: tuple[bool, bool, bool, bool] = (True, True, True, True),
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher: ``(dx, dweight, dbn_weight, dbn_bias)`` from the upstream gradient and the
    tensors saved by :func:`conv_bn_relu_fwd` (``x``, params, ``mean``, ``rstd``)."""
    interpret, on_cuda = _launch_target(x.device)
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    H_out, W_out = _out_size(H, stride), _out_size(W, stride)
    P = H_out * W_out
    expected = (B, C_out) if pool else (B, C_out, H_out, W_out)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"conv_bn_relu: grad_out must have shape {list(expected)}, got {tuple(grad_out.shape)}")
    if grad_out.device != x.device:
        raise ValueError(f"conv_bn_relu: grad_out is on {grad_out.device} but x is on {x.device}")
    need_dx, need_dw, need_dgamma, need_dbeta = needs_input_grad
    cfg = _pick_config(P, C_in, C_out, interpret) if config is None else _fit_config(config, C_in, C_out)
    dot_fp32, precision = _dot_settings(x, interpret, on_cuda)
    w_k = _prep_weight(weight, x.dtype)
    grid = (B, triton.cdiv(C_out, cfg.block_n))
    meta = dict(
        STRIDE=stride, POOL=pool, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, num_warps=cfg.num_warps,
    )
    sizes = (C_in, H, W, C_out, H_out, W_out)
    g_strides = (grad_out.stride(0), grad_out.stride(1), 0, 0) if pool else grad_out.stride()
    gamma, beta = bn_weight.detach().contiguous(), bn_bias.detach().contiguous()

    # bwd 1: per-channel reductions for the BN backward (and the BN parameter gradients)
    sum_dz_part = torch.empty((B, C_out), device=x.device, dtype=torch.float32)
    sum_dzx_part = torch.empty_like(sum_dz_part)
    _launch(
        _conv_bn_relu_bwd_reduce_kernel, grid,
        x, w_k, mean, rstd, gamma, beta, grad_out, sum_dz_part, sum_dzx_part,
        *sizes, *x.stride(), *g_strides, **meta,
    )
    dbeta = sum_dz_part.sum(dim=0)
    dgamma = sum_dzx_part.sum(dim=0)

    dx = dw = None
    if need_dx or need_dw:
        # bwd 2: BN-input gradient dy, transient (freed when this function returns)
        dy = torch.empty((B, C_out, H_out, W_out), device=x.device, dtype=x.dtype,
                         memory_format=_memory_format(x))
        _launch(
            _conv_bn_relu_bwd_kernel, grid,
            x, w_k, mean, rstd, gamma, beta, dbeta, dgamma, grad_out, dy, 1.0 / (B * P),
            *sizes, *x.stride(), *g_strides, *dy.stride(), TRAINING=training, **meta,
        )
        # dgrad + wgrad: cuDNN/aten GEMMs (see module docstring)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x.detach(), weight.detach().to(x.dtype), None,
            [stride, stride], [1, 1], [1, 1], False, [0, 0], 1, [need_dx, need_dw, False],
        )
        del dy
        if dw is not None:
            dw = dw.to(weight.dtype)
    dgamma_out = dgamma.to(bn_weight.dtype) if need_dgamma else None
    dbeta_out = dbeta.to(bn_bias.dtype) if need_dbeta else None
    return (dx if need_dx else None), (dw if need_dw else None), dgamma_out, dbeta_out


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class _ConvBnReLUFunction(torch.autograd.Function):
    """Saves only x, the weights and the fp32 mean/rstd; backward recomputes the rest."""

    @staticmethod
    def forward(ctx, x, weight, bn_weight, bn_bias, running_mean, running_var,
                stride, training, momentum, eps, pool, config):
        out, mean, rstd = conv_bn_relu_fwd(
            x, weight, bn_weight, bn_bias, running_mean, running_var,
            stride=stride, training=training, momentum=momentum, eps=eps, pool=pool, config=config,
        )
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, rstd)
        ctx.stride, ctx.training, ctx.pool, ctx.config = stride, training, pool, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bn_weight, bn_bias, mean, rstd = ctx.saved_tensors
        dx, dw, dgamma, dbeta = conv_bn_relu_bwd(
            grad_out, x, weight, bn_weight, bn_bias, mean, rstd,
            stride=ctx.stride, training=ctx.training, pool=ctx.pool,
            needs_input_grad=tuple(ctx.needs_input_grad[:4]), config=ctx.config,
        )
        return dx, dw, dgamma, dbeta, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                  stride, training, momentum, eps, pool, config):
    if (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.device.type in ("cuda", "cpu")
        and torch.is_autocast_enabled(x.device.type)
    ):
        # what F.conv2d does under autocast: run in the autocast dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1 and (bn_weight is None or bn_bias is None):
        # affine=False BatchNorm: gamma = 1, beta = 0 (no gradient is returned for them)
        c_out = weight.shape[0]
        if bn_weight is None:
            bn_weight = torch.ones(c_out, device=weight.device, dtype=torch.float32)
        if bn_bias is None:
            bn_bias = torch.zeros(c_out, device=weight.device, dtype=torch.float32)
    if momentum is None or not isinstance(momentum, (int, float)):
        raise ValueError(f"conv_bn_relu: momentum must be a float, got {momentum!r}")
    return _ConvBnReLUFunction.apply(
        x, weight, bn_weight, bn_bias, running_mean, running_var,
        stride, bool(training), float(momentum), float(eps), bool(pool), config,
    )


def conv_bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    stride: int,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    pool: bool = False,
) -> torch.Tensor:
    """Fused ``relu(batch_norm(conv2d(x, weight, stride=stride, padding=1)))`` (+ global avg pool).

    Args:
        x: ``[B, C_in, H, W]`` float32/bfloat16/float16, NCHW-contiguous or channels_last.
        weight: ``[C_out, C_in, 3, 3]`` conv weight (no bias); cast to ``x.dtype`` for the conv.
        bn_weight, bn_bias: ``[C_out]`` BN affine parameters (``None`` = affine=False).
        running_mean, running_var: ``[C_out]`` fp32 buffers, updated in place when ``training``
            (momentum, unbiased variance, as torch); used to normalise when not ``training``.
            May be ``None`` in training (no tracking).
        stride: 1 or 2.
        training: batch statistics (True) or running statistics (False).
        pool: return the global average pool ``[B, C_out]`` of the ReLU output instead of the full
            ``[B, C_out, H_out, W_out]`` output.

    Returns a tensor in ``x.dtype`` (the autocast dtype under autocast). Gradients flow to ``x``,
    ``weight``, ``bn_weight`` and ``bn_bias``. Only ``x``, the parameters and the per-channel
    ``mean``/``rstd`` are saved for backward.

    Raises ``ValueError`` for bad shapes/dtypes/devices/layouts and ``RuntimeError`` when Triton
    cannot run on ``x.device`` (see :func:`triton_available`).
    """
    return _conv_bn_relu(
        x, weight, bn_weight, bn_bias, running_mean, running_var,
        stride=stride, training=training, momentum=momentum, eps=eps, pool=pool, config=None,
    )


def conv_bn_relu_module(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pool: bool) -> torch.Tensor:
    """:func:`conv_bn_relu` with the parameters, buffers and settings of ``conv`` and ``bn``.

    Equivalent to ``relu(bn(conv(x)))`` (``.mean((2, 3))`` when ``pool``), including the in-place
    running-statistics update and the ``bn.num_batches_tracked`` increment in training mode.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError("conv_bn_relu_module: expected an nn.Conv2d and an nn.BatchNorm2d")
    if (
        tuple(conv.kernel_size) != (3, 3)
        or tuple(conv.padding) != (1, 1)
        or tuple(conv.dilation) != (1, 1)
        or conv.groups != 1
        or conv.bias is not None
        or conv.padding_mode != "zeros"
        or conv.stride[0] != conv.stride[1]
    ):
        raise ValueError(
            "conv_bn_relu_module: conv must be 3x3, padding 1, dilation 1, groups 1, no bias, "
            f"equal strides, zero padding; got {conv}"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"conv_bn_relu_module: bn has {bn.num_features} features but conv has {conv.out_channels} outputs"
        )
    # torch's BatchNorm rule: batch statistics when training or when no running stats are tracked
    use_batch_stats = bn.training or bn.running_mean is None
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    if track and bn.momentum is None:
        raise ValueError(
            "conv_bn_relu_module: BatchNorm momentum=None (cumulative average) is not supported "
            "by the fused kernels; set a float momentum or use --head-kernels eager"
        )
    momentum = 0.0 if bn.momentum is None else bn.momentum
    out = _conv_bn_relu(
        x, conv.weight, bn.weight, bn.bias,
        bn.running_mean if (track or not use_batch_stats) else None,
        bn.running_var if (track or not use_batch_stats) else None,
        stride=conv.stride[0], training=use_batch_stats, momentum=momentum, eps=bn.eps, pool=pool,
        config=None,
    )
    if track and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    return out
