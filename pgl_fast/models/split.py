"""``split``: cut a user's network into local modules, with an aux head at every cut.

A cut is made *after* each named child, so the aux head sits on that child's output. What can be
cut: an ``nn.Sequential`` (cuts are child indices), a list of blocks (one module per block), or any
model whose top-level children run in order -- torchvision's ResNet, VGG and MobileNet families
(cuts are child names; ``"features.6"`` cuts inside a Sequential child). The trailing pooling /
flatten / dropout / linear children become the last module's classifier, with the global pooling
and flattening that such models apply in ``forward`` added where they are not children. The result
is checked against the original model on a probe input: a model whose ``forward`` does more than
run its children in order is refused with a message naming it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from .cifar_resnet import init_infopro_
from .heads import AUX_CONFIGS, build_head
from .local_model import LocalModel

_TAIL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Linear, nn.Identity)

AuxSpec = str | Sequence[str] | Callable[[tuple, int], nn.Module] | None


def _is_tail(m: nn.Module) -> bool:
    if isinstance(m, nn.Sequential):
        return len(m) > 0 and all(_is_tail(c) or isinstance(c, (nn.ReLU, nn.Hardswish)) for c in m)
    return isinstance(m, _TAIL)


def _has_linear(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Linear) for c in m.modules())


def _named_children(model: nn.Module, cuts: Sequence) -> list[tuple[str, nn.Module]]:
    """The model's children in order, with every child that a dotted cut names expanded into its
    own children (one level)."""
    expand = {str(c).split(".", 1)[0] for c in cuts if isinstance(c, str) and "." in c}
    out = []
    for name, child in model.named_children():
        if name in expand:
            if not isinstance(child, nn.Sequential):
                raise UserError(f"cut {next(c for c in cuts if str(c).startswith(name + '.'))!r}: child {name!r} is a "
                                f"{type(child).__name__}, not an nn.Sequential; only a Sequential child can be cut inside")
            out += [(f"{name}.{n}", c) for n, c in child.named_children()]
            expand.discard(name)
        else:
            out.append((name, child))
    return out


def _probe_input(model: nn.Module, input_shape: tuple, zeros: bool, example: torch.Tensor | None = None) -> torch.Tensor:
    """A 2-sample probe batch on the model's device, in its floating dtype; or the user's example
    batch there (integer inputs such as token ids keep their dtype)."""
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    if example is not None:
        x = example.to(device=p.device if p is not None else "cpu")
        return x.to(dtype) if x.is_floating_point() else x
    if zeros:
        return torch.zeros((2, *input_shape), device=p.device if p is not None else None, dtype=dtype)
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x.to(device=p.device if p is not None else "cpu", dtype=dtype)


def _tail_start(children: list[tuple[str, nn.Module]]) -> int:
    k = len(children)
    while k > 0 and _is_tail(children[k - 1][1]):
        k -= 1
    return k


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@torch.no_grad()
def _probe_refusal(model: nn.Module, children: list[tuple[str, nn.Module]], x: torch.Tensor, input_shape: tuple,
                   failed: str | None, err: BaseException) -> UserError:
    """Why running ``model``'s children in order failed on ``x``: the input (the model's own
    forward fails too), or what its forward does besides calling its children in sequence, found by
    watching its own forward call them."""
    what = type(model).__name__
    order: list[str] = []
    inputs: dict = {}
    outputs: dict = {}

    def watch(name):
        def hook(mod, args, out):
            order.append(name)
            inputs.setdefault(name, args[0] if args else None)
            outputs.setdefault(name, out)
        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in children]
    was = model.training
    model.eval()
    try:
        model(x)
    except Exception as e:  # noqa: BLE001 - the model itself cannot take this input
        return UserError(f"probe forward of {what} at input shape {input_shape} ({x.dtype}) failed: {_first_line(e)}; "
                         "give input_shape= of one sample, or example_input= (a batch of real inputs) for a model "
                         "whose input is not a float tensor")
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    called = list(dict.fromkeys(order))
    defined = [n for n, _ in children if n in called]
    twice = [n for n in called if order.count(n) > 1]
    if twice:
        reason = f"its forward calls child {twice[0]!r} more than once"
    elif called != defined:
        reason = (f"its forward calls its children in the order {', '.join(called)}, not in the order they are "
                  f"defined ({', '.join(defined)})")
    else:
        after = next((cur for prev, cur in zip(called, called[1:]) if inputs[cur] is not outputs[prev]), None)
        if after is not None:
            prev = called[called.index(after) - 1]
            reason = (f"child {after!r} does not take the output of child {prev!r}: its forward combines outputs "
                      "(a concatenation, a skip connection) or transforms them between children")
        else:
            reason = f"running its children in order fails{f' at child {failed!r}' if failed else ''} ({_first_line(err)})"
    return UserError(f"{what} cannot be cut: {reason}; build the blocks yourself and pass a list of them, "
                     "or use LocalModel(blocks, classifier, heads)")


@torch.no_grad()
def _feature_rank(body: list[tuple[str, nn.Module]], input_shape: tuple, model: nn.Module,
                  children: list[tuple[str, nn.Module]], example: torch.Tensor | None) -> int | None:
    """Per-sample rank of the features the body hands to the classifier (3 for feature maps)."""
    x0 = x = _probe_input(model, input_shape, zeros=True, example=example)
    was = model.training
    model.eval()
    failed = None
    try:
        for name, m in body:
            x = m(x)
    except Exception as e:  # noqa: BLE001 - a user's model: say why it cannot be cut
        failed = (name, e)
    finally:
        model.train(was)
    if failed is not None:
        raise _probe_refusal(model, children, x0, input_shape, *failed) from None
    return x.dim() - 1


def _classifier_tail(children: list[tuple[str, nn.Module]], feature_rank: int | None) -> tuple[list, nn.Module]:
    """Split the trailing classifier off the last module's children: (body, classifier)."""
    k = _tail_start(children)
    tail = [m for _, m in children[k:]]
    if not tail or not any(_has_linear(m) for m in tail):
        return children, nn.Identity()
    pieces: list[nn.Module] = []
    pooled = any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)) for m in tail)
    if not pooled and feature_rank == 3:
        pieces.append(nn.AdaptiveAvgPool2d(1))  # the functional global pooling of e.g. MobileNet's forward
    flattened = False
    for m in tail:
        if not flattened and (isinstance(m, nn.Linear) or (isinstance(m, nn.Sequential) and _has_linear(m))):
            if not any(isinstance(p, nn.Flatten) for p in pieces):
                pieces.append(nn.Flatten(1))  # the functional flatten of e.g. ResNet's forward
            flattened = True
        if isinstance(m, nn.Flatten):
            flattened = True
        pieces.append(m)
    return children[:k], nn.Sequential(*pieces)


def _resolve_cuts(names: list[str], cuts: Sequence, indexed: bool) -> list[int]:
    positions = []
    for c in cuts:
        if indexed:
            if not isinstance(c, int) or isinstance(c, bool):
                raise UserError(f"cuts of an nn.Sequential are child indices, got {c!r}")
            if not 0 <= c < len(names) - 1:
                raise UserError(f"cut after child {c}: the Sequential has {len(names)} children; a cut must be "
                                f"in 0..{len(names) - 2} (the last child ends the network)")
            positions.append(c)
        else:
            if not isinstance(c, str):
                raise UserError(f"cuts of a {type(c).__name__}-indexed model are child names, got {c!r}")
            if c not in names:
                raise UserError(f"cut after {c!r}: the model has no such top-level child; children: {', '.join(names)}")
            if names.index(c) == len(names) - 1:
                raise UserError(f"cut after {c!r}: it is the model's last child, which ends the network; cut after "
                                f"one of {', '.join(names[:-1])}")
            positions.append(names.index(c))
    if positions != sorted(set(positions)):
        raise UserError(f"cuts {list(cuts)} must name distinct children in forward order")
    return positions


def _build_heads(model: LocalModel, aux: AuxSpec, num_classes: int) -> list[nn.Module]:
    cuts = model.J - 1
    if aux is None or cuts == 0:
        return []
    if callable(aux) and not isinstance(aux, str):
        heads = []
        for j in range(cuts):
            h = aux(model.out_shape(j), num_classes)
            if not isinstance(h, nn.Module):
                raise UserError(f"aux callable returned a {type(h).__name__} for module {j}, not an nn.Module")
            heads.append(h)
        return heads
    names = [aux] * cuts if isinstance(aux, str) else list(aux)
    if len(names) != cuts:
        raise UserError(f"aux: {model.J} modules have {cuts} cuts; give one head name per cut, got {len(names)}")
    heads = []
    for j, name in enumerate(names):
        if name not in AUX_CONFIGS:
            raise UserError(f"aux {name!r} (module {j}) is not one of {', '.join(AUX_CONFIGS)}")
        try:
            heads.append(build_head(name, model.out_shape(j), num_classes))
        except ValueError as e:
            raise UserError(f"aux head of module {j}: {e}") from None
    init_infopro_(nn.ModuleList(heads))
    return heads


def _check_equal(local: LocalModel, original: Callable, input_shape: tuple, what: str,
                 example: torch.Tensor | None = None) -> None:
    x = _probe_input(local, input_shape, zeros=False, example=example)
    modules = [m for m in (original if isinstance(original, list) else [original]) if isinstance(m, nn.Module)]
    was = [m.training for m in modules] + [local.training]
    for m in modules:
        m.eval()
    local.eval()
    try:
        with torch.no_grad():
            want = original(x) if not isinstance(original, list) else None
            got = local(x)
    finally:
        for m, t in zip(modules + [local], was):
            m.train(t)
    if want is None:
        return
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(
            want, got, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max()))):
        raise UserError(f"{what}: running its children in order does not reproduce its forward "
                        f"({'shape ' + str(tuple(getattr(want, 'shape', ()))) + ' vs ' + str(tuple(got.shape)) if getattr(want, 'shape', None) != got.shape else 'outputs differ'}); "
                        "its forward does more than call its children in sequence: build the blocks yourself "
                        "and pass a list of them, or use LocalModel(blocks, classifier, heads)")


def split(model, cuts=None, *, aux: AuxSpec = "1c2f", input_shape: Sequence[int] | None = None,
          num_classes: int | None = None, example_input: torch.Tensor | None = None) -> LocalModel:
    """Cut ``model`` into local modules: a cut after each child in ``cuts``; an aux head ``aux`` on
    every cut, sized by one probe forward at ``input_shape`` (per sample; default (3, 32, 32)).
    ``example_input``: a batch ``[B, ...]`` of inputs to probe with instead, for a model whose
    input is not a float tensor (token ids for an ``nn.Embedding``); it sets ``input_shape``.
    ``aux`` is a head name (a key of ``pgl_fast.models.heads.HEADS``), one name per cut, a callable
    ``(out_shape, num_classes) -> nn.Module``, or None (no heads: end-to-end training).
    ``num_classes`` sizes the heads (default: the model's own output width)."""
    if example_input is not None:
        if not torch.is_tensor(example_input) or example_input.dim() < 1 or example_input.shape[0] < 1:
            raise UserError("split: example_input must be a tensor batch [B, ...] (B >= 1) of inputs the model takes")
        shape = tuple(int(s) for s in example_input.shape[1:])
        if input_shape is not None and tuple(int(s) for s in input_shape) != shape:
            raise UserError(f"split: input_shape {tuple(input_shape)} is not example_input's per-sample shape {shape}; "
                            "give one of them")
        input_shape = shape
    input_shape = tuple(int(s) for s in (input_shape if input_shape is not None else (3, 32, 32)))
    if isinstance(model, (list, tuple)):
        if cuts is not None:
            raise UserError("split(list_of_blocks, cuts): a list is cut after every block; pass cuts=None")
        blocks = list(model)
        if not blocks:
            raise UserError("split: the list of blocks is empty")
        local = LocalModel(blocks, nn.Identity(), name="blocks")
        original = None
    elif isinstance(model, nn.Module):
        if isinstance(model, LocalModel):
            raise UserError("split: the model is already a LocalModel")
        if cuts is None:
            raise UserError(f"split({type(model).__name__}, cuts=None): name the children to cut after "
                            "(indices for an nn.Sequential, child names otherwise)")
        cuts = list(cuts)
        indexed = isinstance(model, nn.Sequential)
        children = list(model.named_children()) if indexed else _named_children(model, cuts)
        if len(children) < 2:
            raise UserError(f"split: {type(model).__name__} has {len(children)} top-level child(ren); nothing to cut")
        names = [n for n, _ in children]
        positions = _resolve_cuts(names, cuts, indexed)
        groups, start = [], 0
        for p in positions:
            groups.append(children[start:p + 1])
            start = p + 1
        groups.append(children[start:])
        body_len = _tail_start(groups[-1])
        rank = _feature_rank([c for g in groups[:-1] for c in g] + groups[-1][:body_len], input_shape, model,
                             children, example_input)
        body, classifier = _classifier_tail(groups[-1], rank)
        if not body:
            raise UserError(f"cut after {cuts[-1]!r} leaves the last module only the classifier "
                            f"({', '.join(n for n, _ in groups[-1])}); cut earlier")
        groups[-1] = body
        blocks = [g[0][1] if len(g) == 1 else nn.Sequential(*[m for _, m in g]) for g in groups]
        local = LocalModel(blocks, classifier, name=type(model).__name__)
        original = model
    else:
        raise UserError(f"split: cannot cut a {type(model).__name__}; pass an nn.Module or a list of blocks")
    try:
        local.probe(input_shape, example=_probe_input(local, input_shape, True, example_input)
                    if example_input is not None else None)
    except UserError as e:
        if original is None:
            raise
        raise _probe_refusal(original, children, _probe_input(original, input_shape, True, example_input),
                             input_shape, None, e) from None
    if original is not None:
        _check_equal(local, original, input_shape, type(model).__name__, example_input)
    n_cls = num_classes if num_classes is not None else local.num_classes
    heads = _build_heads(local, aux, n_cls)
    if heads:
        p = next((q for q in local.parameters() if q.is_floating_point()), None)
        heads = [h.to(device=p.device, dtype=p.dtype) if p is not None else h for h in heads]
        local.heads = nn.ModuleList(heads)
    return local
