"""LocalLearner.step as a user drives it by hand: what it returns, in any dtype."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pgl_fast
from pgl_fast.core.methods import BP, DGL, PGL, InfoPro
from pgl_fast.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def small64(device="cpu"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).to(device=device, dtype=torch.float64)
    return pgl_fast.split(net, [2], aux="1c2f", input_shape=(3, 8, 8))


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    img = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
    return x.to(device), torch.tensor([0, 1, 2, 0], device=device), img.to(device)


def by_hand(ref, x, y, img, lambdas=None):
    """Module losses of one step from the parameters before it (a local step's every module sees
    the input its predecessor computed before updating)."""
    feat = ref.blocks[0](x)
    task = F.cross_entropy(ref.heads[0](feat), y)
    if lambdas is None:
        local = task
    else:
        rec = F.binary_cross_entropy(torch.sigmoid(ref.decoders[0].logits(feat)), img)
        local = lambdas[0] * rec + lambdas[1] * task
    final = F.cross_entropy(ref.classifier(ref.blocks[1](feat)), y)
    return torch.stack([local, final]).detach()


def test_infopro_on_a_float64_model_builds_float64_decoders_and_trains():
    model = small64()
    learner = pgl_fast.LocalLearner(model, InfoPro(lambdas=(0.7, 1.3)),
                                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert {p.dtype for p in model.decoders.parameters()} == {torch.float64}
    x, y, img = batch()
    ref = copy.deepcopy(model)
    losses = learner.step(x, y, img)
    assert losses.dtype == torch.float64
    assert torch.allclose(losses, by_hand(ref, x, y, img, (0.7, 1.3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", [DGL(), PGL(1, 1)], ids=["local", "global"])
def test_step_returns_every_module_loss_as_a_device_tensor(method):
    model = small64()
    learner = pgl_fast.LocalLearner(model, method, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, y, _ = batch()
    for epoch in range(2):  # PGL(1, 1): epoch 0 local, epoch 1 global
        learner.start_epoch(epoch)
        ref = copy.deepcopy(model)
        losses = learner.step(x, y)
        assert isinstance(losses, torch.Tensor) and losses.shape == (2,) and losses.device == x.device
        assert torch.allclose(losses, by_hand(ref, x, y, None), rtol=1e-12, atol=1e-12)
        again = learner.step(x, y)
        assert not torch.equal(again, losses)  # a copy per step, and the step did learn


def test_bp_step_has_only_the_final_loss():
    model = small64()
    learner = pgl_fast.LocalLearner(model, BP(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, y, _ = batch()
    ref = copy.deepcopy(model)
    losses = learner.step(x, y)
    assert torch.isnan(losses[0]) and torch.allclose(losses[1], by_hand(ref, x, y, None)[1], rtol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_on_cuda_never_syncs_with_the_host():
    model = small64("cuda")
    learner = pgl_fast.LocalLearner(model, InfoPro(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, y, img = batch("cuda")
    learner.step(x, y, img)  # first step outside the check: lazy initialisations may sync once
    torch.cuda.synchronize()
    ref = copy.deepcopy(model)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = learner.step(x, y, img)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert losses.is_cuda and torch.allclose(losses, by_hand(ref, x, y, img, (1.0, 1.0)), rtol=1e-10, atol=1e-10)


def test_a_headless_model_is_refused_in_the_apis_words():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = pgl_fast.split(net, [0], aux=None, input_shape=(4,))
    with pytest.raises(UserError) as e:
        pgl_fast.LocalLearner(model, DGL())
    assert str(e.value) == "method DGL() trains every module on an aux head, but the model has 0 heads for 1 cuts " \
                           "(split with aux=...)"
