"""split() on models with integer inputs, and the reasons it gives for models it cannot cut."""
import pytest
import torch
from torch import nn

import pgl_fast
from pgl_fast.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(n=3):
    return torch.randint(0, 10, (n, 4), generator=torch.Generator().manual_seed(0))


def test_a_model_with_an_embedding_first_is_probed_with_an_example_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with pytest.raises(UserError, match=r"probe forward of Sequential .* failed: .*; give input_shape= .* example_input="):
        pgl_fast.split(net, [2], aux=None, input_shape=(4,))
    local = pgl_fast.split(net, [2], aux=lambda shape, n: nn.Linear(shape[0], n), example_input=tokens())
    assert local.J == 2 and local.input_shape == (4,) and local.out_shape(0) == (8,) and local.num_classes == 3
    x = tokens(5)
    net.eval(), local.eval()
    assert torch.equal(local(x), net(x))  # the original network is the reference
    learner = pgl_fast.LocalLearner(local, "dgl")
    losses = learner.step(x, torch.tensor([0, 1, 2, 0, 1]))
    assert losses.shape == (2,) and bool(torch.isfinite(losses).all())


def test_example_input_and_input_shape_must_agree():
    net = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(32, 3))
    with pytest.raises(UserError, match=r"^split: input_shape \(5,\) is not example_input's per-sample shape \(4,\); "):
        pgl_fast.split(net, [1], aux=None, input_shape=(5,), example_input=tokens())
    with pytest.raises(UserError, match="^split: example_input must be a tensor batch"):
        pgl_fast.split(net, [1], aux=None, example_input=[1, 2])


class UNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.mid = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.up, self.pool, self.fc = nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        a = self.down(x)
        return self.fc(self.pool(self.up(torch.cat([a, self.mid(a)], 1))).flatten(1))


class OutOfOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.b, self.a = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.b(self.a(x))).flatten(1))


class InOrder(OutOfOrder):
    def __init__(self):
        nn.Module.__init__(self)
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)


FIX = "; build the blocks yourself and pass a list of them, or use LocalModel(blocks, classifier, heads)"


def test_refusals_give_the_reason_not_a_shape_error():
    with pytest.raises(UserError) as e:
        pgl_fast.split(UNetLike(), ["down"], input_shape=(3, 8, 8))
    assert str(e.value) == ("UNetLike cannot be cut: child 'up' does not take the output of child 'mid': its forward "
                            "combines outputs (a concatenation, a skip connection) or transforms them between children" + FIX)
    with pytest.raises(UserError) as e:
        pgl_fast.split(OutOfOrder(), ["b"], input_shape=(3, 8, 8))
    assert str(e.value) == ("OutOfOrder cannot be cut: its forward calls its children in the order a, b, pool, fc, not "
                            "in the order they are defined (b, a, pool, fc)" + FIX)
    with pytest.raises(UserError) as e:
        pgl_fast.split(InOrder(), ["fc"], input_shape=(3, 8, 8))
    assert str(e.value) == "cut after 'fc': it is the model's last child, which ends the network; cut after one of a, b, pool"
    assert pgl_fast.split(InOrder(), ["a"], input_shape=(3, 8, 8)).J == 2  # the same model, cut where it can be
