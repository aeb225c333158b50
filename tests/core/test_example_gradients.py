"""Gradient semantics on the three example models (a 4-block CNN, torchvision's ResNet-18 with the
CIFAR stem, a small torchvision ViT), in float64, against references built independently of the
learner: plain autograd on a deep copy of the model.

- local step: module j's parameters (and its head's) get exactly the gradient of module j's own
  loss on the detached output of module j-1; nothing crosses a cut.
- global step: backbone gradients equal plain backprop of the final loss; each head's equal its
  local loss on detached features.
"""
import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import pgl_fast

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(REPO, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def builders():
    return {n: load_example(n).build_model for n in ("custom_cnn", "torchvision_resnet18", "small_vit")}


class Recording(pgl_fast.LocalLearner):
    """Records every parameter's gradient just before each module's optimizer step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def step_module(self, j):
        self.log.append((j, {n: None if p.grad is None else p.grad.clone() for n, p in self.model.named_parameters()}))
        super().step_module(j)


def make(builders, name, seed=0):
    torch.manual_seed(seed)
    model = builders[name](num_classes=5).double()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 4])
    sgd0 = lambda ps: torch.optim.SGD(ps, lr=0.0)  # noqa: E731  the weights stay put: one reference for all
    return model, x, y, sgd0


def owned(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def close(a, b):
    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


NAMES = ["custom_cnn", "torchvision_resnet18", "small_vit"]


@pytest.mark.parametrize("name", NAMES)
def test_local_step_no_gradient_crosses_a_cut(builders, name):
    model, x, y, sgd0 = make(builders, name)
    ref = copy.deepcopy(model)
    learner = Recording(model, pgl_fast.methods.DGL(), optimizer=sgd0)
    learner.local_step(x, y)
    assert [j for j, _ in learner.log] == list(range(model.J))
    ref_params = dict(ref.named_parameters())
    h = x
    for j, grads in learner.log:
        mine = owned(model, model.module_parameters(j) + model.aux_parameters(j))
        # module j's loss in plain autograd on a detached input
        out = ref.blocks[j](h.detach())
        loss = F.cross_entropy(ref.heads[j](out), y) if j < ref.J - 1 else F.cross_entropy(ref.classifier(out), y)
        names = sorted(mine)
        want = torch.autograd.grad(loss, [ref_params[n] for n in names], allow_unused=True)
        for n, w in zip(names, want):
            g = grads[n]
            if w is None:
                assert g is None or not g.abs().any(), n
            else:
                assert g is not None and close(g, w), f"module {j}: {n}"
        # no other parameter holds a gradient when module j steps (earlier ones were freed)
        others = [n for n, g in grads.items() if g is not None and n not in mine]
        assert not others, f"module {j}: gradient crossed a cut into {others[:3]}"
        h = out


@pytest.mark.parametrize("name", NAMES)
def test_global_step_backbone_gets_bp_gradients_heads_their_local_loss(builders, name):
    model, x, y, sgd0 = make(builders, name)
    ref = copy.deepcopy(model)
    learner = Recording(model, pgl_fast.methods.PGL(1, 1), optimizer=sgd0)
    learner.global_step(x, y)
    grads = learner.log[0][1]  # every module steps after the one backward: the first record has them all
    ref_params = dict(ref.named_parameters())
    backbone = sorted(owned(ref, ref.backbone_parameters()))
    want = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref_params[n] for n in backbone], allow_unused=True)
    for n, w in zip(backbone, want):
        if w is None:
            continue
        assert grads[n] is not None and close(grads[n], w), n
    h = x
    for j in range(ref.J - 1):
        h = ref.blocks[j](h)
        head = sorted(owned(ref, list(ref.heads[j].parameters())))
        loss = F.cross_entropy(ref.heads[j](h.detach()), y)
        for n, w in zip(head, torch.autograd.grad(loss, [ref_params[n] for n in head])):
            assert close(grads[n], w), f"head {j}: {n}"
