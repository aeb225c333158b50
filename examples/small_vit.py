"""PGL on a small ViT built from torchvision's ``VisionTransformer`` (patch 4, 4 encoder layers,
width 128): one local module per encoder layer, each with a token-pooling aux head.

``VisionTransformer.forward`` does more than run its children in order (patchify, class token,
position embedding), so the blocks are assembled here from its parts and handed to
``pgl_fast.split`` as a list; the last block ends in the model's own classifier.

    python examples/small_vit.py --method pgl --epochs 2
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgl_fast  # noqa: E402
from common import parse_args, train  # noqa: E402


class Embed(nn.Module):
    """Patches -> tokens, the class token in front, position embedding added (the ViT's stem)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit  # conv_proj, class_token and the encoder's pos_embedding / dropout live here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit._process_input(x)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.vit.encoder.pos_embedding
        return self.vit.encoder.dropout(x)


class ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def build_network(num_classes: int = 10) -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128,
                             mlp_dim=256, num_classes=num_classes)




class _StemOnly(nn.Module):
    """The parts of a ViT the embedding uses, without the encoder layers and the head, so block 0
    owns exactly the stem's parameters."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.encoder = nn.Module()
        self.encoder.pos_embedding = vit.encoder.pos_embedding
        self.encoder.dropout = vit.encoder.dropout
        self.patch_size, self.image_size, self.hidden_dim = vit.patch_size, vit.image_size, vit.hidden_dim
        self._vit_process = VisionTransformer._process_input

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._vit_process(self, x)


def build_model(num_classes: int = 10, aux: str = "1c2f") -> pgl_fast.LocalModel:
    vit = build_network(num_classes)
    layers = list(vit.encoder.layers)
    blocks = [nn.Sequential(Embed(_StemOnly(vit)), layers[0]), *layers[1:-1],
              nn.Sequential(layers[-1], vit.encoder.ln, ClassToken(), vit.heads)]
    model = pgl_fast.split(blocks, aux=aux, input_shape=(3, 32, 32))
    model.original = [vit]  # kept out of the module tree: for checking the pieces against vit(x)
    return model


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv, lr=0.01)
    torch.manual_seed(args.seed)
    return train(build_model(), args, "small-vit")


if __name__ == "__main__":
    print(main())
