"""A LocalModel's units (what global steps and their checkpoints run) are the live module tree: a
module swapped into the blocks after construction -- synchronised batch norm, any replacement --
is what every path runs, also where a batch norm and the in-place ReLU after it form one unit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pgl_fast.distributed.sync_bn import bypassed_bn
from pgl_fast.models.split import split


def vgg_like():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()


def resnet18():
    import torchvision  # optional heavy dependency: only this test needs it

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).double()


class Doubled(nn.Module):
    """A stand-in for any swapped-in module: the batch norm it replaces, times two."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def run_units(net, x):
    for u in net.units:
        x = u(x)
    return net.classifier(x)


@pytest.mark.parametrize("make, cuts, image", [(vgg_like, [2], 8), (resnet18, ["layer1"], 16)])
def test_a_swapped_batch_norm_reaches_the_units(make, cuts, image, one_thread):
    net = split(make(), cuts, aux=None, input_shape=(3, image, image))
    x = torch.randn(4, 3, image, image, dtype=torch.float64)
    registered = {id(m) for m in net.modules()}
    assert all(id(m) in registered for u in net.units for m in u.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    # swap every batch norm of the first module's Sequential (resnet18: its top-level bn1, which
    # forms one unit with the in-place ReLU after it), the way convert_sync_bn does
    block = net.blocks[0]
    for name, child in list(block.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(block, name, Doubled(child))
    net.eval()
    with torch.no_grad():
        want = net(x)  # the blocks, as local steps and evaluation run them
        assert not torch.allclose(want, split(make(), cuts, aux=None, input_shape=(3, image, image)).eval()(x))
        torch.testing.assert_close(run_units(net, x), want, rtol=0, atol=0)
    assert bypassed_bn(net) == []


def test_bypassed_bn_names_a_unit_outside_the_module_tree():
    """A model whose units hold a batch norm the registered tree no longer has would skip the
    synchronised one in global steps: bypassed_bn names it."""

    class Stale(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(2), nn.ReLU(inplace=True))
            self.units = [nn.Sequential(self.body[0], self.body[1])]
            self.body[0] = nn.Identity()

    assert bypassed_bn(Stale()) == ["units[0] (BatchNorm2d outside the module tree)"]
