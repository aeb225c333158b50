"""pgl_fast.split and LocalModel: what can be cut, where the heads go, and that the pieces compute
the original model's forward (checked here against the original model itself, in float64)."""
import pytest
import torch
import torchvision
from torch import nn

import pgl_fast
from pgl_fast.errors import UserError
from pgl_fast.models.heads import AuxClassifier, TokenHead

pytestmark = pytest.mark.usefixtures("one_thread")


def seq7():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 24, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(24, 7))


def test_sequential_indices_give_len_cuts_plus_one_modules():
    m = pgl_fast.split(seq7(), [0, 1, 2])
    assert m.J == 4 and len(m.heads) == 3
    # the pool/flatten/linear tail is the classifier, not a module of its own
    assert isinstance(m.classifier, nn.Sequential) and isinstance(m.classifier[-1], nn.Linear)
    assert m.out_shape(0) == (8, 32, 32) and m.out_shape(3) == (24, 16, 16)
    assert m.num_classes == 7 and m.heads[0].fc[-1].out_features == 7


@pytest.mark.parametrize("name,cuts,shape", [
    ("resnet18", ["layer1", "layer2", "layer3"], (3, 64, 64)),
    ("vgg11_bn", ["features.7", "features.14"], (3, 32, 32)),
    ("mobilenet_v2", ["features.3", "features.10"], (3, 32, 32)),
])
def test_torchvision_models_forward_equals_the_original(name, cuts, shape):
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, num_classes=10).double().eval()
    m = pgl_fast.split(net, cuts, input_shape=shape).double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(m(x), net(x), rtol=1e-10, atol=1e-10)
    assert m.J == len(cuts) + 1
    # the same parameter tensors: training the pieces trains the user's model
    assert {id(p) for p in m.backbone_parameters()} == {id(p) for p in net.parameters()}


def test_heads_are_sized_from_any_channel_count_and_tokens():
    m = pgl_fast.split([nn.Conv2d(3, 40, 3, padding=1), nn.Conv2d(40, 5, 3, padding=1)], aux="2c2f")
    assert isinstance(m.heads[0], AuxClassifier) and m.heads[0].convs[0].conv.in_channels == 40
    tokens = pgl_fast.split([nn.Linear(7, 12), nn.Sequential(nn.Linear(12, 3), nn.Flatten(), nn.Linear(3 * 5, 4))],
                            input_shape=(5, 7))
    assert isinstance(tokens.heads[0], TokenHead) and tokens.heads[0].config == "tokens-2f"
    assert tokens.heads[0](torch.randn(2, 5, 12)).shape == (2, 4)


def test_aux_forms_one_name_per_cut_and_callable():
    m = pgl_fast.split(seq7(), [0, 2], aux=["2c2f", "1c1f"])
    assert [h.config for h in m.heads] == ["2c2f", "1c1f"]
    seen = []

    def my_head(shape, n):
        seen.append((shape, n))
        return nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], n))

    pgl_fast.split(seq7(), [0], aux=my_head, num_classes=3)
    assert seen == [((8, 32, 32), 3)]
    assert len(pgl_fast.split(seq7(), [0], aux=None).heads) == 0


@pytest.mark.parametrize("cuts,match", [
    ([9], "cut after child 9"),
    ([2, 1], "distinct children in forward order"),
    ([5], "leaves the last module only the classifier"),
    (["conv"], "child indices"),
])
def test_bad_cuts_are_one_line_errors(cuts, match):
    with pytest.raises(UserError, match=match) as e:
        pgl_fast.split(seq7(), cuts)
    assert "\n" not in str(e.value)


def test_bad_child_name_and_forward_that_is_not_its_children():
    with pytest.raises(UserError, match="no such top-level child.*layer1"):
        pgl_fast.split(torchvision.models.resnet18(), ["layer9"])
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=16)
    with pytest.raises(UserError):
        pgl_fast.split(vit, ["conv_proj"])
    with pytest.raises(UserError, match="aux 'nope'"):
        pgl_fast.split(seq7(), [0], aux="nope")


def test_local_model_by_hand_and_its_checks():
    blocks = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)]
    m = pgl_fast.LocalModel(blocks, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                            [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))])
    assert m.J == 2 and m.heads[0] is not None and m.ranges == [(0, 1), (1, 2)]
    with pytest.raises(UserError, match="need 1 heads"):
        pgl_fast.LocalModel(blocks, nn.Identity(), [nn.Identity(), nn.Identity()])
    with pytest.raises(UserError, match="call model.probe"):
        m.out_shape(0)
    assert m.probe((3, 8, 8)).out_shape(1) == (4, 8, 8)
