"""The cells of the combination matrix: the four models, the methods, the data and how each
strategy and runtime builds the engine's learner. Shared by the test module (one process, the
references) and by the distributed worker (``matrix_worker.py``), so both build bit-identical
networks from the same seed.

Everything is float64 and tiny: 3x16x16 inputs, 4 classes, batches of 5 (3 + 2 on two ranks or
two micro-batches), J = 3 modules."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import VGG, make_layers
from torchvision.models.vision_transformer import VisionTransformer

import pgl_fast
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.runtime.optim import sgd

IMG, CLASSES, BATCH, STEPS, J = 16, 4, 5, 2, 3
LR, MOMENTUM, WD = 0.1, 0.9, 5e-4
INFOPRO_LAMBDAS = ((1.0, 0.5), (0.5, 1.0))  # (rec, task) of module 0 and module 1
# MAN's EMA momentum far from the published 0.995, so that two steps move the EMA copies visibly;
# HPFF's path weights away from the published 0.001/0.999, so that both paths count visibly
MAN_MOMENTUM = 0.9
HPFF_WX, HPFF_WY, HPFF_PATCHES = 0.3, 0.7, 2

# MAN and HPFF each alone and under PGL(1, 1); between them both bases of each are covered: ``man``
# MAN over DGL's loss, ``pgl_man`` PGL over MAN over InfoPro's, ``hpff`` HPFF over InfoPro's loss
# (patch decoders), ``pgl_hpff`` PGL over HPFF over DGL's
METHODS = ("dgl", "infopro", "pgl", "pgl_infopro", "bp", "man", "pgl_man", "hpff", "pgl_hpff")
MODELS = ("cifar_resnet", "tv_resnet", "vgg_bn", "vit")
STRATEGIES = ("one", "dp_syncbn", "dp_rankbn", "pipe_m1", "pipe_m2")
RUNTIMES = ("eager", "ckpt", "compile")


def method_of(name: str):
    m = pgl_fast.methods
    return {"dgl": lambda: m.DGL(), "infopro": lambda: m.InfoPro(lambdas=INFOPRO_LAMBDAS),
            "pgl": lambda: m.PGL(1, 1), "pgl_infopro": lambda: m.PGL(1, 1, local=m.InfoPro(lambdas=INFOPRO_LAMBDAS)),
            "bp": lambda: m.BP(),
            "man": lambda: m.MAN(MAN_MOMENTUM, base=m.DGL()),
            "pgl_man": lambda: m.PGL(1, 1, local=m.MAN(MAN_MOMENTUM, base=m.InfoPro(lambdas=INFOPRO_LAMBDAS))),
            "hpff": lambda: m.HPFF(HPFF_WX, HPFF_WY, base=m.InfoPro(lambdas=INFOPRO_LAMBDAS), patches=HPFF_PATCHES),
            "pgl_hpff": lambda: m.PGL(1, 1, local=m.HPFF(HPFF_WX, HPFF_WY, base=m.DGL(), patches=HPFF_PATCHES)),
            }[name]()


def uses_infopro(method: str) -> bool:
    """The method trains InfoPro's decoders (``model.decoders``)."""
    return method in ("infopro", "pgl_infopro", "pgl_man")


def needs_image(method: str) -> bool:
    """The method's local loss reconstructs the image (InfoPro's decoders, HPFF's patch decoders)."""
    return uses_infopro(method) or method == "hpff"


def local_kind(method: str) -> str:
    """The local objective of ``method`` as the reference names it: "ce", "infopro", "man_ce",
    "man_infopro", "hpff_ce" or "hpff_infopro"."""
    return {"dgl": "ce", "pgl": "ce", "bp": "ce", "infopro": "infopro", "pgl_infopro": "infopro",
            "man": "man_ce", "pgl_man": "man_infopro", "hpff": "hpff_infopro", "pgl_hpff": "hpff_ce"}[method]


def phases(method: str) -> list[str]:
    """The phase of each of the STEPS steps (PGL(1, 1): a local step, then a global one)."""
    return [method_of(method).phase(e) for e in range(STEPS)]


# -- the models ------------------------------------------------------------------------------------
def _tv_resnet() -> nn.Module:
    """torchvision's ResNet class with its own stem (conv1, top-level bn1, relu, maxpool) and
    _make_layer, narrowed to widths 8/16/32 with one BasicBlock per stage: the structure of a
    torchvision ResNet (batch norm outside the blocks) at a fraction of the cost."""
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)
    net.inplanes = 8
    net.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(8)
    net.layer1 = net._make_layer(BasicBlock, 8, 1)
    net.layer2 = net._make_layer(BasicBlock, 16, 1, stride=2)
    net.layer3 = net._make_layer(BasicBlock, 32, 1, stride=2)
    net.layer4 = nn.Identity()
    net.fc = nn.Linear(32, CLASSES)
    return net


def _vgg_bn() -> nn.Module:
    """torchvision's VGG with batch norm (make_layers(batch_norm=True)); a small classifier
    without dropout (dropout would make the reference draw other random masks)."""
    # VGG's constructor would first allocate and initialise its 120M-parameter classifier; the
    # network is VGG (its class, its forward) with these three children
    net = VGG.__new__(VGG)
    nn.Module.__init__(net)
    net.features = make_layers([4, "M", 8, "M", 16, "M"], batch_norm=True)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    return net


class _Embed(nn.Module):
    """Patches -> tokens with the class token in front and the position embedding added."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.patch = vit.patch_size

    def forward(self, x):
        t = self.conv_proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.class_token.expand(x.shape[0], -1, -1), t], 1) + self.pos_embedding


class _ClassToken(nn.Module):
    def forward(self, x):
        return x[:, 0]


def _vit_blocks() -> list[nn.Module]:
    vit = VisionTransformer(image_size=IMG, patch_size=8, num_layers=3, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=CLASSES)
    layers = list(vit.encoder.layers)
    return [nn.Sequential(_Embed(vit), layers[0]), layers[1],
            nn.Sequential(layers[2], vit.encoder.ln, _ClassToken(), vit.heads)]


def build_model(model: str, method: str) -> pgl_fast.LocalModel:
    """The float64 LocalModel of a cell, from seed 0 (bit-identical on every call)."""
    torch.manual_seed(0)
    aux = None if method == "bp" else "1c2f"
    if model == "cifar_resnet":
        net = cifar_resnet("resnet8", J, num_classes=CLASSES, image_size=IMG, split="even", aux=aux,
                           decoders=uses_infopro(method))
    elif model == "tv_resnet":
        net = pgl_fast.split(_tv_resnet(), ["layer1", "layer2"], aux=aux, input_shape=(3, IMG, IMG))
    elif model == "vgg_bn":
        net = pgl_fast.split(_vgg_bn(), ["features.3", "features.7"], aux=aux, input_shape=(3, IMG, IMG))
    elif model == "vit":
        net = pgl_fast.split(_vit_blocks(), aux=aux, input_shape=(3, IMG, IMG))
    else:
        raise KeyError(model)
    return net.double()


def learner_kwargs(runtime: str) -> dict:
    return dict(optimizer=sgd(lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD),
                checkpoint_global=runtime == "ckpt", compile=True if runtime == "compile" else None)


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, y, image01) of each step: the whole (global) batch. image01 (InfoPro's reconstruction
    target) is in the model's dtype, as the trainer hands it to the learner."""
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 3, IMG, IMG, generator=g, dtype=torch.float64),
             torch.randint(0, CLASSES, (BATCH,), generator=g),
             torch.rand(BATCH, 3, IMG, IMG, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def state(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
