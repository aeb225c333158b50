"""Training methods as objects. A method says two things: which phase an epoch runs (``local``:
every module learns from its own loss on detached input; ``global``: end-to-end), and what a
module's local loss is. The learner (``pgl_fast.core.learner``) runs the steps; nothing else asks
a method's name.

- ``BP()``: every epoch global, no aux heads.
- ``DGL()``: every epoch local; module j's loss is the cross-entropy of its aux head.
- ``InfoPro(contrast, lambdas)``: every epoch local; module j's loss is
  ``lambda_rec * reconstruction(decoder_j(h)) + lambda_task * task(head_j(h))``, the task term
  cross-entropy or (``contrast``) supervised contrastive.
- ``HPFF(wx, wy, base, patches)``: every epoch local; hierarchical local learning with patch
  feature fusion (ECCV 2024). Module j's loss at its cut is ``wx * IL_j + wy * CL_j``: IL_j is the
  task loss of the model's aux head on module j's own output (its input detached), CL_j the base
  method's loss, through a second set of heads and patch decoders, on the output of modules j-1
  and j run in cascade from the detached input of module j-1, so its gradient reaches both. The
  last module: ``wx * CE + wy * CE`` of the two paths. See :class:`HPFF`.
- ``MAN(momentum, base=DGL())``: every epoch local; module j's aux network sees
  ``LB_j(h) + EMA_j(h)``, a learnable copy and a momentum (EMA) copy of the first unit of module
  j+1, and ``base``'s loss (DGL's or InfoPro's) acts on that (Momentum Auxiliary Network).
- ``PGL(period, duration, local=DGL())``: P local epochs, then Q global ones, repeating (cycle
  length P + Q, starting local); global epochs train the backbone on the final loss only and each
  head on its own local loss of detached features. ``local`` is the local loss: ``PGL(P, Q,
  local=InfoPro(...))`` is periodic global guidance over InfoPro's loss, ``local=MAN()`` over MAN's.

``METHODS`` maps the CLI's names to the classes; :func:`local_objectives` names those whose epochs
are all local (what ``PGL(local=...)`` and ``--pgl-local`` take).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..registry import add_entry
from ..models.cifar_resnet import init_infopro_
from ..models.heads import Decoder, PatchDecoder, build_head, reconstruction_loss, supcon_loss, upcast
from ..models.local_model import block_units
from .schedule import GLOBAL, LOCAL


class Method:
    """Base class: which phase each epoch runs, and the local loss of every module but the last."""

    name = "method"
    has_heads = True     # aux heads exist (and are trained)
    needs_image = False  # the local loss needs the de-normalised input image in [0, 1]
    heads_output_logits = True  # aux heads output class logits (their accuracy can be measured)
    # how many consecutive modules, ending at module j, the loss at cut j reaches (1: module j
    # only). The local step keeps the activations of that many modules alive and steps a module
    # once no later loss can reach it.
    reach = 1
    # What this objective cannot be combined with, and why: the one list of its refusals, which the
    # CLI's config, the learner and a pipeline's build_stage all read. Keys: "pipeline" (module
    # pipeline), "compile", "cuda_graphs", "fused_heads" (the fused Triton head kernels).
    refuses: dict[str, str] = {}

    @property
    def objective(self) -> "Method":
        """The local objective whose loss the modules learn (PGL: its ``local``)."""
        return self

    def refusal(self, option: str) -> str | None:
        """Why ``option`` cannot run with this method's objective (None: it can), as a one-line
        reason naming the objective."""
        why = self.objective.refuses.get(option)
        return None if why is None else f"is not supported with {self.objective.name.upper()}: {why}"

    @classmethod
    def from_config(cls, cfg, objective) -> "Method":
        """The method as a run's flags configure it (``cfg``: a ``TrainConfig``, read for this
        method's own fields only); ``objective(name)`` builds another registered method from the
        same flags (a base or local loss). A method without flags of its own takes the defaults."""
        return cls()

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

    def local_parts(self, model, j: int, h: torch.Tensor, y: torch.Tensor,
                    image01: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Module j's loss at its cut in a local step as ``(own, back)``: ``own`` reaches module j
        only, ``back`` also the ``reach - 1`` modules before it (None: no such term)."""
        return self.local_loss(model, j, h, y, image01), None

    def final_parts(self, loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The last module's final loss in a local step as ``(own, back)``, as ``local_parts``."""
        return loss, None

    def aux_input(self, model, j: int, h: torch.Tensor) -> torch.Tensor:
        """What module j's aux head sees when module j outputs ``h`` (the output itself; MAN: its
        aux path). Evaluation scores the heads on this."""
        return h

    def after_local_backward(self, model, j: int) -> None:
        """Called by the learner right after the backward of module j's local loss, in local and
        global steps alike (MAN's EMA update); nothing for the other methods."""
        return None

    @property
    def plain_heads(self) -> bool:
        """The aux heads sit directly on the module outputs (what the fused head kernels and their
        per-head selection are measured for)."""
        return True

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

    @classmethod
    def from_config(cls, cfg, objective) -> "InfoPro":
        return cls(contrast=cfg.infopro_loss == "contrast",
                   lambdas=[cfg.infopro_lambdas(j) for j in range(cfg.modules - 1)])
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

def _fresh_copy(unit: nn.Module, what: str) -> nn.Module:
    """A copy of ``unit`` with parameters and statistics of its own, initialised afresh: every
    submodule's ``reset_parameters`` (which also resets batch-norm statistics), then the engine's
    conv / batch-norm initialisation, the same that every other part of the network gets."""
    try:
        c = copy.deepcopy(unit)
    except Exception as e:  # a user's block that deepcopy cannot handle (open handles, locks, ...)
        raise UserError(f"MAN cannot copy {what} ({type(unit).__name__}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    with torch.no_grad():
        for m in c.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
        init_infopro_(c)
    for m in c.modules():
        if hasattr(m, "lean"):
            m.lean = False  # the memory-lean backward is the backbone's option (--lean-blocks)
    return c


class MAN(Method):
    """Momentum Auxiliary Network: module j's aux network (head, and ``base``'s decoder) sees
    ``LB_j(h) + EMA_j(h)`` instead of module j's output ``h``.

    What is copied: the first unit of module j+1 (``model.units[model.ranges[j+1][0]]``; for the
    CIFAR ResNets the first residual block after the cut), twice, each with freshly initialised
    parameters and statistics (neither starts equal to that unit):

    - ``model.lb_blocks[j]`` (the learnable bias): trained by module j's local loss, stepped by
      module j's optimizer (it is part of ``model.aux_parameters(j)``);
    - ``model.ema_blocks[j]``: parameters with ``requires_grad`` off (no optimizer steps them, yet
      the gradient of the local loss flows *through* it to module j). Only its parameters follow
      the unit; its batch-norm statistics are its own, updated by its forwards.

    The EMA rule, the same in local and in global steps: once per training step and module, right
    after the backward of module j's local loss, ``ema = momentum * ema + (1 - momentum) * theta``
    for every parameter, where ``theta`` is that parameter of module j+1's first unit as it is
    before this step's update of module j+1 (every module's optimizer steps after its own
    backward, and module j+1's backward comes after module j's). In PGL's global epochs the heads
    (and LB) still learn from their local loss on detached features and the EMA copy keeps
    following module j+1.

    The heads and decoders act at the copied unit's output shape, so ``prepare`` rebuilds a head
    built by ``build_head`` (the presets, ``split(aux="...")``) at that shape with the same
    configuration; a head of the user's own (``split(aux=callable)``) must take that shape. A unit
    without parameters (a pooling or activation layer) cannot be copied meaningfully: refused.

    ``momentum``: the published runs use 0.995. ``base``: the loss on the aux path, ``DGL()``
    (a cross-entropy head: "DGL+MAN") or ``InfoPro(...)`` ("InfoPro+MAN")."""

    name = "man"
    refuses = {
        "pipeline": "module j's EMA copy follows module j+1, which would live on another stage's rank; train it in "
                    "one process or data parallel (torchrun without --pipeline)",
        "fused_heads": "the fused kernels are for heads on the module outputs, and its heads sit on its aux path",
    }

    @classmethod
    def from_config(cls, cfg, objective) -> "MAN":
        return cls(cfg.man_momentum, base=objective(cfg.man_base))

    def __init__(self, momentum: float = 0.995, base: Method | None = None):
        base = DGL() if base is None else base
        if type(base) not in (DGL, InfoPro):
            raise UserError(f"MAN(base=...): the loss on MAN's aux path is DGL's or InfoPro's, not {type(base).__name__}")
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"MAN(momentum={momentum}): the EMA momentum must be in [0, 1]")
        self.momentum, self.base = momentum, base
        self.needs_image = base.needs_image
        self.heads_output_logits = base.heads_output_logits

    def phase(self, epoch: int) -> str:
        return LOCAL

    @property
    def local_loss_is_ce(self) -> bool:
        return False

    @property
    def plain_heads(self) -> bool:
        return False

    def prepare(self, model) -> None:
        self.base.prepare(model)
        cuts = model.J - 1
        if len(model.lb_blocks) == cuts and len(model.ema_blocks) == cuts:
            return  # prepared by an earlier learner of this model
        if len(model.lb_blocks) or len(model.ema_blocks):
            raise UserError(f"MAN: the model has {len(model.lb_blocks)} learnable and {len(model.ema_blocks)} EMA "
                            f"copies for {cuts} cuts")
        if model.unit_out_shapes is None:
            raise UserError("MAN sizes the aux networks from the model's shapes: call model.probe(input_shape) first")
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
        units = model.units
        lbs, emas = [], []
        for j in range(cuts):
            a = model.ranges[j + 1][0]
            unit, what = units[a], f"the first unit of module {j + 1}"
            if not any(True for _ in unit.parameters()):
                raise UserError(f"MAN copies {what} ({type(unit).__name__}) into module {j}'s aux network, but it "
                                "has no parameters; cut so that every module after the first starts with a block "
                                "that has parameters")
            lb, ema = _fresh_copy(unit, what), _fresh_copy(unit, what)
            ema.requires_grad_(False)
            lbs.append(lb)
            emas.append(ema)
            shape = tuple(model.unit_out_shapes[a])
            self._fit_head(model, j, shape, p)
            if j < len(model.decoders) and getattr(model.decoders[j], "in_channels", shape[0]) != shape[0]:
                dec = model.decoders[j]
                if len(shape) != 3:
                    raise UserError(f"MAN with InfoPro reconstructs the image from (C, H, W) feature maps; {what} "
                                    f"outputs features of shape {shape}")
                self._replace(model.decoders, j, Decoder(shape[0], dec.image_size, dec.widen), p)
        model.lb_blocks = nn.ModuleList(lbs)
        model.ema_blocks = nn.ModuleList(emas)

    @staticmethod
    def _replace(modules: nn.ModuleList, j: int, new: nn.Module, p) -> None:
        init_infopro_(new)  # as the heads and decoders the presets and split() build
        modules[j] = new.to(device=p.device, dtype=p.dtype) if p is not None else new

    def _fit_head(self, model, j: int, shape: tuple[int, ...], p) -> None:
        """Head j takes the copied unit's output ``shape``: rebuilt at it when ``build_head`` made
        it for another shape, checked by one forward when it is the user's own."""
        head = model.heads[j]
        spec = getattr(head, "spec", None)
        if spec is not None:
            if tuple(spec["in_shape"]) != shape:
                try:
                    new = build_head(spec["config"], shape, spec["out_dim"], spec["widen"], spec["feature_dim"])
                except ValueError as e:
                    raise UserError(f"MAN: aux head of module {j}: {e}") from None
                new.use_kernels = False
                self._replace(model.heads, j, new, p)
            return
        x = torch.zeros((2, *shape), device=p.device if p is not None else None,
                        dtype=p.dtype if p is not None else None)
        was = head.training
        head.eval()
        try:
            with torch.no_grad():
                head(x)
        except Exception:
            raise UserError(f"MAN: the aux head of module {j} ({type(head).__name__}) does not take features of "
                            f"shape {shape}, the output of the first unit of module {j + 1} that MAN's aux path "
                            "feeds it; build the heads for those shapes") from None
        finally:
            head.train(was)

    def aux_input(self, model, j, h):
        return model.lb_blocks[j](h) + model.ema_blocks[j](h)

    def local_loss(self, model, j, h, y, image01=None):
        return self.base.local_loss(model, j, self.aux_input(model, j, h), y, image01)

    @torch.no_grad()
    def after_local_backward(self, model, j):
        if j >= len(model.ema_blocks):
            return
        ema = list(model.ema_blocks[j].parameters())
        theta = list(block_units(model.blocks[j + 1])[0].parameters())
        # device-side and in place (two multi-tensor launches): a CUDA graph of the local step
        # captures it, and nothing waits for the host
        torch._foreach_mul_(ema, self.momentum)
        torch._foreach_add_(ema, theta, alpha=1.0 - self.momentum)

    def record(self) -> dict:
        return {"method": self.name, "momentum": self.momentum, "base": self.base.record()}


class PGL(Method):
    """Periodic Global Guidance: ``period`` local epochs, then ``duration`` global ones."""

    name = "pgl"

    @classmethod
    def from_config(cls, cfg, objective) -> "PGL":
        return cls(cfg.period, cfg.duration, local=objective(cfg.pgl_local))

    def __init__(self, period: int = 10, duration: int = 2, local: Method | None = None):
        if period < 1 or duration < 0:
            raise UserError(f"PGL(period={period}, duration={duration}): period must be >= 1 and duration >= 0")
        local = DGL() if local is None else local
        if not isinstance(local, Method) or not all_local(local):
            raise UserError(f"PGL(local=...): the local loss comes from a method whose epochs are all local "
                            f"({', '.join(local_objectives())}), not {type(local).__name__}")
        self.period, self.duration, self.local = int(period), int(duration), local
        self.needs_image = local.needs_image
        self.heads_output_logits = local.heads_output_logits
        self.reach = local.reach

    @property
    def objective(self) -> Method:
        return self.local.objective

    def phase(self, epoch: int) -> str:
        return LOCAL if epoch % (self.period + self.duration) < self.period else GLOBAL

    def prepare(self, model) -> None:
        self.local.prepare(model)

    def local_loss(self, model, j, h, y, image01=None):
        return self.local.local_loss(model, j, h, y, image01)

    def local_parts(self, model, j, h, y, image01=None):
        return self.local.local_parts(model, j, h, y, image01)

    def final_parts(self, loss):
        return self.local.final_parts(loss)

    def aux_input(self, model, j, h):
        return self.local.aux_input(model, j, h)

    def after_local_backward(self, model, j):
        self.local.after_local_backward(model, j)

    @property
    def local_loss_is_ce(self) -> bool:
        return self.local.local_loss_is_ce

    @property
    def plain_heads(self) -> bool:
        return self.local.plain_heads

    def record(self) -> dict:
        return {"method": self.name, "period": self.period, "duration": self.duration, "local": self.local.record()}


# HPFF's published runs (ResNet-32/110 on CIFAR-10): InfoPro's loss with the softmax task term and
# lambdas (ixx_1, ixy_1, ixx_2, ixy_2) = (5, 0.5, 0, 0), linear over the modules as InfoPro's are
HPFF_LAMBDAS = (5.0, 0.5, 0.0, 0.0)


def interpolated_lambdas(J: int, ends: Sequence[float]) -> list[tuple[float, float]]:
    """InfoPro's per-module lambdas of modules 0..J-2: linear from (ixx_1, ixy_1) at module 0 to
    (ixx_2, ixy_2) at module J-2."""
    ixx_1, ixy_1, ixx_2, ixy_2 = (float(v) for v in ends)
    out = []
    for j in range(J - 1):
        r = j / (J - 2) if J > 2 else 0.0
        out.append((ixx_1 * (1 - r) + ixx_2 * r, ixy_1 * (1 - r) + ixy_2 * r))
    return out


class HPFF(Method):
    """HPFF: hierarchical locally supervised learning with patch feature fusion (ECCV 2024).

    Two paths per batch. The independent path runs every module on the detached output of the
    module before it; at cut j the model's aux head gives ``IL_j``, the base method's task term
    (cross-entropy, or SupCon for a contrastive InfoPro base). The cascade path runs modules j-1
    and j together on the detached output of module j-2 (groups of two overlapping modules); at
    cut j a second set of aux heads and, for an InfoPro base, patch decoders give ``CL_j``, the
    base method's loss with the reconstruction term taken over patches (:class:`PatchDecoder`:
    the feature map and image cut into ``patches`` x ``patches`` tiles, each decoded by its own
    decoder, losses summed). Module j's loss is ``wx * IL_j + wy * CL_j``; its gradient reaches
    module j from both terms and module j-1 from ``CL_j``. Both paths compute the same values (the
    parameters change only after the step), so the engine runs the forward once and lets
    ``CL_j``'s gradient flow on into module j-1.

    Module 0 has no loss of its own (as in the published code, whose stem and first module learn
    only from the cascade loss at cut 1), so its aux head is unused and its loss is recorded as NaN.
    The last module's loss is ``wx * CE + wy * CE`` of the two paths through the classifier, the
    second reaching module J-2.

    ``base``: ``DGL()`` (``CL_j`` is the cross-entropy of the second head) or ``InfoPro(...)``;
    None is the published runs: InfoPro with the softmax task term and lambdas interpolated from
    (5, 0.5) at module 0 to (0, 0) at module J-2 (``HPFF_LAMBDAS``). ``wx``, ``wy``: the weights of
    the two paths (published 0.001 and 0.999).

    In PGL's global epochs (``PGL(P, Q, local=HPFF())``) the backbone learns from the final loss
    only; at every cut j >= 1 both head sets (and the patch decoders) learn ``wx * IL_j + wy *
    CL_j`` on the detached features of the cut.
    """

    name = "hpff"
    reach = 2
    refuses = {
        "pipeline": "its loss reaches two modules, so the stages would have to pass gradients back upstream "
                    "mid-step; data parallel is exact",
        "compile": "the compiled pieces run one module at a time, and its loss reaches two",
        "cuda_graphs": "its two-module local step is not captured",
    }

    @classmethod
    def from_config(cls, cfg, objective) -> "HPFF":
        # the InfoPro base of HPFF's published runs uses the softmax task term, with --ixx-*/--ixy-*
        base = DGL() if cfg.hpff_base == "dgl" else InfoPro(
            contrast=False, lambdas=[cfg.infopro_lambdas(j) for j in range(cfg.modules - 1)])
        return cls(wx=cfg.hpff_wx, wy=cfg.hpff_wy, base=base, patches=cfg.hpff_patches)

    def __init__(self, wx: float = 0.001, wy: float = 0.999, base: Method | None = None, patches: int = 2):
        if base is not None and type(base) not in (DGL, InfoPro):
            raise UserError(f"HPFF(base=...): the base loss is DGL() or InfoPro(...), not {type(base).__name__}")
        if not (wx >= 0 and wy >= 0 and wx + wy > 0):
            raise UserError(f"HPFF(wx={wx}, wy={wy}): the path weights must be >= 0 and not both 0")
        if int(patches) != patches or patches < 1:
            raise UserError(f"HPFF(patches={patches}): the tiles per side must be an integer >= 1")
        self.wx, self.wy, self.patches = float(wx), float(wy), int(patches)
        self.base_given = base
        self.base = base
        if base is not None:
            self.needs_image = isinstance(base, InfoPro)
            self.heads_output_logits = base.heads_output_logits
        else:
            self.needs_image = True

    def phase(self, epoch: int) -> str:
        return LOCAL

    @property
    def local_loss_is_ce(self) -> bool:
        return False

    def _resolve_base(self, J: int) -> Method:
        if self.base is None:
            self.base = InfoPro(contrast=False, lambdas=interpolated_lambdas(J, HPFF_LAMBDAS))
        return self.base

    def prepare(self, model) -> None:
        super().prepare(model)
        base = self._resolve_base(model.J)
        if "hpff_heads" in getattr(model, "aux_sets", ()):
            return
        cuts = list(range(1, model.J - 1))
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
        to = (lambda m: m.to(device=p.device, dtype=p.dtype)) if p is not None else (lambda m: m)
        heads = {}
        for j in cuts:
            # the second head has the first one's architecture and its own initial weights
            head = copy.deepcopy(model.heads[j])
            for m in head.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            init_infopro_(head)
            heads[j] = to(head)
        model.register_aux("hpff_heads", heads)
        if isinstance(base, InfoPro):
            decoders = {}
            for j in cuts:
                shape = model.out_shape(j)
                if len(shape) != 3 or model.input_shape is None or len(model.input_shape) != 3:
                    raise UserError(f"HPFF: patch decoders need (C, H, W) feature maps; module {j} outputs {shape} "
                                    "(use HPFF(base=DGL()) for other features)")
                side = self.patches
                if shape[1] % side or shape[2] % side or model.input_shape[1] % side or model.input_shape[2] % side:
                    raise UserError(f"HPFF(patches={side}): module {j}'s features {shape[1]}x{shape[2]} and the "
                                    f"image {model.input_shape[1]}x{model.input_shape[2]} must both divide into "
                                    f"{side}x{side} equal tiles")
                dec = PatchDecoder(shape[0], model.input_shape[-1], side)
                init_infopro_(dec)
                decoders[j] = to(dec)
            model.register_aux("hpff_decoders", decoders)

    def _task(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, InfoPro) and self.base.contrast:
            return supcon_loss(out, y)
        return F.cross_entropy(upcast(out), y)

    def _il(self, model, j, h, y):
        return self._task(model.heads[j](h), y)

    def _cl(self, model, j, h, y, image01):
        task = self._task(model.hpff_heads[str(j)](h), y)
        if not isinstance(self.base, InfoPro):
            return task
        if image01 is None:
            raise UserError("HPFF's local loss needs the input image (image01); pass it to the step")
        lam_rec, lam_task = self.base.lambdas(j)
        return lam_rec * model.hpff_decoders[str(j)].loss(h, image01) + lam_task * task

    def local_parts(self, model, j, h, y, image01=None):
        if j == 0:
            return None, None
        return self.wx * self._il(model, j, h, y), self.wy * self._cl(model, j, h, y, image01)

    def local_loss(self, model, j, h, y, image01=None):
        """``wx * IL_j + wy * CL_j`` at cut j on ``h`` (None at cut 0, which has no loss)."""
        own, back = self.local_parts(model, j, h, y, image01)
        return None if own is None else own + back

    def final_parts(self, loss):
        return self.wx * loss, self.wy * loss

    def record(self) -> dict:
        base = self.base_given
        return {"method": self.name, "wx": self.wx, "wy": self.wy, "patches": self.patches,
                "base": base.record() if base is not None else "published (InfoPro softmax, lambdas 5, 0.5 -> 0, 0)"}


METHODS: dict[str, type[Method]] = {"bp": BP, "dgl": DGL, "infopro": InfoPro, "man": MAN, "pgl": PGL, "hpff": HPFF}

# how many epochs all_local looks at: beyond any schedule's first cycle in practice
_LOCAL_PROBE_EPOCHS = 1024


def all_local(method: Method) -> bool:
    """Every epoch of ``method`` is local (it can be PGL's local objective)."""
    return all(method.phase(e) == LOCAL for e in range(_LOCAL_PROBE_EPOCHS))


def local_objectives() -> list[str]:
    """The registered methods whose epochs are all local (built with their defaults): the
    choices of PGL's local objective (``--pgl-local``)."""
    out = []
    for name, cls in METHODS.items():
        try:
            m = cls()
        except TypeError:  # needs arguments: not choosable by name alone
            continue
        if all_local(m):
            out.append(name)
    return out


def register_method(name: str, cls: type[Method], *, replace: bool = False) -> None:
    """Add the method ``name`` to the registry: from then on ``--method name`` builds it through
    ``cls.from_config`` (its defaults unless it defines one), and ``--pgl-local name`` too when its
    epochs are all local. ``replace`` allows redefining a registered name."""
    add_entry(METHODS, name, cls, fn="register_method", kind="method", cls=Method, field="method class",
              lower=True, replace=replace, subclass=True)


def from_name(name: str, **kwargs) -> Method:
    """``from_name("pgl", period=10, duration=2)``: the method the CLI's ``--method`` names."""
    cls = METHODS.get(name)
    if cls is None:
        raise UserError(f"--method {name!r} is not one of {', '.join(METHODS)}")
    return cls(**kwargs)
