"""Streaming data: image files decoded by ``DataLoader`` worker processes, batch by batch.

The resident pipeline (:mod:`pgl_fast.data.sources`) keeps a whole data set decoded on the device; that is
impossible for ImageNet-sized sets. Here only the file list is held (as one packed byte buffer,
so forked workers do not copy-on-read a million Python strings): each batch is read and decoded
by worker processes, cropped/resized and flipped per sample, collated as uint8, copied to pinned
memory and moved to the device with a non-blocking copy while the previous step runs (the loader
keeps ``prefetch`` batches per worker in flight). Normalisation happens on the device, as in the
resident pipeline.

Determinism, hence exact mid-epoch resume: the epoch's order is the trainer's permutation (drawn
from its data generator and saved in every mid-epoch checkpoint), and every random decision of
the augmentation of one sample comes from a generator seeded by ``(seed, epoch, sample index)``.
No worker state, worker count or worker order enters the result, so a run resumed at step k of
an epoch reads and augments exactly the batches an uninterrupted run would (a stateful loader
such as torchdata's ``StatefulDataLoader`` is therefore not needed, and not used).

Under data parallel every rank draws the same global batches and decodes only its contiguous
shard of each (the same images per step for any world size, as the resident pipeline).

Recipes: ``imagenet`` trains with a random resized crop (scale 0.08-1, aspect 3/4-4/3) to
``image_size`` and a horizontal flip, and evaluates by resizing the shorter side to
``image_size * 256 / 224`` then centre-cropping; the pad-and-crop recipes (cifar10, svhn, stl10)
need square images of the spec's size and apply the resident pipeline's crop and flip per sample.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import augment, recipes, sources
from ..distributed.data_parallel import check_epoch_split, eval_shard, shard_batch
from ..errors import UserError

__all__ = ["StreamData", "load_stream", "sample_seed", "random_resized_crop_params", "TrainTransform",
           "EvalTransform", "ImageFiles", "choose_pipeline", "PIPELINES"]

PIPELINES = ("auto", "resident", "stream")
# The ImageNet evaluation resizes the shorter side to 256 for 224 crops: the same ratio at any size.
_EVAL_RESIZE_RATIO = 256 / 224
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: a hash of the three numbers, so that
    neighbouring samples and epochs get unrelated streams (63 bits: a valid manual_seed)."""
    digest = hashlib.blake2b(struct.pack("<qqq", int(seed), int(epoch), int(index)), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_resized_crop_params(height: int, width: int, g: torch.Generator, scale=_RRC_SCALE, ratio=_RRC_RATIO):
    """``(top, left, h, w)`` of a random crop covering a ``scale`` fraction of the area with an
    aspect ratio in ``ratio`` (log-uniform), drawn from ``g``: ten tries, then the largest central
    crop within the ratio range. The draws are, per try, the area, the log aspect and (on success)
    the top and left offsets."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_ratio = torch.tensor([lo, hi])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """One training sample's augmentation, every draw from the sample's own generator."""

    def __init__(self, spec: recipes.DatasetSpec, recipe: str):
        self.spec, self.recipe = spec, recipe
        self.size = int(spec.image_size)
        self.pad_crop = None if recipe == "imagenet" else augment.BatchAugmenter(spec, "cpu")

    def __call__(self, img: torch.Tensor, g: torch.Generator, path: str) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F  # torchvision is heavy to import: only where images are decoded

        if self.pad_crop is None:
            top, left, h, w = random_resized_crop_params(int(img.shape[1]), int(img.shape[2]), g)
            out = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if torch.rand(1, generator=g).item() < 0.5:
                out = out.flip(-1)
            return out.contiguous()
        _check_size(img, self.size, path)
        params = self.pad_crop.sample_params(1, g)
        return self.pad_crop.apply(img.unsqueeze(0), *params)[0]


class EvalTransform:
    """Deterministic test-time view: ImageNet's resize-and-centre-crop, or the image as it is."""

    def __init__(self, spec: recipes.DatasetSpec, recipe: str):
        self.recipe, self.size = recipe, int(spec.image_size)

    def __call__(self, img: torch.Tensor, g, path: str) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F  # torchvision is heavy to import: only where images are decoded

        if self.recipe != "imagenet":
            _check_size(img, self.size, path)
            return img
        img = F.resize(img, [int(round(self.size * _EVAL_RESIZE_RATIO))], antialias=True)
        return F.center_crop(img, [self.size, self.size]).contiguous()


def _check_size(img, size: int, path: str) -> None:
    if tuple(img.shape[1:]) != (size, size):
        raise UserError(f"image {path} is {img.shape[2]}x{img.shape[1]}: this recipe crops {size}x{size} images "
                        f"with padding and needs every image at that size; use --recipe imagenet or resize it")


class _Paths:
    """Many file paths in one byte buffer plus offsets: constant memory per path, nothing for
    forked workers to copy on read (reference counts of a list of str would touch every page)."""

    def __init__(self, paths: list[str]):
        blobs = [p.encode("utf-8") for p in paths]
        self.buf = torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8).clone()
        self.ends = torch.tensor([len(b) for b in blobs], dtype=torch.int64).cumsum(0)

    def __len__(self):
        return int(self.ends.numel())

    def __getitem__(self, i: int) -> str:
        end = int(self.ends[i])
        start = int(self.ends[i - 1]) if i > 0 else 0
        return bytes(self.buf[start:end].numpy()).decode("utf-8")


class ImageFiles(torch.utils.data.Dataset):
    """Image files with labels. ``dataset[(i, seed)]`` decodes file ``i`` (grey and CMYK images
    become RGB) and transforms it with a generator seeded ``seed`` (None: no random draws).
    Returns ``(uint8 [3, S, S] or None, label, error line or None)``: a file that cannot be read
    comes back as its one-line error, so the main process raises it (a worker's exception would
    arrive wrapped in a traceback)."""

    def __init__(self, paths: list[str], labels: list[int], transform):
        self.paths = _Paths(paths)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, seed = key
        path = self.paths[i]
        label = int(self.labels[i])
        try:
            img = _read_image(path)
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            return self.transform(img, g, path), label, None
        except UserError as e:
            return None, label, str(e)


def _read_image(path: str) -> torch.Tensor:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    with warnings.catch_warnings():
        # torchvision >= 0.29 warns on every decode call that image decoding moves to TorchCodec.
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated", category=DeprecationWarning)
        return sources._decode_one(path, raw)


def _collate(items):
    errors = [e for _, _, e in items if e is not None]
    if errors:
        return None, None, errors
    return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items], dtype=torch.int64), []


class _Plan:
    """The batch sampler of the loader: the lists of ``(index, seed)`` keys the trainer asked for
    this epoch (set before each ``iter``, so persistent workers serve every epoch)."""

    def __init__(self):
        self.keys: list[list[tuple[int, int | None]]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


@dataclass
class StreamData:
    """A streamed ImageFolder: what :func:`load_stream` found, plus the loaders once the
    :class:`~pgl_fast.training.trainer.Trainer` binds it to a device. ``meta``: root, counts, skipped files."""

    spec: recipes.DatasetSpec
    recipe: str
    train_files: list[str]
    train_labels: list[int]
    test_files: list[str]
    test_labels: list[int]
    class_names: tuple[str, ...]
    workers: int = 2
    prefetch: int = 2
    meta: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    def loader(self, split: str, plan: _Plan, device: torch.device) -> torch.utils.data.DataLoader:
        """A DataLoader over ``split`` whose batches are the keys ``plan`` holds when it is iterated."""
        train = split == "train"
        files = ImageFiles(self.train_files if train else self.test_files,
                           self.train_labels if train else self.test_labels,
                           (TrainTransform if train else EvalTransform)(self.spec, self.recipe))
        kw = {}
        if self.workers > 0:
            kw = dict(num_workers=self.workers, prefetch_factor=self.prefetch, persistent_workers=train)
        return torch.utils.data.DataLoader(files, batch_sampler=plan, collate_fn=_collate,
                                           pin_memory=device.type == "cuda", **kw)


def _batches_of(loader) -> "iter":
    for x, y, errors in loader:
        if errors:
            raise UserError(errors[0] + (f" ({len(errors) - 1} more bad file(s) in this batch)" if len(errors) > 1 else "")
                            + "; or pass --skip-bad-images to leave such files out")
        yield x, y


class BoundStream:
    """The trainer's data object for a :class:`StreamData` (the interface of its resident one):
    global batches of indices from the trainer's generator, read ahead by the loader."""

    resumable_mid_epoch = True
    uint8 = True

    def __init__(self, stream: StreamData, device, channels_last: bool, test_batch_size: int, dtype, seed: int):
        self.stream, self.spec = stream, stream.spec
        self.device, self.channels_last, self.dtype = torch.device(device), channels_last, dtype
        self.test_batch_size, self.seed = test_batch_size, int(seed)
        self.num_train, self.num_test = stream.num_train, stream.num_test
        self.channels = len(stream.spec.mean)
        self.notes: list[str] = []
        self.rank, self.world, self.learner = 0, 1, None
        self._plan = _Plan()
        self._loader = stream.loader("train", self._plan, self.device)
        self._it = None
        self._expect: list[torch.Tensor] = []

    def shard(self, ctx, learner) -> "BoundStream":
        """Data parallel: this rank decodes only its contiguous piece of every global batch."""
        self.rank, self.world, self.learner = ctx.rank, ctx.world_size, learner
        return self

    def epoch_batches(self, batch_size: int, gen, drop_last: bool):
        if self.world > 1:
            check_epoch_split(self.num_train, batch_size, self.world, drop_last)
        return augment.epoch_batches(self.num_train, batch_size, generator=gen, drop_last=drop_last,
                                      device=self.device)

    def begin_epoch(self, epoch: int, batches, first_step: int) -> None:
        """Queue the epoch's batches from ``first_step`` on: the workers start decoding now."""
        self._expect = []
        keys = []
        for b in list(batches)[first_step:]:
            idx = shard_batch(b.cpu(), self.rank, self.world) if self.world > 1 else b.cpu()
            keys.append([(i, sample_seed(self.seed, epoch, i)) for i in idx.tolist()])
            self._expect.append(int(b.numel()))
        self._plan.keys = keys
        self._it = _batches_of(self._loader)

    def train_batch(self, idx, gen, needs_image: bool):
        if self._it is None:
            raise RuntimeError("BoundStream.train_batch before begin_epoch")
        xb, y = next(self._it)
        n_global = self._expect.pop(0)
        if int(y.shape[0]) != (int(idx.numel()) if self.world == 1 else int(idx.numel()) // self.world
                               + (self.rank < int(idx.numel()) % self.world)):
            # the loop asked for another batch than begin_epoch queued: never train on the wrong images
            raise RuntimeError(f"BoundStream: a batch of {int(y.shape[0])} images arrived for {int(idx.numel())} indices")
        if self.learner is not None:
            self.learner.set_global_batch(n_global)
        xb = xb.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        x = augment.normalize(xb, self.spec, self.dtype, self.channels_last)
        return x, y, xb.to(self.dtype).div_(255) if needs_image else None

    def test_batches(self):
        lo, hi = 0, self.num_test
        if self.world > 1:
            lo, hi = eval_shard(self.num_test, self.rank, self.world)
        plan = _Plan()
        plan.keys = [[(i, None) for i in range(a, min(a + self.test_batch_size, hi))]
                     for a in range(lo, hi, self.test_batch_size)]
        for xb, y in _batches_of(self.stream.loader("test", plan, self.device)):
            yield (augment.normalize(xb.to(self.device, non_blocking=True), self.spec, self.dtype, self.channels_last),
                   y.to(self.device, non_blocking=True))

    def probe_batch(self):
        files = ImageFiles(self.stream.train_files[:1], self.stream.train_labels[:1],
                           EvalTransform(self.spec, self.stream.recipe))
        x, _, err = files[(0, None)]
        if err is not None:
            raise UserError(err)
        x = augment.normalize(x.unsqueeze(0).to(self.device), self.spec, self.dtype, self.channels_last)
        return x, f"train_data (streamed {self.stream.train_files[0]}, {tuple(x.shape[1:])})"


# ----------------------------------------------------------------------------------------------
# Loading and choosing
# ----------------------------------------------------------------------------------------------


def _decoded_only(img, g, path):
    return torch.zeros(())  # a check of the file: the pixels are not needed


def _as_list(items):
    return items


def _check_files(files, labels, workers: int):
    """Decode every file once (in ``workers`` processes) and drop those that fail: the good
    ``(files, labels)`` and the bad files' one-line errors, in data set order."""
    probe = ImageFiles(files, labels, _decoded_only)
    plan = _Plan()
    plan.keys = [[(i, None) for i in range(a, min(a + 64, len(files)))] for a in range(0, len(files), 64)]
    kw = dict(num_workers=workers, prefetch_factor=2) if workers > 0 else {}
    loader = torch.utils.data.DataLoader(probe, batch_sampler=plan, collate_fn=_as_list, **kw)
    bad, errors = set(), []
    pos = 0
    for items in loader:
        for k, (_, _, err) in enumerate(items):
            if err is not None:
                bad.add(pos + k)
                errors.append(err)
        pos += len(items)
    keep = [i for i in range(len(files)) if i not in bad]
    return [files[i] for i in keep], [labels[i] for i in keep], errors


def load_stream(data_dir, *, recipe: str, image_size: int | None, workers: int = 2, skip_bad: bool = False,
                train_subset: int | None = None, test_subset: int | None = None, subset_seed: int = 0) -> StreamData:
    """Scan an ImageFolder tree ``train/<class>/*``, ``test/<class>/*`` for streaming (nothing is
    decoded, unless ``skip_bad``: then every file is decoded once and the bad ones are left out
    and counted in ``meta``). ``image_size``: the crop size (default: the recipe's)."""
    if data_dir is None or str(data_dir) == "":
        raise UserError("dataset imagefolder needs a data directory (--data-dir)")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    base = sources.dataset_spec("imagefolder", recipe=recipe)
    size = base.image_size if image_size is None else int(image_size)
    if size < 8:
        raise UserError(f"--image-size must be >= 8 for streaming, got {size}")
    root = sources._find_imagefolder_root(Path(data_dir).expanduser().absolute())
    scans = {s: sources._scan_split(root / s) for s in ("train", "test")}
    if scans["train"][0] != scans["test"][0]:
        raise UserError(f"class folders of {root / 'test'} differ from {root / 'train'}: both splits need the same "
                        "<class> folders")
    classes = scans["train"][0]
    meta = {"dataset": "imagefolder", "root": str(root), "pipeline": "stream", "workers": workers,
            "skipped_images": 0, "skipped_files": []}
    split_files = {}
    for s, flag, sub, sseed in (("train", "--train-subset", train_subset, subset_seed),
                                ("test", "--test-subset", test_subset, subset_seed + 1)):
        files = [p for p, _ in scans[s][1]]
        labels = [lab for _, lab in scans[s][1]]
        if skip_bad:
            files, labels, errors = _check_files(files, labels, workers)
            meta["skipped_images"] += len(errors)
            meta["skipped_files"] += errors[:20]  # the first ones: enough to find the pattern
            if not files:
                raise UserError(f"every image of {root / s} failed to decode (first: {errors[0]})")
        if sub is not None:
            keep = sources._subset(torch.arange(len(labels)), torch.tensor(labels), sub, sseed, flag,
                                    "imagefolder", s)[0].tolist()
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        split_files[s] = (files, labels)
    spec = dataclasses.replace(base, num_classes=len(classes), image_size=size,
                               pad=min(base.pad, max(size - 1, 0)))
    return StreamData(spec=spec, recipe=recipe, train_files=split_files["train"][0],
                      train_labels=split_files["train"][1], test_files=split_files["test"][0],
                      test_labels=split_files["test"][1], class_names=tuple(classes), workers=workers, meta=meta)


def _first_image_size(data_dir) -> tuple[int, int, int]:
    """(files in train/ and test/, height, width of the first train image), from headers only."""
    from PIL import Image  # a header read only where a streamed data set is opened

    root = sources._find_imagefolder_root(Path(data_dir).expanduser().absolute())
    n, first = 0, None
    for s in ("train", "test"):
        for dirpath, _, names in os.walk(root / s):
            imgs = sorted(f for f in names if f.lower().endswith(sources.IMAGE_EXTENSIONS) and not f.startswith("."))
            n += len(imgs)
            if first is None and imgs and s == "train":
                first = os.path.join(dirpath, imgs[0])
    if first is None:
        return n, 0, 0
    try:
        with Image.open(first) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - any decoder error is the same bad file
        raise UserError(f"cannot read image file {first} ({type(exc).__name__}: {exc})") from None
    return n, h, w


def check_pipeline(pipeline: str, dataset: str, recipe: str) -> None:
    """Refuse a ``--data-pipeline`` that cannot read ``dataset`` with ``recipe`` (the config checks
    it before any work starts; :func:`choose_pipeline` again for callers of the API)."""
    if pipeline not in PIPELINES:
        raise UserError(f"--data-pipeline: {pipeline!r} is not one of {', '.join(PIPELINES)}")
    folder = sources.reads(dataset) == "imagefolder"
    if pipeline == "stream" and not folder:
        raise UserError(f"--data-pipeline: stream reads ImageFolder trees; --dataset {dataset} is decoded whole "
                        "(use resident or auto)")
    if pipeline == "resident" and folder and recipe == "imagenet":
        raise UserError("--data-pipeline: resident cannot train --recipe imagenet: its random resized crops need "
                        "the full-size images; use stream or auto")


def choose_pipeline(pipeline: str, dataset: str, recipe: str, data_dir, budget_mib: float) -> str:
    """``resident`` or ``stream`` for ``--data-pipeline``. auto streams an ImageFolder with the
    imagenet recipe (its random resized crops need the full-size images) or one whose decoded
    size, estimated from the first image as ``files x 3 x H x W`` bytes, exceeds ``budget_mib``."""
    check_pipeline(pipeline, dataset, recipe)
    if pipeline != "auto":
        return pipeline
    if sources.reads(dataset) != "imagefolder":
        return "resident"
    if recipe == "imagenet":
        return "stream"
    n, h, w = _first_image_size(data_dir)
    return "stream" if n * 3 * h * w > budget_mib * 2 ** 20 else "resident"
