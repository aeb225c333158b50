"""A network cut into J local modules: ``blocks[j]`` is module j, ``heads[j]`` the aux head on its
output (j < J-1), ``classifier`` the network's own output head after the last module, and, for
InfoPro, ``decoders[j]`` beside ``heads[j]``. MAN adds ``lb_blocks[j]`` (learnable, part of module
j's aux parameters) and ``ema_blocks[j]`` (moving averages, stepped by no optimizer) on module j's
aux path.

``LocalModel.forward`` is plain end-to-end inference; the learner (``pgl_fast.core.learner``)
drives the pieces one at a time. A *unit* is the smallest piece a global step may checkpoint
separately: the children of a block that is an ``nn.Sequential``, else the block itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class ModuleInfo:
    index: int
    units: tuple[int, int]
    out_shape: tuple[int, ...]  # per-sample output shape of the module (before the classifier)
    head: str | None  # the aux head's config name, "classifier" for the last module


def _in_place(m: nn.Module) -> bool:
    return getattr(m, "inplace", False) is True and not any(True for _ in m.parameters())


def block_units(block: nn.Module) -> list[nn.Module]:
    """The units of a block: its children when it is an ``nn.Sequential``, else the block. A child
    that works in place on its input (``ReLU(inplace=True)``) joins the unit before it: a checkpoint
    boundary right before it would hand it a tensor the checkpoint keeps for its recomputation."""
    if not (isinstance(block, nn.Sequential) and len(block)):
        return [block]
    units: list[nn.Module] = []
    for child in block.children():
        if units and _in_place(child):
            prev = units[-1]
            units[-1] = prev + nn.Sequential(child) if isinstance(prev, nn.Sequential) and getattr(
                prev, "_pgl_merged", False) else nn.Sequential(prev, child)
            units[-1]._pgl_merged = True
        else:
            units.append(child)
    return units


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


class LocalModel(nn.Module):
    """``LocalModel(blocks, classifier, heads)``: the pieces of a locally trained network.

    ``heads`` holds one aux head per cut (J-1 of them), or nothing for end-to-end training. Shapes
    are found by :meth:`probe` (``pgl_fast.split`` probes for you)."""

    def __init__(self, blocks: Sequence[nn.Module], classifier: nn.Module, heads: Sequence[nn.Module] | None = None,
                 *, decoders: Sequence[nn.Module] | None = None, name: str = "model"):
        super().__init__()
        blocks, heads, decoders = list(blocks), list(heads or []), list(decoders or [])
        if not blocks:
            raise UserError("LocalModel: blocks is empty; give at least one module")
        for what, items in (("blocks", blocks), ("heads", heads), ("decoders", decoders), ("classifier", [classifier])):
            for i, m in enumerate(items):
                if not isinstance(m, nn.Module):
                    raise UserError(f"LocalModel: {what}[{i}] is a {type(m).__name__}, not an nn.Module")
        J = len(blocks)
        if heads and len(heads) != J - 1:
            raise UserError(f"LocalModel: {J} blocks need {J - 1} heads (one per cut, none after the last block), "
                            f"got {len(heads)}")
        if decoders and len(decoders) != J - 1:
            raise UserError(f"LocalModel: {J} blocks need {J - 1} decoders, got {len(decoders)}")
        self.name = name
        self.J = J
        self.blocks = nn.ModuleList(blocks)
        self.classifier = classifier
        self.heads = nn.ModuleList(heads)
        self.decoders = nn.ModuleList(decoders)
        # names of further per-cut aux sets a method registers (``register_aux``), each an
        # nn.ModuleDict keyed by the module index
        self.aux_sets: list[str] = []
        # MAN's copies of module j+1's first unit (empty for the other methods: no state_dict keys)
        self.lb_blocks = nn.ModuleList()
        self.ema_blocks = nn.ModuleList()
        self.input_shape: tuple[int, ...] | None = None
        self.unit_out_shapes: list[tuple[int, ...]] | None = None
        self.num_classes: int | None = None

    # -- units -----------------------------------------------------------------------------------
    # Derived from the registered blocks on every read, never stored: a merged unit is a fresh
    # wrapper around the blocks' current children, so a child swapped in place after construction
    # (synchronised batch norm, a compile or lean variant) is what global steps run too. A stored
    # list would keep the replaced modules alive behind the blocks' backs.
    @property
    def units(self) -> list[nn.Module]:
        """The same modules as ``blocks``, flat (a plain list: not registered twice)."""
        return [u for b in self.blocks for u in block_units(b)]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Module j's units are ``units[a:b]`` for ``(a, b) = ranges[j]``."""
        ranges, start = [], 0
        for b in self.blocks:
            n = len(block_units(b))
            ranges.append((start, start + n))
            start += n
        return ranges

    # -- shapes ------------------------------------------------------------------------------------
    @torch.no_grad()
    def probe(self, input_shape: Sequence[int], example: torch.Tensor | None = None) -> "LocalModel":
        """One forward of a 2-sample batch at ``input_shape`` (per sample, e.g. (3, 32, 32)) in eval
        mode, recording every unit's output shape and the class count; returns self. ``example``: a
        batch to probe with instead of zeros (a model with integer inputs, e.g. token ids)."""
        input_shape = tuple(int(s) for s in input_shape)
        p = next((q for q in self.parameters() if q.is_floating_point()), None)
        if example is not None:
            x = example.to(device=p.device if p is not None else None)
        else:
            x = torch.zeros((2, *input_shape), device=p.device if p is not None else None,
                            dtype=p.dtype if p is not None else torch.get_default_dtype())
        was = self.training
        self.eval()
        shapes = []
        try:
            for i, u in enumerate(self.units):
                try:
                    x = u(x)
                except Exception as e:  # a user's model: name the piece that failed
                    raise UserError(f"probe forward at input shape {input_shape}: unit {i} "
                                    f"({type(u).__name__}) failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
                if not isinstance(x, torch.Tensor):
                    raise UserError(f"unit {i} ({type(u).__name__}) returns a {type(x).__name__}, not a tensor; "
                                    "every block must map one tensor to one tensor")
                shapes.append(tuple(x.shape[1:]))
            out = self.classifier(x)
        finally:
            self.train(was)
        self.input_shape, self.unit_out_shapes = input_shape, shapes
        self.num_classes = int(out.shape[-1])
        return self

    def out_shape(self, j: int) -> tuple[int, ...]:
        """Per-sample output shape of module j (needs :meth:`probe`)."""
        if self.unit_out_shapes is None:
            raise UserError("LocalModel shapes are unknown: call model.probe(input_shape) first")
        return self.unit_out_shapes[self.ranges[j][1] - 1]

    @property
    def info(self) -> list[ModuleInfo]:
        out = []
        for j, r in enumerate(self.ranges):
            head = "classifier" if j == self.J - 1 else (
                getattr(self.heads[j], "config", type(self.heads[j]).__name__) if j < len(self.heads) else None)
            out.append(ModuleInfo(j, r, self.out_shape(j) if self.unit_out_shapes else (), head))
        return out

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
        if j < len(self.lb_blocks):
            params += list(self.lb_blocks[j].parameters())
        for name in self.aux_sets:
            group = getattr(self, name)
            if str(j) in group:
                params += list(group[str(j)].parameters())
        return params

    def register_aux(self, name: str, per_module: dict[int, nn.Module]) -> None:
        """Register a method's further aux networks (``per_module[j]`` learns with module j): they
        become the submodule ``name`` (in the state dict) and part of ``aux_parameters(j)``."""
        if hasattr(self, name):
            raise UserError(f"LocalModel: it already has an attribute {name!r}")
        setattr(self, name, nn.ModuleDict({str(j): m for j, m in per_module.items()}))
        self.aux_sets.append(name)

    def ema_parameters(self, j: int) -> list[nn.Parameter]:
        """MAN's moving-average copy on module j's aux path (empty for the other methods)."""
        return list(self.ema_blocks[j].parameters()) if j < len(self.ema_blocks) else []

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for j in range(self.J) for p in self.module_parameters(j)]

    def set_head_kernels(self, on: bool) -> None:
        for h in self.heads:
            if hasattr(h, "use_kernels"):
                h.use_kernels = on and hasattr(h, "convs") and isinstance(h.convs, nn.ModuleList) and len(h.convs) > 0

    def set_lean_blocks(self, on: bool) -> None:
        for u in self.units:
            for m in u.modules():
                if hasattr(m, "lean"):
                    m.lean = on

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
                "out_shape": shape_text(inf.out_shape) if inf.out_shape else "?",
                "aux": inf.head,
                "module_params": sum(p.numel() for p in self.module_parameters(j)),
                "aux_params": sum(p.numel() for p in self.aux_parameters(j)),
            })
            if len(self.ema_blocks):  # MAN: the moving-average copy on the aux path, stepped by no optimizer
                rows[-1]["ema_params"] = sum(p.numel() for p in self.ema_parameters(j))
        return rows

    def count_parameters(self) -> dict[str, int]:
        """Trainable backbone and aux parameters; with MAN also ``ema``, its moving-average copies
        (in ``total`` too: they are parameters of the model that no optimizer steps)."""
        backbone = sum(p.numel() for p in self.backbone_parameters())
        aux = sum(p.numel() for j in range(self.J) for p in self.aux_parameters(j))
        if not len(self.ema_blocks):
            return {"backbone": backbone, "aux": aux, "total": backbone + aux}
        ema = sum(p.numel() for j in range(self.J) for p in self.ema_parameters(j))
        return {"backbone": backbone, "aux": aux, "ema": ema, "total": backbone + aux + ema}
