"""Training methods as objects. A method says two things: which phase an epoch runs (``local``:
every module learns from its own loss on detached input; ``global``: end-to-end), and what a
module's local loss is. The learner (``pgl_fast.core.learner``) runs the steps; nothing else asks
a method's name.

- ``BP()``: every epoch global, no aux heads.
- ``DGL()``: every epoch local; module j's loss is the cross-entropy of its aux head.
- ``InfoPro(contrast, lambdas)``: every epoch local; module j's loss is
  ``lambda_rec * reconstruction(decoder_j(h)) + lambda_task * task(head_j(h))``, the task term
  cross-entropy or (``contrast``) supervised contrastive.
- ``PGL(period, duration, local=DGL())``: P local epochs, then Q global ones, repeating (cycle
  length P + Q, starting local); global epochs train the backbone on the final loss only and each
  head on its own local loss of detached features. ``local`` is the local loss: ``PGL(P, Q,
  local=InfoPro(...))`` is periodic global guidance over InfoPro's loss.

``METHODS`` maps the CLI's names to the classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.heads import Decoder, reconstruction_loss, supcon_loss, upcast
from .schedule import GLOBAL, LOCAL


class Method:
    """Base class: which phase each epoch runs, and the local loss of every module but the last."""

    name = "method"
    has_heads = True     # aux heads exist (and are trained)
    needs_image = False  # the local loss needs the de-normalised input image in [0, 1]
    heads_output_logits = True  # aux heads output class logits (their accuracy can be measured)

    def phase(self, epoch: int) -> str:
        raise NotImplementedError

    def epoch_label(self, epoch: int) -> str:
        """The phase name metrics and logs record for ``epoch``."""
        return self.phase(epoch)

    def phases(self, epochs: int) -> list[str]:
        return [self.phase(e) for e in range(epochs)]

    def has_phase(self, phase: str, epochs: int) -> bool:
        return phase in self.phases(epochs)

    def prepare(self, model) -> None:
        """Add what the local loss needs to ``model`` (InfoPro: its decoders); called once by the learner."""
        if self.has_heads and model.J > 1 and len(model.heads) != model.J - 1:
            raise UserError(f"method {self!r} trains every module on an aux head, but the model has "
                            f"{len(model.heads)} heads for {model.J - 1} cuts (split with aux=...)")

    def local_loss(self, model, j: int, h: torch.Tensor, y: torch.Tensor,
                   image01: torch.Tensor | None = None) -> torch.Tensor:
        """The local loss of module j < J-1 on its output ``h``."""
        return F.cross_entropy(upcast(model.heads[j](h)), y)

    @property
    def local_loss_is_ce(self) -> bool:
        """The local loss is the plain cross-entropy of the head (no method-specific terms)."""
        return True

    def record(self) -> dict:
        return {"method": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.record().items() if k != "method")
        return f"{type(self).__name__}({args})"


class BP(Method):
    name = "bp"
    has_heads = False

    def phase(self, epoch: int) -> str:
        return GLOBAL

    def epoch_label(self, epoch: int) -> str:
        return "bp"  # plain backprop, recorded as such rather than as a global phase of PGL

    def prepare(self, model) -> None:
        return None


class DGL(Method):
    name = "dgl"

    def phase(self, epoch: int) -> str:
        return LOCAL


class InfoPro(Method):
    """InfoPro's local loss. ``lambdas``: one ``(lambda_rec, lambda_task)`` pair for every module, or
    a sequence of J-1 pairs (module j's at index j); default (1, 1)."""

    name = "infopro"
    needs_image = True

    def __init__(self, contrast: bool = False, lambdas: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, 1.0)):
        self.contrast = bool(contrast)
        lambdas = tuple(lambdas)
        if len(lambdas) == 2 and all(isinstance(v, (int, float)) for v in lambdas):
            self._pairs, self._one = None, (float(lambdas[0]), float(lambdas[1]))
        else:
            pairs = tuple((float(a), float(b)) for a, b in lambdas)
            self._pairs, self._one = pairs, None
        self.heads_output_logits = not self.contrast

    def phase(self, epoch: int) -> str:
        return LOCAL

    def lambdas(self, j: int) -> tuple[float, float]:
        if self._one is not None:
            return self._one
        if j >= len(self._pairs):
            raise UserError(f"InfoPro: lambdas has {len(self._pairs)} pairs, module {j} has none")
        return self._pairs[j]

    @property
    def local_loss_is_ce(self) -> bool:
        return False

    def prepare(self, model) -> None:
        super().prepare(model)
        if len(model.decoders) == model.J - 1:
            return
        if len(model.decoders):
            raise UserError(f"InfoPro: the model has {len(model.decoders)} decoders for {model.J - 1} cuts")
        from ..models.cifar_resnet import init_infopro_

        decoders = []
        for j in range(model.J - 1):
            shape = model.out_shape(j)
            if len(shape) != 3 or model.input_shape is None or len(model.input_shape) != 3:
                raise UserError(f"InfoPro reconstructs the input image from (C, H, W) feature maps; module {j} "
                                f"outputs features of shape {shape}")
            decoders.append(Decoder(shape[0], model.input_shape[-1]))
        decoders = torch.nn.ModuleList(decoders)
        init_infopro_(decoders)
        # the decoders run on the model's features: same device and floating dtype (a float64 model
        # feeds float64 features, which an fp32 convolution refuses)
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
        model.decoders = decoders.to(device=p.device, dtype=p.dtype) if p is not None else decoders

    def local_loss(self, model, j, h, y, image01=None):
        lam_rec, lam_task = self.lambdas(j)
        out = model.heads[j](h)
        task = supcon_loss(out, y) if self.contrast else F.cross_entropy(upcast(out), y)
        if image01 is None:
            raise UserError("InfoPro's local loss needs the input image (image01); pass it to the step")
        rec = reconstruction_loss(model.decoders[j].logits(h), image01)
        return lam_rec * rec + lam_task * task

    def record(self) -> dict:
        return {"method": self.name, "contrast": self.contrast,
                "lambdas": list(self._one) if self._one is not None else [list(p) for p in self._pairs]}


class PGL(Method):
    """Periodic Global Guidance: ``period`` local epochs, then ``duration`` global ones."""

    name = "pgl"

    def __init__(self, period: int = 10, duration: int = 2, local: Method | None = None):
        if period < 1 or duration < 0:
            raise UserError(f"PGL(period={period}, duration={duration}): period must be >= 1 and duration >= 0")
        local = DGL() if local is None else local
        if isinstance(local, (PGL, BP)):
            raise UserError(f"PGL(local=...): the local loss comes from DGL or InfoPro, not {type(local).__name__}")
        self.period, self.duration, self.local = int(period), int(duration), local
        self.needs_image = local.needs_image
        self.heads_output_logits = local.heads_output_logits

    def phase(self, epoch: int) -> str:
        return LOCAL if epoch % (self.period + self.duration) < self.period else GLOBAL

    def prepare(self, model) -> None:
        self.local.prepare(model)

    def local_loss(self, model, j, h, y, image01=None):
        return self.local.local_loss(model, j, h, y, image01)

    @property
    def local_loss_is_ce(self) -> bool:
        return self.local.local_loss_is_ce

    def record(self) -> dict:
        return {"method": self.name, "period": self.period, "duration": self.duration, "local": self.local.record()}


METHODS: dict[str, type[Method]] = {"bp": BP, "dgl": DGL, "infopro": InfoPro, "pgl": PGL}


def from_name(name: str, **kwargs) -> Method:
    """``from_name("pgl", period=10, duration=2)``: the method the CLI's ``--method`` names."""
    cls = METHODS.get(name)
    if cls is None:
        raise UserError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return cls(**kwargs)
