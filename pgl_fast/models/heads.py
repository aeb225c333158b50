"""Auxiliary networks: InfoPro's ``AuxClassifier`` family, AUX-ADAPT, DGL's ``mlpsr``, a
token-pooling head for transformer blocks, and InfoPro's reconstruction decoder.

Heads are sized from the per-sample shape of the features they sit on: ``(C, H, W)`` feature maps
get the conv heads, ``(tokens, dim)`` outputs of transformer blocks and flat ``(dim,)`` features get
:class:`TokenHead`.

The conv part of every InfoPro-style head is a list of ``ConvBN`` layers (3x3 conv, no bias,
BN, ReLU), the last of which is globally average-pooled. That list is what the fused Triton
kernels (``pgl_fast.kernels``) replace when ``use_kernels`` is on: the parameters and buffers are
the same modules either way, so eager and fused heads are interchangeable mid-run.

Every head a name can select is an entry of ``HEADS`` (:class:`HeadSpec`: its builder and what
the flags' checks may do with it); ``register_head`` adds one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..registry import add_entry

# AUX-ADAPT: big heads where the proxy is poorest (early, 16 channels), small ones late.
ADAPT_BY_CHANNELS = {16: "2c2f", 32: "1c3f", 64: "1c2f"}
# InfoPro: conv width and stride by input channels (the CIFAR ResNets' three stages).
CONV_BY_CHANNELS = {16: (32, 2), 32: (64, 2), 64: (64, 1)}


def adapt_config(in_channels: int) -> str:
    """AUX-ADAPT's head for a cut with ``in_channels`` channels: InfoPro-ResNet's table, and for
    other widths the same thresholds (up to 16 channels: 2c2f, up to 32: 1c3f, wider: 1c2f)."""
    if in_channels in ADAPT_BY_CHANNELS:
        return ADAPT_BY_CHANNELS[in_channels]
    return "2c2f" if in_channels <= 16 else "1c3f" if in_channels <= 32 else "1c2f"


def conv_width_stride(in_channels: int, in_size: int) -> tuple[int, int]:
    """Conv width and first stride of an InfoPro-style head: the ResNets' table where it applies;
    otherwise the rule that reproduces it on those stages -- width doubles up to 64 and never
    shrinks (max(C, min(2C, 64))), stride 2 while the map is larger than 8x8."""
    if in_channels in CONV_BY_CHANNELS:
        return CONV_BY_CHANNELS[in_channels]
    return max(in_channels, min(2 * in_channels, 64)), 2 if in_size > 8 else 1


class ConvBN(nn.Module):
    """3x3 conv (no bias) -> BN -> ReLU, optionally followed by global average pooling."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, pool: bool, use_kernels: bool = False) -> torch.Tensor:
        if use_kernels:
            from ..kernels import conv_bn_relu_module  # optional: Triton's pieces load only where a head runs fused

            return conv_bn_relu_module(x, self.conv, self.bn, pool=pool)
        y = F.relu(self.bn(self.conv(x)))
        return y.mean(dim=(2, 3)) if pool else y


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class AuxClassifier(nn.Module):
    """InfoPro's ``AuxClassifier``: ``kc kf`` = k convs then k linear layers.

    ``out_dim`` is the class count for a cross-entropy head or the feature dimension for a
    contrastive one.
    """

    def __init__(self, config: str, in_channels: int, out_dim: int, widen: float = 1.0, feature_dim: int = 128,
                 in_size: int = 32):
        super().__init__()
        if config == "adapt":
            config = adapt_config(in_channels)
        self.config = config
        self.use_kernels = False
        n_conv, n_fc = int(config[0]), int(config[2])
        width, stride = conv_width_stride(in_channels, in_size)
        width = int(width * widen)
        hidden = int(feature_dim * widen)
        convs, c = [], in_channels
        for i in range(n_conv):
            convs.append(ConvBN(c, width, stride if i == 0 else 1))
            c = width
        self.convs = nn.ModuleList(convs)
        self.fc = _mlp([c] + [hidden] * (n_fc - 1) + [out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.convs) == 0:
            h = x.mean(dim=(2, 3))
        else:
            h = x
            for i, layer in enumerate(self.convs):
                h = layer(h, pool=i == len(self.convs) - 1, use_kernels=self.use_kernels)
        return self.fc(torch.flatten(h, 1))


class MLPSRHead(nn.Module):
    """DGL's ``mlp-sr`` auxiliary network (eugenium/DGL ``auxillary_classifier2``, n_lin=3, mlp_layers=3).

    Pool to ceil(size/4)^2 -> 3 x [1x1 conv C->C (no bias), BN, ReLU] -> pool to 2x2 ->
    3 x [Linear(4C->4C), BN1d, ReLU] -> Linear(4C -> classes).
    """

    def __init__(self, in_channels: int, in_size: int, out_dim: int, n_lin: int = 3, mlp_layers: int = 3):
        super().__init__()
        self.config = "mlpsr"
        self.use_kernels = False
        self.pool_size = math.ceil(in_size / 4)
        c = in_channels
        convs: list[nn.Module] = []
        for _ in range(n_lin):
            convs += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        feat = c * 4
        mlp: list[nn.Module] = []
        for _ in range(mlp_layers):
            mlp += [nn.Linear(feat, feat), nn.BatchNorm1d(feat), nn.ReLU(inplace=True)]
        mlp.append(nn.Linear(feat, out_dim))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = adaptive_avg_pool(x, self.pool_size)
        h = self.convs(h)
        h = adaptive_avg_pool(h, 2)
        return self.mlp(torch.flatten(h, 1))


class TokenHead(nn.Module):
    """Head for features without a spatial grid: ``(tokens, dim)`` outputs of transformer blocks are
    layer-normed and averaged over the tokens, flat ``(dim,)`` features are used as they are; then
    ``n_fc`` linear layers (hidden width ``feature_dim``). A conv head's conv layers have no meaning
    here, so ``kcNf`` keeps its N linear layers (``adapt``: 2)."""

    def __init__(self, in_shape: tuple[int, ...], out_dim: int, n_fc: int, widen: float = 1.0,
                 feature_dim: int = 128):
        super().__init__()
        dim = in_shape[-1]
        self.tokens = len(in_shape) == 2
        self.config = f"{'tokens' if self.tokens else 'flat'}-{n_fc}f"
        self.use_kernels = False
        self.norm = nn.LayerNorm(dim) if self.tokens else nn.Identity()
        hidden = int(feature_dim * widen)
        self.fc = _mlp([dim] + [hidden] * (n_fc - 1) + [out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            x = self.norm(x).mean(dim=1)
        return self.fc(x)


@dataclass(frozen=True)
class HeadSpec:
    """One aux head of the registry: how it is built and what the rest of the engine may do with it.

    ``build(in_shape, out_dim, widen=..., feature_dim=...)`` returns the head for features of
    per-sample shape ``in_shape`` (``(C, H, W)``, ``(tokens, dim)`` or ``(dim,)``); it raises
    ``ValueError`` for a shape it cannot take. ``out_dim`` is the class count (or InfoPro's
    contrastive feature size), ``widen`` and ``feature_dim`` are ``--aux-widen`` and
    ``--aux-feature-dim``. The remaining fields are what the flags' checks read instead of names:

    - ``fused_kernel``: its conv part is ``AuxClassifier``'s ConvBN list, which the fused Triton
      kernels replace (``--head-kernels triton`` is refused for a head without one);
    - ``infopro``: one of InfoPro's own ``AuxClassifier`` heads, the only ones InfoPro's runs (and
      their reconstruction decoders' lambdas) were published with, so the only ones it accepts;
    - ``fixed_width``: why ``--aux-widen``/``--aux-feature-dim`` do not change it (empty: they do).
    """

    build: Callable[..., nn.Module]
    help: str
    fused_kernel: bool = False
    infopro: bool = False
    fixed_width: str = ""


def _kcnf_builder(config: str) -> Callable[..., nn.Module]:
    """InfoPro's ``kc nf`` head (``adapt``: AUX-ADAPT's choice by width) on feature maps, and its
    linear layers alone (:class:`TokenHead`) on features without a spatial grid."""
    def build(in_shape, out_dim, widen=1.0, feature_dim=128):
        if len(in_shape) in (1, 2):
            return TokenHead(in_shape, out_dim, 2 if config == "adapt" else int(config[2]), widen, feature_dim)
        c, h, _ = in_shape
        return AuxClassifier(config, c, out_dim, widen, feature_dim, in_size=h)

    return build


def _mlpsr_builder(in_shape, out_dim, widen=1.0, feature_dim=128):
    if len(in_shape) != 3:
        raise ValueError(f"aux head mlpsr needs (C, H, W) feature maps, got features of shape {in_shape}")
    c, h, _ = in_shape
    return MLPSRHead(c, h, out_dim)


# The one table of aux heads: the CLI's --aux choices, split(aux=...), cifar_resnet(aux=...) and the
# flags' checks all read it. Add an entry with register_head.
HEADS: dict[str, HeadSpec] = {
    **{config: HeadSpec(_kcnf_builder(config), f"InfoPro's AuxClassifier: {config[0]} conv, {config[2]} linear layers",
                        fused_kernel=True, infopro=True)
       for config in ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")},
    "adapt": HeadSpec(_kcnf_builder("adapt"), "AUX-ADAPT: 2c2f, 1c3f or 1c2f by the cut's width (big heads early)",
                      fused_kernel=True),
    "mlpsr": HeadSpec(_mlpsr_builder, "DGL's mlp-sr head (1x1 convs then a 3-layer MLP)",
                      fixed_width="DGL's head has a fixed width"),
}
# The registered names, kept current as heads are registered (the --aux choices and checks read it).
AUX_CONFIGS = HEADS.keys()


def register_head(name: str, spec: HeadSpec, *, replace: bool = False) -> None:
    """Add the aux head ``name`` to the registry: from then on ``--aux name``, ``split(aux=name)``
    and ``cifar_resnet(aux=name)`` build it. ``replace`` allows redefining a registered name."""
    add_entry(HEADS, name, spec, fn="register_head", kind="aux head", cls=HeadSpec, field="spec", lower=False,
              replace=replace)


def head_spec(name: str) -> HeadSpec:
    """The registry entry of aux head ``name``; an unknown name is a one-line error listing the known ones."""
    try:
        return HEADS[name]
    except (KeyError, TypeError):
        raise UserError(f"--aux {name!r} is not one of {', '.join(HEADS)}") from None


def build_head(config: str, in_shape: tuple[int, ...], out_dim: int, widen: float = 1.0,
               feature_dim: int = 128) -> nn.Module:
    """The aux head ``config`` for features of per-sample shape ``in_shape``."""
    spec = head_spec(config)
    in_shape = tuple(in_shape)
    if len(in_shape) not in (1, 2, 3):
        raise ValueError(f"aux head {config}: features of shape {in_shape} are neither (C, H, W), (tokens, dim) nor (dim,)")
    head = spec.build(in_shape, out_dim, widen=widen, feature_dim=feature_dim)
    if not isinstance(head, nn.Module):
        raise UserError(f"aux head {config!r}: its builder returned a {type(head).__name__}, not an nn.Module")
    return _with_spec(head, config, in_shape, out_dim, widen, feature_dim)


def _with_spec(head: nn.Module, config: str, in_shape: tuple[int, ...], out_dim: int, widen: float,
               feature_dim: int) -> nn.Module:
    """The arguments ``head`` was built from, so that a method which moves the head onto other
    features (MAN) can build the same head at their shape."""
    head.spec = {"config": config, "in_shape": tuple(in_shape), "out_dim": out_dim, "widen": widen,
                 "feature_dim": feature_dim}
    return head


class Decoder(nn.Module):
    """InfoPro's estimate of I(h, x): upsample to the image size (bilinear, align_corners=True),
    conv3x3 (C -> 12w, bias) -> BN -> ReLU -> conv3x3 (12w -> 3, bias) -> sigmoid.

    Training uses ``logits`` (everything but the sigmoid) with a BCE-with-logits loss: plain BCE on
    a sigmoid output is refused under CUDA autocast, and the fused form is also the more accurate
    one in half precision."""

    def __init__(self, in_channels: int, image_size: int, widen: float = 1.0):
        super().__init__()
        self.image_size = image_size
        self.in_channels, self.widen = in_channels, widen
        mid = int(12 * widen)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, 1, 1, bias=True),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, 3, 3, 1, 1, bias=True),
            nn.Sigmoid(),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_bilinear(x, self.image_size)
        for layer in self.body[:-1]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body[-1](self.logits(x))


def adaptive_avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` by deterministic means.

    CUDA has no deterministic backward for adaptive average pooling, so ``--deterministic`` would
    stop at the first backward. Where the input divides evenly (every CIFAR/SVHN/STL-10 shape) the
    bins are equal and plain average pooling is the same operation; otherwise the bins (row i covers
    ``floor(i*H/size) .. ceil((i+1)*H/size)``) are applied as two small averaging matrices."""
    h, w = x.shape[-2:]
    if h % size == 0 and w % size == 0:
        return F.avg_pool2d(x, (h // size, w // size))
    return _apply_rows_cols(x, _pool_matrix(h, size, x), _pool_matrix(w, size, x))


def upsample_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling to ``size`` x ``size`` with ``align_corners=True``.

    Under ``torch.use_deterministic_algorithms(True)`` the interpolation runs as two matrix
    products with the interpolation weights (CUDA's bilinear backward accumulates with atomics and
    is refused in deterministic mode); otherwise it is ``F.interpolate``, the fastest kernel."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.interpolate(x, size=[size, size], mode="bilinear", align_corners=True)
    h, w = x.shape[-2:]
    return _apply_rows_cols(x, _bilinear_matrix(h, size, x), _bilinear_matrix(w, size, x))


def _apply_rows_cols(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols.T`` over the last two dimensions."""
    return torch.matmul(torch.matmul(rows, x), cols.t())


def _pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) matrix averaging adaptive-pooling bin i = [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    i = torch.arange(n_out, device=like.device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    k = torch.arange(n_in, device=like.device)
    member = (k[None, :] >= start[:, None]) & (k[None, :] < end[:, None])
    return (member.to(like.dtype) / (end - start)[:, None].to(like.dtype))


def _bilinear_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) align_corners=True linear-interpolation weights, built on the device with
    elementwise ops only (so it can be recorded inside a CUDA graph)."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = torch.arange(n_out, device=like.device, dtype=torch.float64) * scale
    lo = src.floor().clamp(max=n_in - 1)
    frac = src - lo
    hi = (lo + 1).clamp(max=n_in - 1)
    k = torch.arange(n_in, device=like.device, dtype=torch.float64)
    weights = (k[None, :] == lo[:, None]) * (1 - frac)[:, None] + (k[None, :] == hi[:, None]) * frac[:, None]
    return weights.to(like.dtype)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses run in at least fp32: half-precision logits from autocast are promoted, float64
    stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def reconstruction_loss(decoded_logits: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``sigmoid(decoded_logits)`` against the de-normalised input image in [0, 1].

    Computed as BCE-with-logits in at least fp32: the same value as BCE on the sigmoid output
    (without its log clamp at -100), numerically stable in half precision, and allowed under CUDA
    autocast, which refuses ``F.binary_cross_entropy`` whatever its input dtype."""
    z = upcast(decoded_logits)
    return F.binary_cross_entropy_with_logits(z, image01.to(z.dtype))


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss, one view, ``contrast_mode='all'``, as InfoPro uses it.

    Positives of i are the other same-label samples in the batch; an anchor with none contributes
    0 (its positive count is clamped to 1 on the device, so nothing syncs with the host).
    """
    with torch.autocast(features.device.type, enabled=False):
        return _supcon(upcast(features), labels, temperature, base_temperature)


def _supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float) -> torch.Tensor:
    # autocast is off here: the B x B similarity matmul would otherwise run in half precision
    z = F.normalize(features, dim=1)
    sim = z @ z.t() / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    n = z.shape[0]
    not_self = 1.0 - torch.eye(n, device=z.device, dtype=sim.dtype)
    positives = (labels[:, None] == labels[None, :]).to(sim.dtype) * not_self
    log_denominator = torch.log((torch.exp(sim) * not_self).sum(dim=1, keepdim=True))
    log_prob = sim - log_denominator
    mean_pos = (positives * log_prob).sum(dim=1) / positives.sum(dim=1).clamp_min(1.0)
    return -(temperature / base_temperature) * mean_pos.mean()


class PatchDecoder(nn.Module):
    """HPFF's patch feature fusion in the reconstruction term: the feature map and the image are
    each cut into ``patches`` x ``patches`` equal tiles, tile (r, c) of the features is decoded by
    its own :class:`Decoder` to the matching tile of the image (size ``image_size / patches``), and
    the loss is the sum of the tiles' reconstruction losses. Each decoder works at a fraction of the
    full resolution, which is where the aux network's memory saving comes from."""

    def __init__(self, in_channels: int, image_size: int, patches: int = 2, widen: float = 1.0):
        super().__init__()
        self.patches = int(patches)
        self.tile = image_size // self.patches
        self.decoders = nn.ModuleList([Decoder(in_channels, self.tile, widen)
                                       for _ in range(self.patches * self.patches)])

    def loss(self, features: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
        p = self.patches
        fh, fw = features.shape[-2] // p, features.shape[-1] // p
        ih, iw = image01.shape[-2] // p, image01.shape[-1] // p
        total = None
        for r in range(p):
            for c in range(p):
                feat = features[:, :, r * fh:(r + 1) * fh, c * fw:(c + 1) * fw]
                img = image01[:, :, r * ih:(r + 1) * ih, c * iw:(c + 1) * iw]
                term = reconstruction_loss(self.decoders[r * p + c].logits(feat), img)
                total = term if total is None else total + term
        return total
