"""Ready-made :class:`~pgl_fast.models.local_model.LocalModel` s: the paper's CIFAR ResNets split by
InfoPro's tables (``cifar_resnet``), torchvision's classification models (``torchvision_model``) and
a user's own factory named ``package.module:function`` (``factory_model``)."""
from __future__ import annotations

import importlib

from torch import nn

from ..errors import UserError
from .cifar_resnet import Classifier, build_units, init_infopro_, unit_shapes
from .heads import Decoder, build_head
from .local_model import LocalModel
from .splits import resolve_split


def cifar_resnet(arch: str, J: int, *, num_classes: int = 10, image_size: int = 32, split: str = "auto",
                 split_recipe: str = "cifar10", aux: str | None = "1c2f", aux_widen: float = 1.0,
                 aux_feature_dim: int = 128, head_out_dim: int | None = None, decoders: bool = False,
                 droprate: float = 0.0) -> LocalModel:
    """A CIFAR ResNet-(6n+2) as InfoPro builds it, cut into J modules with an aux head (and for
    InfoPro a decoder) at every cut; InfoPro's initialisation over everything."""
    ranges = resolve_split(arch, J, split, split_recipe)
    units = build_units(arch, droprate)
    shapes = unit_shapes(arch, image_size)
    blocks = [nn.Sequential(*units[a:b]) for a, b in ranges]
    classifier = Classifier(units[-1].out_channels, num_classes)
    heads, decs = [], []
    for a, b in ranges[:-1]:
        c, s = shapes[b - 1]
        if aux is not None:
            heads.append(build_head(aux, (c, s, s), head_out_dim or num_classes, aux_widen, aux_feature_dim))
            if decoders:
                decs.append(Decoder(c, image_size, aux_widen))
    model = LocalModel(blocks, classifier, heads, decoders=decs, name=arch)
    init_infopro_(model)
    return model.probe((3, image_size, image_size))


def _load_factory(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UserError(f"--model {spec!r}: expected package.module:factory (a callable returning an nn.Module)")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"--model {spec}: cannot import {mod_name} ({e})") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"--model {spec}: {mod_name} has no attribute {attr}")
    if not callable(fn):
        raise UserError(f"--model {spec}: {attr} is not callable")
    return fn


def factory_model(spec: str, num_classes: int) -> nn.Module:
    """``package.module:factory`` called as ``factory(num_classes=N)`` (or with no argument when it
    takes none); it must return an nn.Module."""
    fn = _load_factory(spec)
    try:
        model = fn(num_classes=num_classes)
    except TypeError:
        model = fn()
    if isinstance(model, LocalModel) or isinstance(model, nn.Module):
        return model
    raise UserError(f"--model {spec}: the factory returned a {type(model).__name__}, not an nn.Module")


def cifar_stem(model: nn.Module) -> nn.Module:
    """The usual change for 32x32 inputs to an ImageNet-style torchvision model: the first conv
    becomes 3x3 stride 1 (same output channels) and the max-pool after it is removed. Applies to the
    ResNet family (``conv1``/``maxpool``); other families raise."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError(f"--cifar-stem: {type(model).__name__} has no conv1/maxpool stem to change "
                        "(supported: torchvision's ResNet family)")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)
    model.maxpool = nn.Identity()
    return model


def torchvision_model(name: str, num_classes: int, *, cifar_stem_: bool = False) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=...)`` with random weights."""
    import torchvision  # heavy to import: only where a torchvision model is built

    try:
        names = torchvision.models.list_models(module=torchvision.models)
    except TypeError:
        names = torchvision.models.list_models()
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:8]
        raise UserError(f"--arch torchvision:{name}: torchvision has no classification model {name!r}"
                        + (f" (similar: {', '.join(close)})" if close else ""))
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return cifar_stem(model) if cifar_stem_ else model
