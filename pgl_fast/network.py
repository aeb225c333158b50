"""A CIFAR ResNet split into J local modules, with one aux head (and for InfoPro one decoder) at
every cut. Module j is ``nn.Sequential`` of its units; the last module also owns the classifier.

``LocalNet.forward`` is plain end-to-end inference; the training executors in ``engine.py`` drive
``blocks[j]``, ``heads[j]`` and ``classifier`` one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .heads import Decoder, build_head
from .models import Classifier, build_units, init_infopro_, unit_shapes
from .splits import resolve_split


@dataclass(frozen=True)
class ModuleInfo:
    index: int
    units: tuple[int, int]
    out_channels: int
    out_size: int
    head: str | None


class LocalNet(nn.Module):
    def __init__(self, arch: str, J: int, *, num_classes: int = 10, image_size: int = 32,
                 split: str = "auto", split_recipe: str = "cifar10", aux: str | None = "1c2f",
                 aux_widen: float = 1.0, aux_feature_dim: int = 128, head_out_dim: int | None = None,
                 decoders: bool = False, droprate: float = 0.0):
        super().__init__()
        self.arch, self.J = arch, J
        self.ranges = resolve_split(arch, J, split, split_recipe)
        units = build_units(arch, droprate)
        shapes = unit_shapes(arch, image_size)
        self.blocks = nn.ModuleList(nn.Sequential(*units[a:b]) for a, b in self.ranges)
        self.units = units  # the same modules, flat (plain list: not registered twice)
        self.classifier = Classifier(units[-1].out_channels, num_classes)
        heads, decs, info = [], [], []
        for j, (a, b) in enumerate(self.ranges):
            c, s = shapes[b - 1]
            is_last = j == J - 1
            head_name = None
            if aux is not None and not is_last:
                head = build_head(aux, c, s, head_out_dim or num_classes, aux_widen, aux_feature_dim)
                heads.append(head)
                head_name = head.config
                if decoders:
                    decs.append(Decoder(c, image_size, aux_widen))
            info.append(ModuleInfo(j, (a, b), c, s, head_name if not is_last else "classifier"))
        self.heads = nn.ModuleList(heads)
        self.decoders = nn.ModuleList(decs)
        self.info = info
        init_infopro_(self)

    # -- parameter groups ----------------------------------------------------------------------
    def module_parameters(self, j: int) -> list[nn.Parameter]:
        """Backbone parameters of module j (the last module includes the classifier)."""
        params = list(self.blocks[j].parameters())
        if j == self.J - 1:
            params += list(self.classifier.parameters())
        return params

    def aux_parameters(self, j: int) -> list[nn.Parameter]:
        """Aux head (and decoder) parameters attached after module j (empty for the last)."""
        params: list[nn.Parameter] = []
        if j < len(self.heads):
            params += list(self.heads[j].parameters())
        if j < len(self.decoders):
            params += list(self.decoders[j].parameters())
        return params

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for j in range(self.J) for p in self.module_parameters(j)]

    def set_head_kernels(self, on: bool) -> None:
        for h in self.heads:
            h.use_kernels = on and hasattr(h, "convs") and isinstance(h.convs, nn.ModuleList)

    def set_lean_blocks(self, on: bool) -> None:
        for u in self.units:
            if hasattr(u, "lean"):
                u.lean = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.classifier(x)

    # -- description ---------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        rows = []
        for j, inf in enumerate(self.info):
            rows.append({
                "module": j,
                "units": f"{inf.units[0]}-{inf.units[1] - 1}",
                "n_units": inf.units[1] - inf.units[0],
                "out_shape": f"{inf.out_channels}x{inf.out_size}x{inf.out_size}",
                "aux": inf.head,
                "module_params": sum(p.numel() for p in self.module_parameters(j)),
                "aux_params": sum(p.numel() for p in self.aux_parameters(j)),
            })
        return rows

    def count_parameters(self) -> dict[str, int]:
        backbone = sum(p.numel() for p in self.backbone_parameters())
        aux = sum(p.numel() for j in range(self.J) for p in self.aux_parameters(j))
        return {"backbone": backbone, "aux": aux, "total": backbone + aux}
