"""HPFF (hierarchical local learning with patch feature fusion) against its equations, written here
with plain autograd on a deep copy of a tiny float64 network:

- local step: every parameter moves by SGD on the gradient of the sum of the losses that reach
  it -- module j >= 1: wx*IL_j + wy*CL_j + wy*CL_{j+1}; module 0: wy*CL_1 only; the last module and
  the classifier: wx*CE + wy*CE of the two paths, the cascade path also reaching module J-2 --
  where CL_j runs modules j-1 and j in cascade from the detached output of module j-2;
- PGL's global step over HPFF: backbone from the final loss only, both head sets and the patch
  decoders from their local loss on detached features;
- the patch decoder's loss against a hand-written 2x2 tiling;
- one-line refusals.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pgl_fast
from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import DGL, HPFF, PGL, InfoPro, interpolated_lambdas
from pgl_fast.distributed.pipeline import build_stage
from pgl_fast.errors import UserError
from pgl_fast.models.heads import AuxClassifier, PatchDecoder
from pgl_fast.models.local_model import LocalModel

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.1
WX, WY = 0.3, 0.7  # not the published 0.001/0.999: both paths must visibly count
LAMBDAS = [(0.5, 1.0), (2.0, 0.25), (1.5, 0.75)]


@pytest.fixture(autouse=True)
def _f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny(J=4, size=8, width=4, classes=3, seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Conv2d(3 if j == 0 else width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
              for j in range(J)]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))
    heads = [AuxClassifier("1c2f", width, classes, feature_dim=6, in_size=size) for _ in range(J - 1)]
    return LocalModel(blocks, classifier, heads).probe((3, size, size))


def batch(size=8, n=6, classes=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    img = torch.rand(n, 3, size, size, generator=g)
    return x, y, img


def patch_rec(dec: PatchDecoder, h, img):
    """Hand-written patch reconstruction: quadrants TL, TR, BL, BR of the features, each upsampled
    (bilinear, corners aligned) to the image quadrant's size, decoded by its own conv-BN-ReLU-conv,
    BCE of the sigmoid against the image quadrant; summed."""
    H, W = h.shape[-2:]
    IH, IW = img.shape[-2:]
    quads = [(slice(0, H // 2), slice(0, W // 2)), (slice(0, H // 2), slice(W // 2, W)),
             (slice(H // 2, H), slice(0, W // 2)), (slice(H // 2, H), slice(W // 2, W))]
    iquads = [(slice(0, IH // 2), slice(0, IW // 2)), (slice(0, IH // 2), slice(IW // 2, IW)),
              (slice(IH // 2, IH), slice(0, IW // 2)), (slice(IH // 2, IH), slice(IW // 2, IW))]
    total = 0
    for k, ((r, c), (ir, ic)) in enumerate(zip(quads, iquads)):
        body = dec.decoders[k].body
        t = F.interpolate(h[:, :, r, c], size=[IH // 2, IW // 2], mode="bilinear", align_corners=True)
        t = F.conv2d(t, body[0].weight, body[0].bias, padding=1)
        t = F.batch_norm(t, None, None, body[1].weight, body[1].bias, training=True, eps=body[1].eps)
        t = F.conv2d(F.relu(t), body[3].weight, body[3].bias, padding=1)
        total = total + F.binary_cross_entropy(torch.sigmoid(t), img[:, :, ir, ic])
    return total


def cl(ref, j, z, y, img, infopro):
    task = F.cross_entropy(ref.hpff_heads[str(j)](z), y)
    if not infopro:
        return task
    lam_rec, lam_task = LAMBDAS[j]
    return lam_rec * patch_rec(ref.hpff_decoders[str(j)], z, img) + lam_task * task


def reference_local(ref, x, y, img, infopro):
    """The sum of every loss of one HPFF local step, from the paper's two paths."""
    B, J = ref.blocks, ref.J
    hx = [None] * J  # independent path: module j on the detached output of module j-1
    inp = x
    for j in range(J):
        hx[j] = B[j](inp.detach())
        inp = hx[j]
    total = 0
    for j in range(1, J - 1):
        il = F.cross_entropy(ref.heads[j](hx[j]), y)
        start = x if j == 1 else hx[j - 2].detach()
        z = B[j](B[j - 1](start))  # the cascade path: modules j-1 and j from a detached input
        total = total + WX * il + WY * cl(ref, j, z, y, img, infopro)
    zx = hx[J - 1]
    zy = B[J - 1](B[J - 2](hx[J - 3].detach()))
    total = total + WX * F.cross_entropy(ref.classifier(zx), y) + WY * F.cross_entropy(ref.classifier(zy), y)
    return total


def sgd():
    return lambda ps: torch.optim.SGD(ps, lr=LR)


def expect_sgd(ref, model, before):
    """Every parameter of ``model`` equals SGD on the reference's gradient (zero where none)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = ref_params[name].grad
        want = before[name] - LR * g if g is not None else before[name]
        assert torch.allclose(p.detach(), want, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("infopro", [True, False], ids=["infopro_base", "dgl_base"])
def test_local_step_updates_equal_sgd_on_the_summed_losses(infopro):
    model = tiny()
    x, y, img = batch()
    base = InfoPro(lambdas=LAMBDAS) if infopro else DGL()
    learner = LocalLearner(model, HPFF(wx=WX, wy=WY, base=base), optimizer=sgd())
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = learner.step(x, y, img)
    reference_local(ref, x, y, img, infopro).backward()
    expect_sgd(ref, model, before)
    # module 0 has no loss of its own, and every other module's does move
    assert torch.isnan(losses[0])
    assert all(torch.isfinite(losses[1:]))
    for j in range(model.J):
        assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()
                   if n.startswith(f"blocks.{j}.")), j
    # the first head set's cut 0 head is not trained by HPFF (as in the published code)
    assert all(torch.equal(p.detach(), before[f"heads.0.{n}"]) for n, p in model.heads[0].named_parameters())


def test_module_steps_once_no_later_loss_reaches_it():
    """Module j-1 is stepped right after the loss at cut j (its last gradient), in order."""
    order = []

    class Rec(LocalLearner):
        def step_module(self, j):
            order.append((j, self._cut))
            super().step_module(j)

    model = tiny(J=4)
    learner = Rec(model, HPFF(base=DGL()), optimizer=sgd())
    learner._cut = None
    orig = learner.method.local_parts

    def parts(m, j, *a):
        learner._cut = j
        return orig(m, j, *a)

    learner.method.local_parts = parts
    x, y, img = batch()
    learner.step(x, y, img)
    assert order == [(0, 1), (1, 2), (2, 2), (3, 2)]  # modules 2 and 3 after the final loss


@pytest.mark.parametrize("ckpt", [False, True], ids=["eager", "checkpointed"])
def test_pgl_global_step_over_hpff(ckpt):
    model = tiny()
    x, y, img = batch()
    method = PGL(1, 1, local=HPFF(wx=WX, wy=WY, base=InfoPro(lambdas=LAMBDAS)))
    learner = LocalLearner(model, method, optimizer=sgd(), checkpoint_global=ckpt)
    learner.start_epoch(1)
    assert learner.phase == "global"
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner.step(x, y, img)
    h, total = x, 0
    for j in range(ref.J):
        h = ref.blocks[j](h)
        if 1 <= j < ref.J - 1:  # each head set's local loss on the detached features of its cut
            d = h.detach()
            total = total + WX * F.cross_entropy(ref.heads[j](d), y) + WY * cl(ref, j, d, y, img, True)
    total = total + F.cross_entropy(ref.classifier(h), y)  # the backbone: the final loss only
    total.backward()
    expect_sgd(ref, model, before)


def test_patch_decoder_loss_equals_hand_written_tiling():
    torch.manual_seed(3)
    dec = PatchDecoder(5, 12, patches=2)
    h = torch.randn(2, 5, 6, 6)
    img = torch.rand(2, 3, 12, 12)
    assert len(dec.decoders) == 4
    assert torch.allclose(dec.loss(h, img), patch_rec(dec, h, img), rtol=1e-10, atol=1e-12)


def test_hpff_registers_its_heads_and_decoders():
    model = tiny(J=4)
    LocalLearner(model, HPFF(), optimizer=sgd())
    keys = model.state_dict().keys()
    assert any(k.startswith("hpff_heads.1.") for k in keys) and any(k.startswith("hpff_decoders.2.") for k in keys)
    assert not any(k.startswith("hpff_heads.0.") for k in keys)  # cut 0 has no loss
    for j in (1, 2):
        ids = {id(p) for p in model.aux_parameters(j)}
        assert all(id(p) in ids for p in model.hpff_heads[str(j)].parameters())
        assert all(id(p) in ids for p in model.hpff_decoders[str(j)].parameters())
    # the published default: InfoPro's softmax loss, lambdas from (5, 0.5) to (0, 0)
    assert interpolated_lambdas(4, (5, 0.5, 0, 0)) == [(5.0, 0.5), (2.5, 0.25), (0.0, 0.0)]


def test_refusals():
    x = tiny(J=3, size=6)  # 6x6 features and image do not divide into 4x4 tiles
    with pytest.raises(UserError, match=r"HPFF\(patches=4\)"):
        LocalLearner(x, HPFF(patches=4), optimizer=sgd())
    with pytest.raises(UserError, match="^compile: is not supported with HPFF: the compiled pieces"):
        LocalLearner(tiny(J=3), HPFF(), optimizer=sgd(), compile=True)
    with pytest.raises(UserError, match="^cuda_graphs: is not supported with HPFF"):
        LocalLearner(tiny(J=3), HPFF(), optimizer=sgd(), cuda_graphs=True)
    with pytest.raises(UserError, match="^build_stage: is not supported with HPFF: its loss reaches two modules"):
        build_stage(LocalLearner(tiny(J=3), HPFF(), optimizer=sgd()), 2)
    with pytest.raises(UserError, match="base"):
        HPFF(base=PGL())
    with pytest.raises(UserError, match="wx"):
        HPFF(wx=-1)


def test_from_python_pgl_over_hpff_trains():
    model = tiny(J=3)
    learner = LocalLearner(model, pgl_fast.methods.PGL(1, 1, local=pgl_fast.methods.HPFF()), optimizer=sgd())
    x, y, img = batch()
    for epoch in range(2):
        learner.start_epoch(epoch)
        out = learner.step(x, y, img)
        assert torch.isfinite(out[1:]).all()
