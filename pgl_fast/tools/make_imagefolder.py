"""Build an ImageNet-like ImageFolder tree offline: images of varying size (default 256-500
pixels a side, width and height drawn apart) upscaled from a small source, as JPEG files in
``<out>/train/<class>/`` and ``<out>/test/<class>/``.

Sources: an ImageFolder tree (the offline JPEG copy of CIFAR-10, unpacked) or ``synthetic`` (the
generated images of :mod:`pgl_fast.data.sources`, for tests without any file). The choice of images and
sizes is seeded, so a tree is reproducible.

    python -m pgl_fast.tools.make_imagefolder --source .cache/cifar10-jpeg --out /tmp/inet-like \\
        --train-per-class 300 --test-per-class 50
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from ..data import sources as data_mod
from ..errors import UserError


def _source_images(source: str, split: str, classes: int, per_class: int, g: torch.Generator):
    """``(class name, uint8 [3, h, w])`` pairs, ``per_class`` of each of the first ``classes`` classes."""
    if source == "synthetic":
        x, y = data_mod._synthetic_split(max(per_class * 10, 10), 32, seed=0 if split == "train" else 1,
                                          flag="--source synthetic")
        names = data_mod._SYNTHETIC_CLASSES
        for c in range(min(classes, len(names))):
            for i in (y == c).nonzero().flatten()[:per_class].tolist():
                yield names[c], x[i]
        return
    root = data_mod._find_imagefolder_root(Path(source).expanduser().absolute())
    names, files, _ = data_mod._scan_split(root / split)
    by_class: dict[int, list[str]] = {}
    for path, label in files:
        by_class.setdefault(label, []).append(path)
    for c in range(min(classes, len(names))):
        paths = by_class[c]
        pick = torch.randperm(len(paths), generator=g)[:per_class].tolist()
        for i in sorted(pick):
            with open(paths[i], "rb") as fh:
                yield names[c], data_mod._decode_one(paths[i], fh.read())


def make_imagefolder(source: str, out, *, classes: int = 100, train_per_class: int = 30, test_per_class: int = 10,
                     min_size: int = 256, max_size: int = 500, seed: int = 0, quality: int = 90) -> Path:
    """Write the tree (see the module docstring) and return its root ``out``."""
    if not 1 <= min_size <= max_size:
        raise UserError(f"--min-size/--max-size: need 1 <= min <= max, got {min_size}, {max_size}")
    if classes < 1 or train_per_class < 1 or test_per_class < 1:
        raise UserError("--classes, --train-per-class and --test-per-class must be >= 1")
    out = Path(out)
    g = torch.Generator().manual_seed(seed)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        count: dict[str, int] = {}
        for name, img in _source_images(source, split, classes, per, g):
            w, h = (int(v) for v in torch.randint(min_size, max_size + 1, (2,), generator=g))
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            k = count[name] = count.get(name, 0) + 1
            pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).resize((w, h), Image.BICUBIC)
            pil.save(folder / f"{name}_{k:05d}.jpg", quality=quality)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="an ImageFolder tree (train/, test/) or 'synthetic'")
    ap.add_argument("--out", required=True, help="folder to write train/ and test/ into")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--min-size", type=int, default=256)
    ap.add_argument("--max-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        root = make_imagefolder(a.source, a.out, classes=a.classes, train_per_class=a.train_per_class,
                                test_per_class=a.test_per_class, min_size=a.min_size, max_size=a.max_size,
                                seed=a.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(len(f) for _, _, f in os.walk(root))
    print(f"wrote {n} images under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
