"""The on-device batch pipeline: shuffled index batches, random crop and flip of a uint8 batch and
normalisation, all on the training device. None of them synchronises with the host or uses
data-dependent shapes, so all can run inside a captured CUDA graph."""
from __future__ import annotations

import torch

from .recipes import DatasetSpec

__all__ = ["BatchAugmenter", "normalize", "epoch_batches", "make_generator"]


def make_generator(seed: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``. Draw the augmentation on the data
    device with it; under CUDA-graph capture register it with ``graph.register_generator_state``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def epoch_batches(n: int, batch_size: int, *, generator: torch.Generator | None, drop_last: bool, device="cpu"):
    """Shuffled index batches for one epoch: a ``torch.randperm`` of ``n`` drawn with ``generator``
    on ``device``, split into ``batch_size`` chunks. The last partial chunk is kept unless
    ``drop_last`` (InfoPro keeps it: 50,000 = 48 * 1024 + 848). Returns a list of int64 views."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"epoch_batches needs n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    perm = torch.randperm(n, generator=generator, device=torch.device(device))
    batches = list(perm.split(batch_size))
    if drop_last and batches and batches[-1].shape[0] < batch_size:
        batches.pop()
    return batches


class BatchAugmenter:
    """Random crop with padding and random horizontal flip for a uint8 batch, on the device.

    Equivalent to, per sample: pad by ``spec.pad`` (reflect or zeros), crop back to ``H x W`` at
    a random offset ``(dy, dx)`` in ``[0, 2 * pad]``, then flip left-right when drawn. All three
    steps are folded into one index map and a single ``torch.gather``: no padded copy, no Python
    loop over samples, no boolean-mask indexing and no host sync, so it is graph-capturable.

    Random draws per call, in this order: ``dy``, ``dx`` (only if ``pad > 0``), then the flip
    decisions (only if ``spec.flip``), all from the given generator. :meth:`sample_params` and
    :meth:`apply` expose the two halves so tests can inject explicit parameters.
    """

    def __init__(self, spec: DatasetSpec, device="cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.pad = int(spec.pad)
        self.reflect = spec.pad_mode == "reflect"
        self.flip = bool(spec.flip)
        # Index ramps reused every call; sized for the spec's images and grown on demand.
        self._ramps: dict[tuple[int, str], torch.Tensor] = {}

    def _ramp(self, n: int, device) -> torch.Tensor:
        key = (n, str(device))
        r = self._ramps.get(key)
        if r is None:
            r = self._ramps[key] = torch.arange(n, device=device, dtype=torch.int64)
        return r

    def sample_params(self, batch_size: int, generator: torch.Generator | None):
        """Random ``(dy, dx, flip)`` for a batch: int64 offsets in ``[0, 2 * pad]`` (None when
        ``pad == 0``) and a bool flip mask (None when the spec does not flip)."""
        dev = generator.device if generator is not None else self.device
        dy = dx = flip = None
        if self.pad > 0:
            dy = torch.randint(0, 2 * self.pad + 1, (batch_size,), generator=generator, device=dev)
            dx = torch.randint(0, 2 * self.pad + 1, (batch_size,), generator=generator, device=dev)
        if self.flip:
            flip = torch.rand(batch_size, generator=generator, device=dev) < 0.5
        return dy, dx, flip

    def apply(self, x: torch.Tensor, dy=None, dx=None, flip=None) -> torch.Tensor:
        """Crop ``x`` (uint8 ``[B, C, H, W]``) at offsets ``dy``/``dx`` of the padded image and
        flip where ``flip`` is True. ``None`` parameters mean no crop / no flip. Returns a new
        contiguous tensor, or ``x`` itself when there is nothing to do."""
        if dy is None and flip is None:
            return x
        b, c, h, w = x.shape
        p = self.pad if dy is not None else 0
        if self.reflect and p > 0 and (p >= h or p >= w):
            raise ValueError(f"reflect padding {p} needs images larger than {p} pixels, got {h}x{w}")
        rows = self._ramp(h, x.device).expand(b, h)
        cols = self._ramp(w, x.device).expand(b, w)
        if flip is not None:
            # Flip after the crop: output column j reads cropped column W - 1 - j.
            cols = torch.where(flip.to(torch.bool).view(b, 1), (w - 1) - cols, cols)
        valid = None
        if dy is not None:
            # Source coordinates in the unpadded image (may fall outside it by up to p).
            rows = rows + (dy.view(b, 1) - p)
            cols = cols + (dx.view(b, 1) - p)
            if self.reflect:
                # Reflection without repeating the edge (F.pad "reflect"): -k -> k, n-1+k -> n-1-k.
                rows = rows.abs()
                rows = torch.where(rows >= h, (2 * (h - 1)) - rows, rows)
                cols = cols.abs()
                cols = torch.where(cols >= w, (2 * (w - 1)) - cols, cols)
            else:
                valid = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
                rows = rows.clamp(0, h - 1)
                cols = cols.clamp(0, w - 1)
        index = (rows.view(b, h, 1) * w + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
        out = torch.gather(x.reshape(b, c, h * w), 2, index).view(b, c, h, w)
        if valid is not None:
            out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a uint8 batch with fresh random parameters drawn from ``generator``, which
        must live on the batch's device (drawing elsewhere would need a copy and a sync)."""
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"BatchAugmenter: generator is on {generator.device} but the batch is on {x.device}")
        return self.apply(x, *self.sample_params(x.shape[0], generator))


# Per-(mean, std, device) constants, built on first use (do a warm-up call before graph capture:
# building them copies from the host).
_NORM_CONSTANTS: dict = {}


def normalize(x: torch.Tensor, spec: DatasetSpec, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel for a uint8 ``[B, C, H, W]`` batch (C the spec's
    channel count), computed in float32 as one multiply-add and returned as ``dtype``
    (channels_last layout if asked)."""
    if x.dim() != 4 or x.shape[1] != len(spec.mean):
        # broadcasting would otherwise turn 1-channel images into C-channel ones (or the reverse)
        raise ValueError(f"normalize: the spec has {len(spec.mean)} channel(s) of mean/std, the batch is "
                         f"{tuple(x.shape)} (needs [B, {len(spec.mean)}, H, W])")
    key = (spec.mean, spec.std, x.device)
    consts = _NORM_CONSTANTS.get(key)
    if consts is None:
        mean = torch.tensor(spec.mean, dtype=torch.float64)
        std = torch.tensor(spec.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, -1, 1, 1).to(x.device)
        shift = (-mean / std).to(torch.float32).view(1, -1, 1, 1).to(x.device)
        consts = _NORM_CONSTANTS[key] = (scale, shift)
    scale, shift = consts
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.addcmul(shift, x.to(torch.float32), scale)
    if dtype != torch.float32:
        out = out.to(dtype)
    if channels_last and not out.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out
