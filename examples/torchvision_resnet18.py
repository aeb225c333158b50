"""PGL on torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool), cut
after layer1, layer2 and layer3 into four local modules.

    python examples/torchvision_resnet18.py --method pgl --epochs 2
"""
from __future__ import annotations

import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgl_fast  # noqa: E402
from common import parse_args, train  # noqa: E402


def build_network(num_classes: int = 10) -> torch.nn.Module:
    return pgl_fast.cifar_stem(torchvision.models.resnet18(num_classes=num_classes))


def build_model(num_classes: int = 10, aux: str = "1c2f") -> pgl_fast.LocalModel:
    return pgl_fast.split(build_network(num_classes), ["layer1", "layer2", "layer3"], aux=aux,
                          input_shape=(3, 32, 32))


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, lr=0.05)
    torch.manual_seed(args.seed)
    return train(build_model(), args, "resnet18")


if __name__ == "__main__":
    print(main())
