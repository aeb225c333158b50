"""The recipes: how a data set's uint8 images are augmented and normalised for training (the
recipes InfoPro and PGL train with), as one :class:`DatasetSpec` per recipe.

=========  ===========================  ====  =====================================
recipe     crop padding                 flip  mean / std
=========  ===========================  ====  =====================================
cifar10    reflect 4, crop 32           yes   (125.3, 123.0, 113.9)/255 / (63.0, 62.1, 66.7)/255
svhn       zeros 2, crop 32 (train)     no    0.5 / 0.5
stl10      zeros 4, crop 96             yes   0.5 / 0.5
=========  ===========================  ====  =====================================
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

__all__ = ["DatasetSpec", "RECIPES"]


@dataclass(frozen=True)
class DatasetSpec:
    """What the training pipeline needs to know about a data set.

    ``mean``/``std`` are per channel on the 0..1 scale, one entry per image channel (any count:
    ``(0.5,)`` for grey images); ``pad`` is the crop padding in pixels
    (0 disables the random crop), ``pad_mode`` is ``"reflect"`` or ``"zeros"`` and ``flip``
    enables the random horizontal flip. Images are square, ``image_size`` pixels a side.
    """

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    pad_mode: str
    flip: bool

    def __post_init__(self):
        if self.pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"DatasetSpec.pad_mode must be 'reflect' or 'zeros', got {self.pad_mode!r}")
        if self.pad < 0:
            raise ValueError(f"DatasetSpec.pad must be >= 0, got {self.pad}")
        # tuples of floats whatever sequence was given: the spec is hashable and compares by value
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not self.mean or len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(f"DatasetSpec.mean and .std need one entry per image channel each (the same count, "
                             f"at least 1) and std > 0, got mean {self.mean} and std {self.std}")
        if self.num_classes < 1 or self.image_size < 1:
            raise ValueError("DatasetSpec.num_classes and .image_size must be positive")


_HALF = (0.5, 0.5, 0.5)

# The published recipes: the CIFAR-10 mean/std are InfoPro's constants (the usual CIFAR-10
# statistics, on the 0..255 scale), SVHN and STL-10 normalise with 0.5 / 0.5. Use these constants,
# never statistics recomputed from the copy at hand, so that results compare with the published ones.
RECIPES: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        num_classes=10,
        image_size=32,
        mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
        std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
        pad=4,
        pad_mode="reflect",
        flip=True,
    ),
    "svhn": DatasetSpec("svhn", 10, 32, _HALF, _HALF, pad=2, pad_mode="zeros", flip=False),
    "stl10": DatasetSpec("stl10", 10, 96, _HALF, _HALF, pad=4, pad_mode="zeros", flip=True),
    # ImageNet's usual statistics; the crop is the streaming pipeline's random resized crop
    # (pgl_fast.data.stream), so there is no pad-and-crop here: only the flip.
    "imagenet": DatasetSpec("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            pad=0, pad_mode="zeros", flip=True),
}


def _recipe(recipe: str) -> DatasetSpec:
    try:
        return RECIPES[recipe]
    except KeyError:
        raise UserError(
            f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)} "
            "(it sets the augmentation and normalisation of imagefolder/synthetic data)"
        ) from None
