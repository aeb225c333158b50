"""Data sources: the data set registry, loading (torchvision downloads, ImageFolder trees and
archives, generated sets), decoding and the uint8 tensor cache.

Every data set is decoded once into uint8 tensors ``[N, 3, H, W]`` plus int64 labels, cached on
disk and then kept whole on the training device (the CIFAR-10 train split is 153.6 MB as uint8);
``imagefolder`` reads ``train/<class>/*`` and ``test/<class>/*`` (for instance the offline JPEG
copy of CIFAR-10) and trains with the recipe named by ``recipe``; ``synthetic`` generates small
deterministic images for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io as _io
import json
import os
import tarfile
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import operator

import numpy as np
import torch

from ..errors import UserError
from ..jsonio import write_json_atomic
from ..registry import add_entry
from .recipes import RECIPES, DatasetSpec, _recipe

__all__ = [
    "DATASETS",
    "DatasetSource",
    "LoadRequest",
    "Splits",
    "register_dataset",
    "run_defaults",
    "IMAGE_EXTENSIONS",
    "Data",
    "dataset_spec",
    "load_dataset",
    "extract_archive_if_needed",
    "archive_cache_dir",
    "is_archive",
]

# Files ImageFolder accepts (torchvision's IMG_EXTENSIONS); anything else in a class folder is
# ignored, as torchvision does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Bump when the layout of a cache file changes: old files are then re-decoded, not misread.
_CACHE_VERSION = 1
_CACHE_SUBDIR = ".pgl_cache"
# Files per decode task: big enough to amortise the call, small enough to spread over threads.
_DECODE_CHUNK = 512

_IMAGEFOLDER_LAYOUT = (
    "expected an ImageFolder tree train/<class>/*.jpg and test/<class>/*.jpg "
    "(or a .tar.gz/.tgz/.tar archive of one, such as cifar10-jpeg.tar.gz)"
)


# A data set that cannot be found, read or used raises UserError: one self-contained line naming
# the file or folder, what was expected there and how to fix it.


def dataset_spec(
    name: str, *, recipe: str = "cifar10", num_classes: int | None = None, image_size: int | None = None
) -> DatasetSpec:
    """The spec of a data set. A data set that is its own recipe (CIFAR-10, SVHN, STL-10) is that
    recipe exactly; any other (``imagefolder``, ``synthetic``, a registered one) takes the
    augmentation and normalisation of ``recipe`` and the given class count and image size; the crop
    padding is capped below the image size (reflect padding needs ``pad < size``)."""
    source = _source(name)
    if source.recipe == name:
        return RECIPES[name]
    base = _recipe(recipe)
    size = base.image_size if image_size is None else int(image_size)
    return dataclasses.replace(
        base,
        name=name,
        num_classes=base.num_classes if num_classes is None else int(num_classes),
        image_size=size,
        pad=min(base.pad, max(size - 1, 0)),
    )


# ----------------------------------------------------------------------------------------------
# The data set registry
# ----------------------------------------------------------------------------------------------

# What a data set reads, which decides the flags that apply to it: "download" (torchvision files in
# --data-dir, fetched unless --no-download), "imagefolder" (an ImageFolder tree or archive in
# --data-dir; the one kind --data-pipeline stream reads), "files" (files of its own in --data-dir,
# never downloaded), "generated" (made in memory: no --data-dir, nothing cached).
READS = ("download", "imagefolder", "files", "generated")


@dataclass(frozen=True)
class LoadRequest:
    """What :func:`load_dataset` hands a data set's loader. ``data_dir`` is absolute (None for a
    generated data set); ``meta`` is the run's record of the load, where a loader notes where each
    split came from (``train_source``/``test_source``: ``"cache"``, ``"decoded"``, ``"generated"``)."""

    name: str
    data_dir: Path | None
    download: bool
    cache_dir: object
    recipe: str
    image_size: int
    synthetic_train: int
    synthetic_test: int
    meta: dict


@dataclass
class Splits:
    """What a loader returns: ``(x, y)`` of each split, ``x`` uint8 ``[N, C, H, W]``, ``y`` integer
    labels ``[N]``; the class names; the folder they were read from (None: generated); and the spec
    when the loader makes its own (None: the data set's recipe at these images' size and class count)."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    class_names: Sequence[str]
    root: Path | None = None
    spec: DatasetSpec | None = None


@dataclass(frozen=True)
class DatasetSource:
    """One data set of the registry. ``load(request) -> Splits`` reads or makes both splits;
    ``help`` is one line; ``reads`` is one of :data:`READS`. ``recipe`` names the :data:`RECIPES`
    entry its runs train with (None: the run's ``--recipe`` chooses, as for ``imagefolder``);
    ``flags`` are the config fields only this data set reads (``synthetic``'s image counts).
    ``batch_size``, ``lr`` and ``split_table`` (the ``--split balanced`` table: ``cifar10`` or
    ``stl10``) are a run's defaults when the flags do not set them."""

    load: Callable[[LoadRequest], Splits]
    help: str
    reads: str
    recipe: str | None = "cifar10"
    flags: tuple[str, ...] = ()
    batch_size: int = 1024
    lr: float = 0.8
    split_table: str = "cifar10"

    def __post_init__(self):
        if not callable(self.load):
            raise UserError(f"DatasetSource.load must be callable, got {type(self.load).__name__}")
        if self.reads not in READS:
            raise UserError(f"DatasetSource.reads {self.reads!r} is not one of {', '.join(READS)}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UserError(f"DatasetSource.recipe {self.recipe!r} is not one of {', '.join(RECIPES)} "
                            "(or None: --recipe chooses)")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1 and self.lr > 0):
            raise UserError(f"DatasetSource: batch_size must be an integer >= 1 and lr > 0, "
                            f"got {self.batch_size} and {self.lr}")


def _load_synthetic(req: LoadRequest) -> Splits:
    # generated images take --recipe's augmentation, normalisation and image size (at --image-size
    # when given), so a run's defaults follow that recipe as an ImageFolder copy's do
    spec = dataset_spec("synthetic", recipe=req.recipe, image_size=req.image_size)
    train = _synthetic_split(req.synthetic_train, spec.image_size, seed=0, flag="synthetic_train")
    test = _synthetic_split(req.synthetic_test, spec.image_size, seed=1, flag="synthetic_test")
    req.meta.update(train_source="generated", test_source="generated")
    return Splits(train, test, _SYNTHETIC_CLASSES, root=None, spec=spec)


def _load_imagefolder_source(req: LoadRequest) -> Splits:
    splits, class_names, root = _load_imagefolder(req.data_dir, req.cache_dir, req.meta)
    return Splits(splits["train"], splits["test"], class_names, root=root)


def _load_torchvision_source(req: LoadRequest) -> Splits:
    splits, class_names, root = _load_torchvision(req.name, req.data_dir, req.download, req.cache_dir, req.meta)
    return Splits(splits["train"], splits["test"], class_names, root=root)


# The one table of data sets: the CLI's --dataset choices, load_dataset and the config's defaults and
# flag checks read it. Add an entry with register_dataset.
DATASETS: dict[str, DatasetSource] = {
    "cifar10": DatasetSource(_load_torchvision_source, "CIFAR-10 through torchvision", reads="download",
                             recipe="cifar10"),
    "svhn": DatasetSource(_load_torchvision_source, "SVHN (train and test, no extra) through torchvision",
                          reads="download", recipe="svhn"),
    "stl10": DatasetSource(_load_torchvision_source, "STL-10's 5k labelled images through torchvision",
                           reads="download", recipe="stl10", batch_size=128, lr=0.1, split_table="stl10"),
    "imagefolder": DatasetSource(_load_imagefolder_source, "an ImageFolder tree train/<class>/*, test/<class>/*",
                                 reads="imagefolder", recipe=None),
    "synthetic": DatasetSource(_load_synthetic, "small deterministic images made in memory, for tests",
                               reads="generated", recipe=None, flags=("synthetic_train", "synthetic_test")),
}


def register_dataset(name: str, source: DatasetSource, *, replace: bool = False) -> None:
    """Add the data set ``name`` (lower case, as ``load_dataset`` lower-cases names) to the registry:
    from then on ``load_dataset(name, ...)`` and ``--dataset name`` load it. ``replace`` allows
    redefining a registered name."""
    add_entry(DATASETS, name, source, fn="register_dataset", kind="data set", cls=DatasetSource, field="source",
              lower=True, replace=replace)


def _source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}") from None


def reads(dataset: str) -> str:
    """What ``dataset`` reads (one of ``READS``): an ImageFolder tree is the only kind that streams."""
    return _source(dataset).reads


def run_defaults(dataset: str, recipe: str) -> DatasetSource:
    """The entry whose defaults (``batch_size``, ``lr``, ``split_table``) a run of ``dataset`` takes:
    its own; for a data set that trains with ``--recipe``, the entry of the data set that recipe is
    (an ImageFolder copy of STL-10 with ``--recipe stl10`` trains like STL-10), else its own."""
    source = _source(dataset)
    if source.recipe is None:
        return DATASETS.get(recipe, source)
    return source


# ----------------------------------------------------------------------------------------------
# Loaded data
# ----------------------------------------------------------------------------------------------


@dataclass
class Data:
    """A whole data set as tensors on one device.

    ``train_x``/``test_x`` are contiguous uint8 ``[N, 3, H, W]``, ``train_y``/``test_y`` int64
    ``[N]``. ``meta`` says where each split came from (``"cache"``, ``"decoded"`` or
    ``"generated"``), the resolved data root and cache files, and the decode time in seconds.
    """

    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_x.shape[0]

    def to(self, device) -> "Data":
        """A copy with every tensor on ``device`` (the same object if nothing moves)."""
        device = torch.device(device)
        if self.train_x.device == device:
            return self
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device).contiguous(),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device).contiguous(),
            test_y=self.test_y.to(device),
        )


# ----------------------------------------------------------------------------------------------
# Public loader
# ----------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir,
    *,
    device="cpu",
    train_subset: int | None = None,
    test_subset: int | None = None,
    subset_seed: int = 0,
    download: bool = True,
    cache_dir=None,
    recipe: str = "cifar10",
    synthetic_train: int = 512,
    synthetic_test: int = 256,
    image_size: int = 32,
) -> Data:
    """Load a data set as uint8 tensors on ``device``, decoding it at most once.

    ``cifar10``/``svhn``/``stl10`` go through ``torchvision.datasets`` (downloaded into
    ``data_dir`` when ``download``); ``imagefolder`` reads ``data_dir/{train,test}/<class>/*``
    (or the single subfolder of ``data_dir`` that has them); ``synthetic`` needs no files; a data
    set added with :func:`register_dataset` loads through its own loader. The name is looked up in
    :data:`DATASETS`.
    Decoded splits are cached under ``cache_dir`` (default ``<data_dir>/.pgl_cache``, or
    ``~/.cache/pgl_fast`` when ``data_dir`` is read-only) and re-decoded when the files change.
    ``train_subset``/``test_subset`` keep a seeded, class-balanced random subset.
    Raises :class:`UserError` with a one-line message on any problem with the data.
    """
    name = str(name).lower()
    source = _source(name)
    t0 = time.perf_counter()
    meta: dict = {"dataset": name}

    if source.reads != "generated":
        if data_dir is None or str(data_dir) == "":
            raise UserError(f"dataset {name} needs a data directory (--data-dir)")
        data_dir = Path(data_dir).expanduser().absolute()
    else:
        data_dir = None
    if source.recipe is None:
        _recipe(recipe)  # fail on a bad recipe before decoding anything
    out = source.load(LoadRequest(name=name, data_dir=data_dir, download=download, cache_dir=cache_dir,
                                  recipe=recipe, image_size=image_size, synthetic_train=synthetic_train,
                                  synthetic_test=synthetic_test, meta=meta))
    (train_x, train_y), (test_x, test_y) = out.train, out.test
    class_names = out.class_names
    _check_loaded(name, train_x, train_y, test_x, test_y, class_names)
    meta["root"] = None if out.root is None else str(out.root)
    spec = out.spec or dataset_spec(name, recipe=source.recipe or recipe, num_classes=len(class_names),
                                    image_size=int(train_x.shape[-2]))
    if train_x.shape[1] != len(spec.mean):
        raise UserError(f"dataset {name}: its images have {train_x.shape[1]} channel(s) but its recipe "
                        f"({spec.name}) normalises {len(spec.mean)}")

    if train_subset is not None:
        train_x, train_y = _subset(train_x, train_y, train_subset, subset_seed, "--train-subset", name, "train")
    if test_subset is not None:
        test_x, test_y = _subset(test_x, test_y, test_subset, subset_seed + 1, "--test-subset", name, "test")

    device = torch.device(device)
    meta["load_seconds"] = time.perf_counter() - t0
    return Data(
        spec=spec,
        train_x=train_x.to(device).contiguous(),
        train_y=train_y.to(device=device, dtype=torch.int64),
        test_x=test_x.to(device).contiguous(),
        test_y=test_y.to(device=device, dtype=torch.int64),
        class_names=tuple(class_names),
        meta=meta,
    )


def _check_loaded(name, train_x, train_y, test_x, test_y, class_names) -> None:
    """A registered loader's output has the layout the pipeline indexes: uint8 ``[N, C, H, W]``
    square images, the same ``C, H, W`` in both splits, one integer label in ``0..classes-1`` each."""
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == x.shape[-2]):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"dataset {name}: its {split} images must be a uint8 [N, C, H, W] tensor of square "
                            f"images, got {got}")
        if not (isinstance(y, torch.Tensor) and not y.is_floating_point() and y.shape == x.shape[:1]):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise UserError(f"dataset {name}: its {split} labels must be an integer tensor [{x.shape[0]}], got {got}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(class_names)):
            raise UserError(f"dataset {name}: {split} labels must be in 0..{len(class_names) - 1} "
                            f"({len(class_names)} class names), got {int(y.min())}..{int(y.max())}")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(f"dataset {name}: train images are {tuple(train_x.shape[1:])} but test images "
                        f"{tuple(test_x.shape[1:])}; both splits need the same channels and size")


def _positive_int(n, flag: str) -> int:
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise UserError(f"{flag} must be a positive integer, got {n!r}") from None
    if n < 1:
        raise UserError(f"{flag} must be a positive integer, got {n}")
    return n


def _subset(x, y, n, seed, flag, name, split):
    """A seeded random subset of ``n`` samples, balanced over classes (class counts differ by at
    most one where the split allows), returned in data set order."""
    total = x.shape[0]
    n = _positive_int(n, flag)
    if n > total:
        raise UserError(f"{flag} {n} is larger than the {name} {split} split ({total} images)")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=g)
    # Rank of each sample within its class, in random order: taking samples by increasing rank
    # (ties broken by the random permutation) fills all classes evenly.
    y_perm = y[perm]
    by_class = torch.sort(y_perm, stable=True).indices
    sorted_labels = y_perm[by_class]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(total, dtype=torch.int64)
    rank[by_class] = torch.arange(total) - starts[sorted_labels]
    order = torch.argsort(rank * total + torch.arange(total))
    keep = torch.sort(perm[order[:n]]).values
    return x[keep].contiguous(), y[keep]


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------

_SYNTHETIC_CLASSES = (
    "red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime", "pink",
)  # fmt: skip
_SYNTHETIC_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip


def _synthetic_split(n: int, size: int, seed: int, flag: str):
    """``n`` deterministic images: a class colour plus a class-dependent stripe pattern, under
    heavy noise, so a small model can learn the labels but not trivially."""
    n = _positive_int(n, flag)
    if not isinstance(size, int) or size < 2:
        raise UserError(f"synthetic image size must be an integer >= 2, got {size!r}")
    g = torch.Generator().manual_seed(1234 + seed)
    k = len(_SYNTHETIC_CLASSES)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    colour = torch.tensor(_SYNTHETIC_PALETTE, dtype=torch.float32)[y].view(n, 3, 1, 1)
    # Stripes: horizontal for even classes, vertical for odd ones, period 2..6 by class.
    coord = torch.arange(size, dtype=torch.float32)
    period = (2 + (y // 2) % 5).float().view(n, 1, 1, 1)
    rows = coord.view(1, 1, size, 1)
    cols = coord.view(1, 1, 1, size)
    horizontal = (y % 2 == 0).view(n, 1, 1, 1)
    phase = torch.where(horizontal, rows, cols) / period
    stripes = 40.0 * torch.sign(torch.sin(phase * torch.pi))
    noise = 70.0 * torch.randn(n, 3, size, size, generator=g)
    x = (0.7 * colour + 38.0 + stripes + noise).round().clamp(0, 255).to(torch.uint8)
    return x.contiguous(), y.to(torch.int64)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def _writable_dir(path: Path) -> bool:
    """Whether ``path`` exists or can be created, and a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pgl_fast"


def _resolve_cache_dir(cache_dir, data_dir: Path) -> Path | None:
    """The folder for cache files, or None when nothing writable is available (no caching)."""
    if cache_dir is not None:
        path = Path(cache_dir).expanduser().absolute()
        if _writable_dir(path):
            return path
        warnings.warn(f"pgl_fast: cache dir {path} is not writable; decoded data will not be cached")
        return None
    for path in (data_dir / _CACHE_SUBDIR, _user_cache_dir()):
        if _writable_dir(path):
            return path
    warnings.warn(f"pgl_fast: neither {data_dir / _CACHE_SUBDIR} nor {_user_cache_dir()} is writable; no cache")
    return None


def _cache_file(cache_dir: Path, name: str, split: str, root: Path) -> Path:
    # One file per (data set, split, absolute root); the fingerprint lives inside the file, so a
    # changed folder overwrites its old cache instead of piling up new ones.
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return cache_dir / f"{name}-{split}-{digest}.pt"


def _read_cache(path: Path, name: str, split: str, root: Path, fingerprint: str):
    """The cached ``(x, y, classes)`` if ``path`` holds this split with this fingerprint."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"pgl_fast: ignoring unreadable cache file {path} ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(blob, dict):
        return None
    wanted = {"version": _CACHE_VERSION, "dataset": name, "split": split, "root": str(root), "fingerprint": fingerprint}
    if any(blob.get(k) != v for k, v in wanted.items()):
        return None
    x, y, classes = blob.get("x"), blob.get("y"), blob.get("classes")
    _check_split(x, y, classes, f"cache file {path}", f"delete {path} to rebuild it")
    return x, y, list(classes)


def _write_cache(path: Path, name, split, root, fingerprint, x, y, classes) -> bool:
    """Write atomically (temporary file + os.replace) so a crash never leaves half a cache.

    Not ``jsonio.atomic_write``: the temporary name is unique (``mkstemp``) because several
    processes (the experiment runner's parallel runs) may decode the same data set at once and
    must not write into one ``.tmp``; there is no fsync, since a cache lost to a power cut is only
    decoded again; and a failure is a warning, never an error, since caching is an optimisation."""
    blob = {
        "version": _CACHE_VERSION,
        "dataset": name,
        "split": split,
        "root": str(root),
        "fingerprint": fingerprint,
        "x": x,
        "y": y,
        "classes": list(classes),
    }
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save(blob, fh)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as the data
        os.replace(tmp, path)
        return True
    except Exception as exc:  # disk full, permissions, ...: caching is an optimisation only
        warnings.warn(f"pgl_fast: could not write cache file {path} ({exc}); continuing without it")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


def _check_split(x, y, classes, source: str, fix: str) -> None:
    """Shapes, dtypes and label range of one split; a violation means corrupt data."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{source} does not hold uint8 images [N, 3, H, W] (got {got}); {fix}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise UserError(f"{source} has labels that do not match its {x.shape[0]} images; {fix}")
    if not isinstance(classes, (list, tuple)) or not classes:
        raise UserError(f"{source} has no class names; {fix}")
    if x.shape[0] == 0:
        raise UserError(f"{source} holds no images; {fix}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= len(classes):
        raise UserError(
            f"{source} has labels in [{lo}, {hi}], outside [0, {len(classes) - 1}] "
            f"for {len(classes)} classes; {fix}"
        )


def _fingerprint(entries) -> str:
    """A cheap fingerprint of ``(relative path, size, mtime_ns)`` entries: count and a hash."""
    h = hashlib.sha1()
    count = 0
    for rel, size, mtime in entries:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
        count += 1
    return f"{count}:{h.hexdigest()}"


def _tree_entries(path: Path):
    """``(relative path, size, mtime_ns)`` of every file under ``path`` (a file or a folder),
    skipping hidden entries (our own cache lives in one)."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            full = os.path.join(dirpath, fn)
            st = os.stat(full)
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return out


def _cached_split(name, split, root: Path, fingerprint: str, cache_dir: Path | None, build, meta, files=None):
    """Load one split from the cache, or ``build()`` it and cache the result. With ``files`` (the
    image paths ``build`` decodes) the decode and the cache load are announced on stdout: a first
    decode of a large tree takes minutes and must not look like a hang."""
    path = _cache_file(cache_dir, name, split, root) if cache_dir is not None else None
    if path is not None:
        t0 = time.perf_counter()
        hit = _read_cache(path, name, split, root, fingerprint)
        if hit is not None:
            meta[f"{split}_source"] = "cache"
            meta[f"{split}_cache"] = str(path)
            if files is not None:
                print(f"loaded {int(hit[1].shape[0])} {split} images of {root / split} from the cache {path} "
                      f"in {time.perf_counter() - t0:.1f} s", flush=True)
            return hit
    if files is not None:
        kind = "JPEG images" if files and all(Path(p).suffix.lower() in (".jpg", ".jpeg") for p in files) else "images"
        where = f"cached in {path}" if path is not None else "no writable cache folder: decoded again next run"
        print(f"decoding {len(files)} {kind} from {root / split} (once; {where})...", flush=True)
    t0 = time.perf_counter()
    x, y, classes = build()
    meta[f"{split}_decode_seconds"] = time.perf_counter() - t0
    if files is not None:
        print(f"decoded {int(y.shape[0])} images in {meta[f'{split}_decode_seconds']:.1f} s", flush=True)
    meta[f"{split}_source"] = "decoded"
    if path is not None and _write_cache(path, name, split, root, fingerprint, x, y, classes):
        meta[f"{split}_cache"] = str(path)
    return x, y, classes


# ----------------------------------------------------------------------------------------------
# torchvision data sets
# ----------------------------------------------------------------------------------------------

_TV = {
    # name: (human name, files that make up the downloaded copy, relative to data_dir)
    "cifar10": ("CIFAR-10", lambda split: "cifar-10-batches-py"),
    "svhn": ("SVHN", lambda split: f"{split}_32x32.mat"),
    "stl10": ("STL-10", lambda split: "stl10_binary"),
}

# Files torchvision requires (and checks against the md5 of the official release) before it reads
# a split, relative to data_dir. STL-10 needs all of them, unlabeled_X.bin included, even for the
# train and test splits.
_TV_REQUIRED = {
    "cifar10": lambda split: [f"cifar-10-batches-py/{f}" for f in (
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
        "batches.meta")],
    "svhn": lambda split: [f"{split}_32x32.mat"],
    "stl10": lambda split: [f"stl10_binary/{f}" for f in (
        "train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin")],
}


def _tv_fingerprint(name, split, data_dir: Path) -> str | None:
    target = data_dir / _TV[name][1](split)
    if not target.exists():
        return None
    return _fingerprint(_tree_entries(target))


def _tv_build(name, split, data_dir: Path, download: bool):
    """Read one split through torchvision, converting its numpy arrays directly."""
    human, rel = _TV[name][0], _TV[name][1](split)
    try:
        from torchvision import datasets  # torchvision is heavy to import: only where a download is read
    except ImportError as exc:
        raise UserError(f"{human} needs torchvision ({exc}); pip install torchvision") from None
    try:
        if name == "cifar10":
            ds = datasets.CIFAR10(str(data_dir), train=(split == "train"), download=download)
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
            y = torch.as_tensor(ds.targets, dtype=torch.int64)
        elif name == "svhn":
            ds = datasets.SVHN(str(data_dir), split=split, download=download)  # train only, no extra
            x = torch.from_numpy(ds.data).contiguous()  # already NCHW
            y = torch.from_numpy(ds.labels.astype("int64"))
        else:
            ds = datasets.STL10(str(data_dir), split=split, download=download)  # 5k labelled
            x = torch.from_numpy(ds.data).contiguous()  # already NCHW
            y = torch.from_numpy(ds.labels.astype("int64"))
        classes = list(getattr(ds, "classes", None) or [str(i) for i in range(10)])
    except UserError:
        raise
    except ImportError as exc:  # SVHN reads .mat files with scipy
        raise UserError(f"{human} needs an optional package to read {data_dir / rel}: {exc} (pip install scipy)") from None
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        hint = " (the offline JPEG copy loads with --dataset imagefolder)" if name == "cifar10" else ""
        missing = [str(data_dir / f) for f in _TV_REQUIRED[name](split) if not (data_dir / f).is_file()]
        if not (data_dir / rel).exists():
            missing = [str(data_dir / rel)]
        if missing and not download:
            raise UserError(
                f"{human} not found in {data_dir}: missing {', '.join(missing)} and download is off; "
                f"enable downloading or copy the torchvision files there{hint}"
            ) from None
        corrupt = isinstance(exc, RuntimeError) and "corrupted" in str(exc)
        if not missing and (corrupt or (download and isinstance(exc, OSError))):
            # Every file is there, so torchvision's md5 check against the official release failed
            # (when downloading, torchvision only fetches files that fail it).
            files = [str(data_dir / f) for f in _TV_REQUIRED[name](split)]
            which = files[0] if len(files) == 1 else f"one or more of {', '.join(files)}"
            again = f" and downloading the official files failed ({reason})" if download else ""
            raise UserError(
                f"{human} {split} split: {which} failed torchvision's md5 check against the official release "
                f"(truncated, modified or repackaged copy){again}; delete it and download again{hint}"
            ) from None
        if download:
            raise UserError(
                f"{human} not found in {data_dir} and download failed (no network?): {reason}; "
                f"download it on a machine with internet access into {data_dir}{hint}"
            ) from None
        raise UserError(
            f"{human} not found in {data_dir} (expected {data_dir / rel}) and download is off: {reason}; "
            f"enable downloading or copy the torchvision files there{hint}"
        ) from None
    if x.dtype != torch.uint8:
        x = x.to(torch.uint8)
    _check_split(x, y, classes, f"{human} {split} split in {data_dir}", f"delete {data_dir / rel} and download again")
    return x, y, classes


def _load_torchvision(name, data_dir: Path, download: bool, cache_dir, meta):
    if not data_dir.exists() and not download:
        raise UserError(
            f"data dir {data_dir} does not exist and download is off: create it with the "
            f"torchvision {_TV[name][0]} files or enable downloading"
        )
    splits, class_names = {}, None
    for split in ("train", "test"):
        fingerprint = _tv_fingerprint(name, split, data_dir)
        cdir = _resolve_cache_dir(cache_dir, data_dir) if fingerprint is not None else None
        hit = None
        if cdir is not None:
            hit = _read_cache(_cache_file(cdir, name, split, data_dir), name, split, data_dir, fingerprint)
        if hit is not None:
            meta[f"{split}_source"] = "cache"
            meta[f"{split}_cache"] = str(_cache_file(cdir, name, split, data_dir))
            x, y, classes = hit
        else:
            # torchvision may download now, so fingerprint and resolve the cache afterwards.
            def build(split=split):
                return _tv_build(name, split, data_dir, download)

            t0 = time.perf_counter()
            x, y, classes = build()
            meta[f"{split}_decode_seconds"] = time.perf_counter() - t0
            meta[f"{split}_source"] = "decoded"
            fingerprint = _tv_fingerprint(name, split, data_dir)
            cdir = _resolve_cache_dir(cache_dir, data_dir)
            if fingerprint is not None and cdir is not None:
                path = _cache_file(cdir, name, split, data_dir)
                if _write_cache(path, name, split, data_dir, fingerprint, x, y, classes):
                    meta[f"{split}_cache"] = str(path)
        splits[split] = (x, y)
        class_names = class_names or classes
    return splits, class_names, data_dir


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------


def _find_imagefolder_root(data_dir: Path) -> Path:
    """``data_dir`` itself if it holds train/ and test/, else its single subfolder that does; for a
    tar archive, the tree it unpacks to (see :func:`archive_cache_dir`)."""
    if not data_dir.exists():
        raise UserError(f"data dir {data_dir} does not exist: {_IMAGEFOLDER_LAYOUT}")
    if data_dir.is_file():
        if is_archive(data_dir):  # unpacked once into the user cache; later calls only check it
            data_dir = extract_archive_if_needed(data_dir, archive_cache_dir(data_dir))
            return _find_imagefolder_root(data_dir)
        raise UserError(f"data dir {data_dir} is a file, not a folder: {_IMAGEFOLDER_LAYOUT}")
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        root = data_dir
    else:
        candidates = sorted(
            p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "train").is_dir()
        )
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise UserError(
                f"data dir {data_dir} has no train/ folder but several subfolders with one "
                f"({names}): pass one of them"
            )
        if not candidates:
            raise UserError(f"data dir {data_dir} has no train/ folder: {_IMAGEFOLDER_LAYOUT}")
        root = candidates[0]
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"data dir {root} has no {split}/ folder: {_IMAGEFOLDER_LAYOUT}")
    return root


def _scan_split(split_dir: Path):
    """Class names (sorted, as ImageFolder does) and ``(path, label)`` of every image, plus the
    fingerprint entries of those files."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders: {_IMAGEFOLDER_LAYOUT}")
    files, entries = [], []
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        found = sorted(
            (e.name, e.stat())
            for e in os.scandir(cdir)
            if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not found:
            raise UserError(
                f"class folder {cdir} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                "add images or remove the folder"
            )
        for fname, st in found:
            files.append((str(cdir / fname), label))
            entries.append((f"{cls}/{fname}", st.st_size, st.st_mtime_ns))
    return classes, files, entries


def _decode_one(path: str, data: bytes) -> torch.Tensor:
    """Decode one image file to uint8 [3, H, W]: torchvision first, PIL as the fallback."""
    from torchvision import io as tvio  # torchvision is heavy to import: only where images are decoded

    try:
        img = tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
        if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == 3:
            return img
    except Exception:
        pass
    try:
        from PIL import Image  # only where torchvision cannot decode

        with Image.open(_io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB")).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise UserError(
            f"cannot decode image file {path} ({reason}): it is corrupt or not an image; replace or delete it"
        ) from None


def _decode_chunk(paths: list[str]) -> list[torch.Tensor]:
    """Read and decode a list of files. JPEGs go through one batched ``decode_jpeg`` call
    (about 3x faster than PIL); a failing batch is redone file by file to name the bad file."""
    from torchvision import io as tvio  # torchvision is heavy to import: only where images are decoded

    datas = []
    for p in paths:
        try:
            with open(p, "rb") as fh:
                datas.append(fh.read())
        except OSError as exc:
            raise UserError(f"cannot read image file {p}: {exc.strerror or exc}") from None
    out: list[torch.Tensor | None] = [None] * len(paths)
    jpeg_idx = [i for i, d in enumerate(datas) if d[:3] == b"\xff\xd8\xff"]
    if jpeg_idx:
        try:
            decoded = tvio.decode_jpeg(
                [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpeg_idx],
                mode=tvio.ImageReadMode.RGB,
            )
            for i, img in zip(jpeg_idx, decoded):
                out[i] = img
        except Exception:
            pass  # fall through: the per-file path below finds and names the culprit
    for i, img in enumerate(out):
        if img is None:
            out[i] = _decode_one(paths[i], datas[i])
    return out


def _decode_stacked(paths: list[str]):
    """Worker task: decode a chunk and stack it when all its images share one size (the common
    case), so the main thread copies one block per chunk instead of one tensor per image."""
    imgs = _decode_chunk(paths)
    first = imgs[0].shape
    if all(img.shape == first for img in imgs):
        return torch.stack(imgs), None
    return None, imgs


def _decode_files(paths: list[str], what: str, expected: tuple[tuple[int, int], str] | None = None):
    """Decode ``paths`` into one uint8 ``[N, 3, H, W]`` tensor using a thread per core (the
    decoders release the GIL). Every image must have the size of the first one (or ``expected``:
    a size and the file it came from)."""
    chunks = [paths[i : i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    try:
        workers = len(os.sched_getaffinity(0))
    except AttributeError:
        workers = os.cpu_count() or 1
    workers = max(1, min(16, workers, len(chunks)))
    out = None
    ref_size, ref_file = expected if expected is not None else (None, None)

    def mismatch(p, size):
        return UserError(
            f"image {p} is {size[1]}x{size[0]} but {ref_file} is {ref_size[1]}x{ref_size[0]}: "
            f"all {what} images must have the same size; resize or remove it"
        )

    with warnings.catch_warnings():
        # torchvision >= 0.29 warns on every decode call that image decoding moves to TorchCodec.
        warnings.filterwarnings("ignore", message=".*TorchVision are deprecated", category=DeprecationWarning)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pos = 0
            for chunk_paths, (block, imgs) in zip(chunks, pool.map(_decode_stacked, chunks)):
                if ref_size is None:
                    first = block[0] if block is not None else imgs[0]
                    ref_size, ref_file = (int(first.shape[1]), int(first.shape[2])), chunk_paths[0]
                if out is None:
                    out = torch.empty((len(paths), 3, *ref_size), dtype=torch.uint8)
                if block is not None and tuple(block.shape[2:]) == ref_size:
                    out[pos : pos + block.shape[0]] = block
                    pos += block.shape[0]
                    continue
                # Sizes differ somewhere in this chunk: find and name the first odd file.
                for p, img in zip(chunk_paths, imgs if imgs is not None else block.unbind(0)):
                    size = (int(img.shape[1]), int(img.shape[2]))
                    if size != ref_size:
                        raise mismatch(p, size)
                    out[pos] = img
                    pos += 1
    return out, (ref_size, ref_file)


def _load_imagefolder(data_dir: Path, cache_dir, meta):
    root = _find_imagefolder_root(data_dir)
    scans = {split: _scan_split(root / split) for split in ("train", "test")}
    train_classes, test_classes = scans["train"][0], scans["test"][0]
    if train_classes != test_classes:
        missing = sorted(set(train_classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(train_classes))
        parts = []
        if missing:
            parts.append(f"missing in test/: {', '.join(missing)}")
        if extra:
            parts.append(f"only in test/: {', '.join(extra)}")
        raise UserError(
            f"class folders of {root / 'test'} differ from {root / 'train'} ({'; '.join(parts)}): "
            "both splits need the same <class> folders"
        )
    # an archive's decoded tensors are cached beside its unpacked tree, like a folder's
    cdir = _resolve_cache_dir(cache_dir, root if is_archive(data_dir) else data_dir)
    splits, reference = {}, None
    for split in ("train", "test"):
        classes, files, entries = scans[split]
        fingerprint = _fingerprint(entries)

        def build(files=files, split=split, classes=classes):
            nonlocal reference
            x, ref = _decode_files([p for p, _ in files], f"{root.name}/{split}", expected=reference)
            y = torch.tensor([label for _, label in files], dtype=torch.int64)
            reference = reference or ref
            return x, y, classes

        x, y, classes = _cached_split("imagefolder", split, root, fingerprint, cdir, build, meta,
                                      files=[p for p, _ in files])
        if reference is None:
            reference = ((int(x.shape[2]), int(x.shape[3])), str(root / split))
        elif (int(x.shape[2]), int(x.shape[3])) != reference[0]:
            (h, w), ref_file = reference
            raise UserError(
                f"images in {root / split} are {x.shape[3]}x{x.shape[2]} but {ref_file} is {w}x{h}: "
                "train and test images must have the same size"
            )
        splits[split] = (x, y)
    h, w = reference[0]
    if h != w:
        raise UserError(f"images in {root} are {w}x{h}: only square images are supported; crop or resize them")
    meta["cache_dir"] = str(cdir) if cdir is not None else None
    return splits, train_classes, root


# ----------------------------------------------------------------------------------------------
# Archive helper
# ----------------------------------------------------------------------------------------------


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Format of the record an extraction leaves next to what it unpacked; another value re-checks.
_EXTRACT_RECORD_VERSION = 1


def is_archive(path) -> bool:
    """Whether ``path`` names a tar archive file that :func:`extract_archive_if_needed` unpacks."""
    path = Path(path)
    return path.name.endswith(ARCHIVE_SUFFIXES) and path.is_file()


def archive_cache_dir(archive_path) -> Path:
    """Where an archive passed as a data folder is unpacked: a folder of its own (named after the
    archive and its absolute path, so two archives of the same name never share one) under the
    user cache (``$XDG_CACHE_HOME/pgl_fast/archives``, default ``~/.cache/pgl_fast/archives``).
    It depends on the archive alone, so every command and every rank of a run finds the same
    copy."""
    archive_path = Path(archive_path).expanduser().absolute()
    stem = archive_path.name
    for suffix in ARCHIVE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    digest = hashlib.sha1(str(archive_path).encode()).hexdigest()[:8]
    return _user_cache_dir() / "archives" / f"{stem}-{digest}"


def _one_line(exc: BaseException) -> str:
    """tarfile lists every compression it tried on separate lines; an error message is one line."""
    return " ".join(str(exc).split())


def _archive_stamp(archive_path: Path) -> dict:
    st = archive_path.stat()
    return {"archive": str(archive_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _files_present(dest: Path, files: dict) -> bool:
    """Whether every file of ``files`` ({path relative to ``dest``: size}) is there at its size."""
    base = str(dest) + os.sep  # string joins: a Path per file would double the time of this check
    for rel, size in files.items():
        try:
            if os.stat(base + rel).st_size != size:
                return False
        except OSError:
            return False
    return True


def _read_record(record: Path) -> dict | None:
    try:
        with open(record) as f:
            got = json.load(f)
    except (OSError, ValueError):  # missing, or cut short by a crash: check the files again
        return None
    return got if isinstance(got, dict) and got.get("version") == _EXTRACT_RECORD_VERSION else None


def _archive_members(archive_path: Path) -> tuple[list[str], dict]:
    """The archive's top-level entries and {relative path: size} of its regular files."""
    top, files = [], {}
    try:
        with tarfile.open(archive_path) as tar:
            for m in tar:
                parts = [p for p in Path(m.name).parts if p not in (".", "/")]
                if not parts:
                    continue
                if m.name.startswith("/") or ".." in parts:
                    raise UserError(f"archive {archive_path} has an unsafe member {m.name!r}; refusing to extract")
                if parts[0] not in top:
                    top.append(parts[0])
                if m.isfile():
                    files[str(Path(*parts))] = m.size
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read archive {archive_path} ({_one_line(exc)}): re-download or replace it") from None
    if not top:
        raise UserError(f"archive {archive_path} is empty")
    return top, files


def _extracted_root(dest: Path, top: list[str]) -> Path:
    return dest / top[0] if len(top) == 1 and (dest / top[0]).is_dir() else dest


def extract_archive_if_needed(archive_path, dest) -> Path:
    """Unpack a tar archive (e.g. ``cifar10-jpeg.tar.gz``) into ``dest`` once.

    A completed extraction leaves a record, ``dest/.<archive name>.extracted.json``: the archive's
    size and modification time and every file's size. A later call whose record matches the
    archive and finds every file at its size returns at once (a few stats per thousand files,
    no decompression), so restarting a command that names the archive costs well under a second.
    Anything else -- no record (an earlier run stopped mid-way, or a copy unpacked by hand), a
    record of another archive, a file missing or of another size -- reads the archive's member
    list, and unpacks it again over what is there unless every file is already present, then
    writes the record. Files that are not in the archive (the decoded-tensor cache) are left
    alone. A lock on ``dest/.<archive name>.lock`` makes concurrent callers (the ranks of a
    torchrun job) unpack it once between them.

    Returns the archive's single top-level folder under ``dest`` (``dest/cifar10-jpeg``), or
    ``dest`` if the archive has several top-level entries.
    """
    archive_path = Path(archive_path).expanduser().absolute()
    dest = Path(dest).expanduser().absolute()
    if not archive_path.is_file():
        raise UserError(f"archive {archive_path} not found: pass the path of the data set tarball")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        lock = open(dest / f".{archive_path.name}.lock", "a")
    except OSError as exc:
        raise UserError(f"cannot create extraction folder {dest}: {exc.strerror or exc}") from None
    record = dest / f".{archive_path.name}.extracted.json"
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its holder dies
        stamp = _archive_stamp(archive_path)
        got = _read_record(record)
        if got is not None and got.get("stamp") == stamp and _files_present(dest, got["files"]):
            return _extracted_root(dest, got["top"])
        top, files = _archive_members(archive_path)
        with contextlib.suppress(FileNotFoundError):
            record.unlink()  # what follows changes the folder: no record until it is complete again
        if not _files_present(dest, files):
            _extract_into(archive_path, dest)
            if not _files_present(dest, files):
                raise UserError(f"extracting {archive_path} into {dest} left files missing: check the free space")
        write_json_atomic(str(record), {"version": _EXTRACT_RECORD_VERSION, "stamp": stamp, "top": top, "files": files})
        return _extracted_root(dest, top)


def _extract_into(archive_path: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive_path) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python without extraction filters: refuse links by hand (paths were checked)
                for m in tar.getmembers():
                    if m.issym() or m.islnk():
                        raise UserError(f"archive {archive_path} has an unsafe member {m.name!r}; refusing to extract")
                tar.extractall(dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(
            f"cannot extract archive {archive_path} into {dest} ({_one_line(exc)}): check the file and free space"
        ) from None
