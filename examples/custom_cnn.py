"""PGL on a user-defined 4-block CNN: an ``nn.Sequential`` cut after its first three blocks.

    python examples/custom_cnn.py --method pgl --epochs 2
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgl_fast  # noqa: E402
from common import parse_args, train  # noqa: E402


def conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_network(num_classes: int = 10, width: int = 32) -> nn.Sequential:
    return nn.Sequential(
        conv_block(3, width, pool=False),
        conv_block(width, 2 * width, pool=True),
        conv_block(2 * width, 4 * width, pool=True),
        conv_block(4 * width, 8 * width, pool=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * width, num_classes),
    )


def build_model(num_classes: int = 10, aux: str = "1c2f") -> pgl_fast.LocalModel:
    # cuts after children 0, 1, 2: four local modules; the pool/flatten/linear tail is the classifier
    return pgl_fast.split(build_network(num_classes), [0, 1, 2], aux=aux, input_shape=(3, 32, 32))


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, lr=0.05)
    torch.manual_seed(args.seed)
    return train(build_model(), args, "custom-cnn")


if __name__ == "__main__":
    print(main())
