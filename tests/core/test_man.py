"""MAN (Momentum Auxiliary Network) against its equations, written here with plain autograd.

For module j < J-1 with output h, MAN's local loss is ``CE(head_j(f(h; theta_LB) + f(h; theta_EMA)))``
where ``f`` is the first unit of module j+1 (the function, run here with ``functional_call`` on that
unit of an untouched copy of the model), ``theta_LB`` learnable (module j's optimizer) and
``theta_EMA`` not optimised, updated once per step after module j's local backward as
``theta_EMA <- m theta_EMA + (1 - m) theta_{j+1}`` from module j+1's parameters before their update.
Float64 throughout, a 3-module toy ResNet whose widths change at the cut (so the heads sit at the
next unit's width).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import pgl_fast
from pgl_fast.core.methods import MAN, PGL, DGL, InfoPro, local_objectives
from pgl_fast.core.schedule import GLOBAL
from pgl_fast.distributed.pipeline import build_stage
from pgl_fast.errors import UserError
from pgl_fast.models.cifar_resnet import BasicBlock, Classifier, Stem
from pgl_fast.models.presets import cifar_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

M = 0.9  # a momentum far from 1, so the EMA moves visibly in one step


@pytest.fixture(autouse=True)
def _f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def toy(seed=0):
    """stem(3->4) | BB(4->6, stride 2), BB(6) | BB(6), classifier: cuts after the stem and after the
    second block; module 1 starts with a projecting block, so head 0 moves from 4 to 6 channels."""
    torch.manual_seed(seed)
    net = nn.Sequential(Stem(3, 4), BasicBlock(4, 6, 2), BasicBlock(6, 6), BasicBlock(6, 6), Classifier(6, 5))
    return pgl_fast.split(net, [0, 2], aux="1c1f", input_shape=(3, 8, 8))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


class Recording(pgl_fast.LocalLearner):
    """Every parameter's gradient just before each module's optimizer step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = {}

    def step_module(self, j):
        self.log[j] = {n: None if p.grad is None else p.grad.clone() for n, p in self.model.named_parameters()}
        super().step_module(j)


def sgd(lr):
    return lambda ps: torch.optim.SGD(ps, lr=lr)


def named(model, prefix):
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


def first_unit(model, j):
    """Module j's first unit and its parameter-name prefix in the model."""
    unit = model.blocks[j] if not isinstance(model.blocks[j], nn.Sequential) else model.blocks[j][0]
    prefix = f"blocks.{j}." if unit is model.blocks[j] else f"blocks.{j}.0."
    return unit, prefix


def man_aux(ref, j, h):
    """LB_j(h) + EMA_j(h): module j+1's first unit as a function, at the two copies' parameters
    and batch-norm statistics (the copies own their statistics)."""
    unit, _ = first_unit(ref, j + 1)

    def at(copy_module):
        state = dict(copy_module.named_parameters())
        state.update(dict(copy_module.named_buffers()))
        return functional_call(unit, state, (h,))

    return at(ref.lb_blocks[j]) + at(ref.ema_blocks[j])


def test_prepare_builds_copies_at_the_next_units_shape():
    net = toy()
    MAN(M).prepare(net)
    assert len(net.lb_blocks) == len(net.ema_blocks) == 2
    # fresh initialisation: neither copy equals the unit it copies
    for j in range(2):
        unit, _ = first_unit(net, j + 1)
        for q, a, b in zip(unit.parameters(), net.lb_blocks[j].parameters(), net.ema_blocks[j].parameters()):
            assert a.requires_grad and not b.requires_grad
            if q.dim() > 1:  # convs: drawn afresh (BN starts at 1/0 everywhere)
                assert not torch.equal(a, q) and not torch.equal(b, q) and not torch.equal(a, b)
    # head 0 now takes the 6-channel output of module 1's first block (it was built for 4)
    assert net.heads[0].convs[0].conv.in_channels == 6 and net.heads[1].convs[0].conv.in_channels == 6
    # LB is module j's aux parameter, EMA nobody's
    ids = {id(p) for p in net.aux_parameters(0)}
    assert all(id(p) in ids for p in net.lb_blocks[0].parameters())
    assert not any(id(p) in ids for p in net.ema_blocks[0].parameters())
    # a second prepare (a second learner on this model) keeps what is there
    lb = net.lb_blocks[0]
    MAN(M).prepare(net)
    assert net.lb_blocks[0] is lb


@pytest.mark.parametrize("compile", [None, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compile"])
def test_local_step_gradients_and_ema(compile):
    """A local step (compiled: each module's forward and MAN loss as one Inductor graph, the EMA
    update eager between the pieces)."""
    net = toy()
    man = MAN(M)
    exe = Recording(net, man, optimizer=sgd(0.1), compile=compile)
    ref = copy.deepcopy(net)  # the model before the step (the EMA copies initialised by prepare)
    x, y = batch()
    exe.start_epoch(0)
    exe.step(x, y)

    h = x
    for j in range(3):
        blk = ref.blocks[j]
        h = blk(h.detach())
        if j < 2:
            loss = F.cross_entropy(ref.heads[j](man_aux(ref, j, h)), y)
            own = {**named(ref, f"blocks.{j}."), **named(ref, f"heads.{j}."), **named(ref, f"lb_blocks.{j}.")}
        else:
            loss = F.cross_entropy(ref.classifier(h), y)
            own = {**named(ref, "blocks.2."), **named(ref, "classifier.")}
        grads = torch.autograd.grad(loss, list(own.values()))
        got = exe.log[j]
        for (n, _), g in zip(own.items(), grads):
            assert got[n] is not None and torch.allclose(got[n], g, rtol=1e-9, atol=1e-12), (j, n)
        # nothing else has a gradient at module j's step: not module j+1 (nothing crosses the cut),
        # not the EMA copy (gradients pass through it, never into it)
        assert all(g is None for n, g in got.items() if n not in own), (j, [n for n, g in got.items()
                                                                            if g is not None and n not in own])

    # the EMA after the step, from module j+1's first unit *before* its update
    for j in range(2):
        _, prefix = first_unit(ref, j + 1)
        before = [p for n, p in ref.named_parameters() if n.startswith(prefix)]
        after = [p for n, p in net.named_parameters() if n.startswith(prefix)]
        for e0, e1, t0, t1 in zip(ref.ema_blocks[j].parameters(), net.ema_blocks[j].parameters(), before, after):
            assert torch.allclose(e1, M * e0 + (1 - M) * t0, rtol=0, atol=1e-14)
            if t0.dim() > 1:  # the update moved the unit: the post-step parameters give another value
                assert not torch.allclose(e1, M * e0 + (1 - M) * t1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("checkpoint_global", [False, True, "coarse"], ids=["eager", "modules", "coarse"])
def test_global_step_gradients_and_ema(checkpoint_global):
    """PGL over MAN, a global epoch: the backbone from the final loss only, heads and LB from their
    local loss on detached features, the EMA copy still following module j+1. Checkpointed global
    steps (one segment per module, or segments with a head inside) give the same."""
    net = toy()
    if checkpoint_global == "coarse":  # one segment over modules 0 and 1: head 0 taps inside it
        checkpoint_global = [(0, net.ranges[1][1]), (net.ranges[1][1], len(net.units))]
    exe = Recording(net, PGL(1, 1, local=MAN(M)), optimizer=sgd(0.1), checkpoint_global=checkpoint_global)
    ref = copy.deepcopy(net)
    x, y = batch()
    exe.start_epoch(1)
    assert exe.phase == GLOBAL
    exe.step(x, y)

    h, aux = x, {}
    for j in range(3):
        h = ref.blocks[j](h)
        if j < 2:
            aux[j] = F.cross_entropy(ref.heads[j](man_aux(ref, j, h.detach())), y)
    final = F.cross_entropy(ref.classifier(h), y)
    backbone = {n: p for n, p in ref.named_parameters() if n.startswith(("blocks.", "classifier."))}
    want = dict(zip(backbone, torch.autograd.grad(final, list(backbone.values()))))
    for j in range(2):
        own = {**named(ref, f"heads.{j}."), **named(ref, f"lb_blocks.{j}.")}
        want.update(zip(own, torch.autograd.grad(aux[j], list(own.values()))))
    def owner(n):  # the module whose optimizer steps parameter n
        return 2 if n.startswith("classifier.") else int(n.split(".")[1])

    for j in range(3):
        for n, g in exe.log[j].items():
            if n.startswith("ema_blocks."):
                assert g is None, n
            elif owner(n) == j:
                assert g is not None and torch.allclose(g, want[n], rtol=1e-9, atol=1e-12), n
    for j in range(2):
        _, prefix = first_unit(ref, j + 1)
        before = [p for n, p in ref.named_parameters() if n.startswith(prefix)]
        for e0, e1, t0 in zip(ref.ema_blocks[j].parameters(), net.ema_blocks[j].parameters(), before):
            assert torch.allclose(e1, M * e0 + (1 - M) * t0, rtol=0, atol=1e-14)


def test_infopro_base_uses_the_aux_path_for_head_and_decoder():
    net = toy()
    man = MAN(M, base=InfoPro(contrast=False, lambdas=[(2.0, 0.5), (1.0, 3.0)]))
    exe = Recording(net, man, optimizer=sgd(0.0))
    ref = copy.deepcopy(net)
    x, y = batch()
    img = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    exe.start_epoch(0)
    exe.step(x, y, img)
    h = ref.blocks[0](x)
    a = man_aux(ref, 0, h)
    rec = F.binary_cross_entropy_with_logits(ref.decoders[0].logits(a), img)
    loss = 2.0 * rec + 0.5 * F.cross_entropy(ref.heads[0](a), y)
    own = {**named(ref, "blocks.0."), **named(ref, "heads.0."), **named(ref, "decoders.0."), **named(ref, "lb_blocks.0.")}
    for (n, _), g in zip(own.items(), torch.autograd.grad(loss, list(own.values()))):
        assert torch.allclose(exe.log[0][n], g, rtol=1e-9, atol=1e-12), n
    assert ref.decoders[0].in_channels == 6  # rebuilt for the next unit's width


def test_evaluate_scores_heads_on_the_aux_path():
    net = toy()
    exe = pgl_fast.LocalLearner(net, MAN(M), optimizer=sgd(0.0))
    x, y = batch()
    res = exe.evaluate([(x, y)])
    net.eval()
    with torch.no_grad():
        h0 = net.blocks[0](x)
        want = (net.heads[0](man_aux(net, 0, h0)).argmax(1) == y).double().mean().item()
    assert res["head_acc"][0] == pytest.approx(want)


def test_extra_parameters_hand_count():
    """ResNet-32, J=16 (the engine's split: the stem is module 0, each of the 15 blocks a module):
    module j's copies are of block j+1, so the EMA copies are all 15 blocks, once each (MAN's paper
    and code publish no parameter counts to compare with)."""
    def block(cin, cout):
        n = 9 * cin * cout + 9 * cout * cout + 4 * cout  # two 3x3 convs, two BNs
        return n + (cin * cout + 2 * cout if cin != cout else 0)  # 1x1 projection + BN
    want = 5 * block(16, 16) + block(16, 32) + 4 * block(32, 32) + block(32, 64) + 4 * block(64, 64)
    assert want == 465792
    plain = cifar_resnet("resnet32", 16, aux="1c2f")
    net = cifar_resnet("resnet32", 16, aux="1c2f")
    MAN().prepare(net)
    counts, before = net.count_parameters(), plain.count_parameters()
    assert counts["ema"] == want and counts["backbone"] == before["backbone"]
    heads_delta = sum(p.numel() for h in net.heads for p in h.parameters()) - \
        sum(p.numel() for h in plain.heads for p in h.parameters())
    assert counts["aux"] == before["aux"] + want + heads_delta
    assert counts["total"] == counts["backbone"] + counts["aux"] + want


def test_refusals_and_registry():
    assert "man" in local_objectives() and "pgl" not in local_objectives() and "bp" not in local_objectives()
    with pytest.raises(UserError, match="momentum"):
        MAN(1.5)
    with pytest.raises(UserError, match="base"):
        MAN(base=PGL())
    with pytest.raises(UserError, match="all local"):
        PGL(local=PGL())
    PGL(local=MAN())  # accepted
    # a unit without parameters cannot be copied
    torch.manual_seed(0)
    seq = nn.Sequential(Stem(3, 4), nn.MaxPool2d(2), BasicBlock(4, 4), Classifier(4, 5))
    net = pgl_fast.split(seq, [0], aux="0c1f", input_shape=(3, 8, 8))
    with pytest.raises(UserError, match="no parameters"):
        pgl_fast.LocalLearner(net, MAN())
    # a user's own head that cannot take the next unit's output shape
    net = pgl_fast.split(toy_seq(), [0], aux=lambda shape, k: nn.Sequential(nn.Flatten(), nn.Linear(
        shape[0] * shape[1] * shape[2], k)), input_shape=(3, 8, 8))
    with pytest.raises(UserError, match="does not take features of shape"):
        pgl_fast.LocalLearner(net, MAN())
    # a pipeline stage would hold module j's aux path without module j+1
    with pytest.raises(UserError, match="^build_stage: is not supported with MAN: module j's EMA copy follows "
                                        "module j\\+1, which would live on another stage's rank"):
        build_stage(pgl_fast.LocalLearner(toy(), MAN()), 2)


def toy_seq():
    return nn.Sequential(Stem(3, 4), BasicBlock(4, 6, 2), Classifier(6, 5))


def test_state_dict_holds_the_copies():
    net = toy()
    pgl_fast.LocalLearner(net, MAN(M), optimizer=sgd(0.1))
    keys = net.state_dict().keys()
    assert any(k.startswith("ema_blocks.0.") for k in keys) and any(k.startswith("lb_blocks.1.") for k in keys)
    assert not any(k.startswith(("ema_blocks", "lb_blocks")) for k in toy().state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
def test_cuda_graphs_capture_the_ema_update():
    """The local step replayed from a CUDA graph (EMA update inside it, device-side) equals eager."""
    torch.set_default_dtype(torch.float32)

    def build(graphs):
        net = toy().cuda()
        return net, pgl_fast.LocalLearner(net, MAN(M), cuda_graphs=graphs)

    net, exe = build(True)
    ref_net, ref = build(False)
    ema0 = net.ema_blocks[0].conv1.weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, y = torch.randn(6, 3, 8, 8, generator=g).cuda(), torch.randint(0, 5, (6,), generator=g).cuda()
        exe.local_step(x, y)
        ref.local_step(x, y)
    torch.cuda.synchronize()
    assert exe.graphed.captures == 1
    for (n, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=n)
    assert not torch.allclose(net.ema_blocks[0].conv1.weight, ema0)  # the replays moved the EMA
