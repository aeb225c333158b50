"""Gradient semantics of each method against the paper's equations, on small random models.

The references below are written independently of the learner: they rebuild each loss from a
deep copy of the network with plain autograd, and compare gradients parameter by parameter.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import DGL, PGL, InfoPro
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.runtime.optim import sgd


@pytest.fixture(autouse=True)
def _f64():  # exact comparisons in float64; the engine is dtype-agnostic
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def make(aux="1c2f", J=4, split="layerwise", arch="resnet8", decoders=False, head_out=None, seed=0):
    torch.manual_seed(seed)
    net = cifar_resnet(arch, J, num_classes=5, image_size=16, split=split, aux=aux, decoders=decoders,
                       head_out_dim=head_out).double()
    x = torch.randn(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    return net, x, y


def recording_learner(net, method=None, segments=None):
    """Learner whose per-module optimizer steps record every parameter's gradient first (lr 0:
    the weights stay put, so one step's gradients are all on the same weights)."""
    learner = LocalLearner(net, PGL(1, 1) if method is None else method,
                           optimizer=sgd(lr=0.0, momentum=0.0, nesterov=False, weight_decay=0.0), amp=None,
                           checkpoint_global=segments if segments is not None else False)
    log = []
    orig = learner.step_module

    def step(j):
        log.append((j, {n: (p.grad.clone() if p.grad is not None else None) for n, p in net.named_parameters()}))
        orig(j)

    learner.step_module = step
    return learner, log


def names_of(net, params):
    ids = {id(p) for p in params}
    return [n for n, p in net.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("aux", ["1c2f", "2c2f", "adapt", "mlpsr"])
def test_local_step_gradients_are_module_local(aux):
    net, x, y = make(aux)
    ref = copy.deepcopy(net)
    learner, log = recording_learner(net)
    learner.local_step(x, y)
    assert [j for j, _ in log] == list(range(net.J))
    for j, grads in log:
        own = set(names_of(net, net.module_parameters(j) + net.aux_parameters(j)))
        # nothing outside module j (and its head) holds a gradient when module j steps
        for n, g in grads.items():
            if n not in own:
                assert g is None, f"gradient leaked into {n} during module {j}'s step"
        # reference: module j's loss alone, on the (non-differentiable) output of modules < j
        with torch.no_grad():
            h = x
            for i in range(j):
                h = ref.blocks[i](h)
        out = ref.blocks[j](h)
        loss = F.cross_entropy(ref.heads[j](out) if j < net.J - 1 else ref.classifier(out), y)
        ref_params = dict(ref.named_parameters())
        names = sorted(own)
        ref_grads = torch.autograd.grad(loss, [ref_params[n] for n in names], allow_unused=True)
        for n, rg in zip(names, ref_grads):
            rg = torch.zeros_like(ref_params[n]) if rg is None else rg
            got = grads[n] if grads[n] is not None else torch.zeros_like(rg)
            torch.testing.assert_close(got, rg, rtol=1e-9, atol=1e-12, msg=f"module {j}: {n}")


@pytest.mark.parametrize("segments", ["none", "modules", "units", "coarse", "two"])
@pytest.mark.parametrize("aux", ["1c2f", "adapt"])
def test_global_step_backbone_gets_bp_gradients_heads_get_local(aux, segments):
    net, x, y = make(aux)
    ref = copy.deepcopy(net)
    segs = {"none": None, "modules": list(net.ranges), "units": [(u, u + 1) for u in range(len(net.units))],
            "coarse": [(0, 2), (2, 4)], "two": [(0, 3), (3, 4)]}[segments]  # heads tapped inside segments
    learner, log = recording_learner(net, segments=segs)
    learner.global_step(x, y)
    grads = log[0][1]  # all modules step after the one backward; the first step sees every gradient
    ref_params = dict(ref.named_parameters())
    # eq. 3: backbone from the final loss only, exactly plain BP
    bb = names_of(net, net.backbone_parameters())
    loss = F.cross_entropy(ref(x), y)
    for n, rg in zip(bb, torch.autograd.grad(loss, [ref_params[n] for n in bb])):
        torch.testing.assert_close(grads[n], rg, rtol=1e-9, atol=1e-12, msg=n)
    # eq. 4: each head from its own local loss on detached features
    with torch.no_grad():
        feats, h = [], x
        for blk in ref.blocks:
            h = blk(h)
            feats.append(h)
    for j in range(net.J - 1):
        hn = names_of(net, net.aux_parameters(j))
        loss_j = F.cross_entropy(ref.heads[j](feats[j]), y)
        for n, rg in zip(hn, torch.autograd.grad(loss_j, [ref_params[n] for n in hn])):
            torch.testing.assert_close(grads[n], rg, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("segments", [None, [(0, 2), (2, 4)]])
def test_checkpointed_global_step_updates_bn_running_stats_once(segments):
    net, x, y = make("1c2f")
    ref = copy.deepcopy(net)
    learner = LocalLearner(net, PGL(1, 1), optimizer=sgd(lr=0.0, momentum=0.0, nesterov=False, weight_decay=0.0),
                           amp=None, checkpoint_global=segments if segments is not None else True)
    learner.global_step(x, y)
    with torch.no_grad():
        h = x
        for blk in ref.blocks:
            h = blk(h)
    got = dict(net.named_buffers())
    for n, b in ref.named_buffers():
        if n.startswith("blocks."):
            torch.testing.assert_close(got[n], b, rtol=1e-12, atol=1e-14, msg=n)


def test_per_module_steps_equal_one_global_sgd_step():
    """Stepping each module right after its backward equals InfoPro's single SGD step (Nesterov,
    momentum, weight decay) computed by hand from the local-loss gradients."""
    net, x, y = make("1c2f")
    ref = copy.deepcopy(net)
    lr, mom, wd = 0.1, 0.9, 1e-2
    learner = LocalLearner(net, DGL(), optimizer=sgd(lr=lr, momentum=mom, nesterov=True, weight_decay=wd), amp=None)
    for _ in range(2):
        learner.local_step(x, y)
    # reference: all local losses' gradients on the same pre-update weights, then hand-written SGD
    bufs = {}
    for _ in range(2):
        params = dict(ref.named_parameters())
        total_grads = {n: torch.zeros_like(p) for n, p in params.items()}
        h = x
        for j in range(ref.J):
            out = ref.blocks[j](h.detach())
            loss = F.cross_entropy(ref.heads[j](out) if j < ref.J - 1 else ref.classifier(out), y)
            names = names_of(ref, ref.module_parameters(j) + ref.aux_parameters(j))
            for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
                if g is not None:
                    total_grads[n] += g
            h = out
        with torch.no_grad():
            for n, p in params.items():
                d = total_grads[n] + wd * p
                bufs[n] = d.clone() if n not in bufs else mom * bufs[n] + d
                p -= lr * (d + mom * bufs[n])
    got = dict(net.named_parameters())
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p, rtol=1e-9, atol=1e-12, msg=n)


def _supcon_reference(z, y, t=0.07):
    z = F.normalize(z, dim=1)
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        den = sum(torch.exp(z[i] @ z[a] / t) for a in range(n) if a != i)
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if pos:
            total = total + sum(z[i] @ z[p] / t - torch.log(den) for p in pos) / len(pos)
    return -total / n


@pytest.mark.parametrize("contrast", [True, False])
def test_infopro_local_loss_matches_equation(contrast):
    J = 4
    net, x, y = make("1c2f", J=J, decoders=True, head_out=8 if contrast else None)
    ref = copy.deepcopy(net)
    lambdas = ((5.0, 0.05), (2.6, 0.275), (0.2, 0.5))
    learner, log = recording_learner(net, InfoPro(contrast=contrast, lambdas=lambdas))
    image01 = torch.rand(6, 3, 16, 16)
    learner.local_step(x, y, image01)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        hs, h = [], x
        for blk in ref.blocks:
            h = blk(h)
            hs.append(h)
    for j in range(J - 1):
        out = ref.blocks[j](hs[j - 1] if j else x)
        logits = ref.heads[j](out)
        task = _supcon_reference(logits, y) if contrast else F.cross_entropy(logits, y)
        dec = ref.decoders[j](out)
        rec = -(image01 * torch.log(dec) + (1 - image01) * torch.log(1 - dec)).mean()
        loss = lambdas[j][0] * rec + lambdas[j][1] * task
        names = names_of(net, net.module_parameters(j) + net.aux_parameters(j))
        for n, rg in zip(names, torch.autograd.grad(loss, [ref_params[n] for n in names])):
            torch.testing.assert_close(log[j][1][n], rg, rtol=1e-9, atol=1e-12, msg=f"module {j}: {n}")


def test_supcon_matches_loop_reference():
    from pgl_fast.models.heads import supcon_loss

    torch.manual_seed(3)
    z = torch.randn(9, 5)
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 4])  # label 3 and 4 have no positives
    torch.testing.assert_close(supcon_loss(z, y), _supcon_reference(z, y), rtol=1e-9, atol=1e-12)
