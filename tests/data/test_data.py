"""Tests for pgl_fast.data.sources: specs, loaders, caches, errors and the on-device batch pipeline."""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pgl_fast.data import sources as D
from pgl_fast.data import (
    DATASETS,
    RECIPES,
    BatchAugmenter,
    DatasetSpec,
    dataset_spec,
    epoch_batches,
    extract_archive_if_needed,
    load_dataset,
    make_generator,
    normalize,
)
from pgl_fast.errors import UserError

from helpers import image_array as _image, make_tree, write_image as _write

REPO = Path(__file__).resolve().parents[2]
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny ImageFolder trees written with PIL
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "ds"
    return root, make_tree(root)


def _err(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, "UserError messages must be one line"
    return msg


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


def test_published_recipes():
    assert tuple(DATASETS) == ("cifar10", "svhn", "stl10", "imagefolder", "synthetic")
    c = RECIPES["cifar10"]
    assert (c.num_classes, c.image_size, c.pad, c.pad_mode, c.flip) == (10, 32, 4, "reflect", True)
    assert c.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert c.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    s = RECIPES["svhn"]
    assert (s.image_size, s.pad, s.pad_mode, s.flip, s.mean, s.std) == (32, 2, "zeros", False, (0.5,) * 3, (0.5,) * 3)
    t = RECIPES["stl10"]
    assert (t.image_size, t.pad, t.pad_mode, t.flip, t.mean, t.std) == (96, 4, "zeros", True, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.pad = 2
    with pytest.raises(ValueError):
        DatasetSpec("x", 10, 32, (0.5,) * 3, (0.5,) * 3, 4, "edge", True)


def test_imagefolder_spec_takes_recipe():
    s = dataset_spec("imagefolder", recipe="cifar10", num_classes=7, image_size=32)
    c = RECIPES["cifar10"]
    assert (s.name, s.num_classes, s.image_size) == ("imagefolder", 7, 32)
    assert (s.mean, s.std, s.pad, s.pad_mode, s.flip) == (c.mean, c.std, c.pad, c.pad_mode, c.flip)
    s = dataset_spec("imagefolder", recipe="svhn", num_classes=3, image_size=3)
    assert (s.pad, s.pad_mode, s.flip) == (2, "zeros", False)
    assert dataset_spec("synthetic", image_size=4).pad == 3  # capped below the image size
    with pytest.raises(UserError, match="recipe"):
        dataset_spec("imagefolder", recipe="places365")
    s = dataset_spec("imagefolder", recipe="imagenet", num_classes=5)
    assert (s.image_size, s.mean, s.std, s.pad, s.flip) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, True)


# ----------------------------------------------------------------------------------------------
# Augmentation against an independent per-sample reference
# ----------------------------------------------------------------------------------------------


def reference_augment(x, dy, dx, flip, spec):
    """Pad each sample with F.pad, slice the crop and flip it: a plain Python loop."""
    out = torch.empty_like(x)
    h, w = x.shape[-2:]
    p = spec.pad
    mode = "reflect" if spec.pad_mode == "reflect" else "constant"
    for b in range(x.shape[0]):
        img = x[b].float().unsqueeze(0)
        if dy is not None:
            img = F.pad(img, (p, p, p, p), mode=mode)
            img = img[:, :, int(dy[b]) : int(dy[b]) + h, int(dx[b]) : int(dx[b]) + w]
        if flip is not None and bool(flip[b]):
            img = img.flip(-1)
        out[b] = img[0].to(torch.uint8)
    return out


def _spec(name, **kw):
    return dataclasses.replace(RECIPES[name], **kw)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10"])
@pytest.mark.parametrize("hw", [(12, 12), (10, 14)])
def test_augmenter_matches_reference_random(name, hw):
    spec = _spec(name)
    aug = BatchAugmenter(spec, "cpu")
    x = torch.randint(0, 256, (32, 3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    dy, dx, flip = aug.sample_params(x.shape[0], make_generator(5))
    assert dy.dtype == torch.int64 and int(dy.min()) >= 0 and int(dy.max()) <= 2 * spec.pad
    assert (flip is not None) == spec.flip
    out = aug.apply(x, dy, dx, flip)
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, reference_augment(x, dy, dx, flip, spec))
    # __call__ draws exactly these parameters from an identically seeded generator.
    assert torch.equal(aug(x, make_generator(5)), out)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10"])
def test_augmenter_every_offset_and_flip(name):
    """All (dy, dx, flip) combinations injected explicitly, edges included."""
    spec = _spec(name, flip=True)
    n = 2 * spec.pad + 1
    dy, dx, fl = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(2), indexing="ij")
    dy, dx, fl = dy.reshape(-1), dx.reshape(-1), fl.reshape(-1).bool()
    x = torch.randint(0, 256, (1, 3, 9, 11), dtype=torch.uint8).expand(dy.numel(), -1, -1, -1)
    out = BatchAugmenter(spec).apply(x, dy, dx, fl)
    assert torch.equal(out, reference_augment(x, dy, dx, fl, spec))
    # Offset pad with no flip is the identity crop.
    centre = ((dy == spec.pad) & (dx == spec.pad) & ~fl).nonzero()[0, 0]
    assert torch.equal(out[centre], x[0])
    if spec.pad_mode == "zeros":
        corner = ((dy == 0) & (dx == 0) & ~fl).nonzero()[0, 0]
        assert int(out[corner, :, : spec.pad, :].max()) == 0


def test_flip_only_when_spec_says():
    x = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8)
    flip_only = BatchAugmenter(_spec("cifar10", pad=0), "cpu")
    out = flip_only(x, make_generator(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 80 < int(flipped.sum()) < 176  # about half are flipped
    # Neither crop nor flip: the batch comes back untouched.
    ident = BatchAugmenter(_spec("cifar10", pad=0, flip=False))
    assert ident(x, make_generator(0)) is x


def test_svhn_never_flips():
    spec = RECIPES["svhn"]
    aug = BatchAugmenter(spec)
    assert aug.sample_params(4, make_generator(0))[2] is None
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = aug(x, make_generator(3))
    # Every output is one of the 25 unflipped crops of its own zero-padded input.
    padded = F.pad(x, (2, 2, 2, 2))
    crops = torch.stack([padded[:, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)], 1)
    assert bool((crops == out[:, None]).flatten(2).all(2).any(1).all())


def test_augmenter_reproducible_and_generator_driven():
    aug = BatchAugmenter(RECIPES["cifar10"])
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    a = aug(x, make_generator(7))
    assert torch.equal(a, aug(x, make_generator(7)))
    assert not torch.equal(a, aug(x, make_generator(8)))


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_normalize_matches_hand_arithmetic(name):
    spec = RECIPES[name]
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    out = normalize(x, spec)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        expect = (x[:, c].double() / 255.0 - spec.mean[c]) / spec.std[c]
        torch.testing.assert_close(out[:, c].double(), expect, atol=1e-5, rtol=0)
    # A hand-computed pixel: 255 in the red channel of CIFAR-10.
    y = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), spec)
    assert float(y[0, 0, 0, 0]) == pytest.approx((1.0 - spec.mean[0]) / spec.std[0], abs=1e-5)


def test_normalize_dtype_and_layout():
    spec = RECIPES["cifar10"]
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = normalize(x, spec)
    bf = normalize(x, spec, dtype=torch.bfloat16, channels_last=True)
    assert bf.dtype == torch.bfloat16
    assert bf.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bf.float(), ref, atol=2e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# Batches and generators
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,bs", [(10, 3), (12, 4), (5, 8), (0, 4)])
def test_epoch_batches_cover_once(n, bs):
    batches = epoch_batches(n, bs, generator=make_generator(0), drop_last=False, device="cpu")
    flat = torch.cat(batches) if batches else torch.empty(0, dtype=torch.int64)
    assert flat.dtype == torch.int64
    assert sorted(flat.tolist()) == list(range(n))
    assert all(b.numel() == bs for b in batches[:-1])
    kept = epoch_batches(n, bs, generator=make_generator(0), drop_last=True, device="cpu")
    assert all(b.numel() == bs for b in kept)
    assert len(kept) == n // bs


def test_epoch_batches_reproducible():
    a = epoch_batches(50, 8, generator=make_generator(3), drop_last=False, device="cpu")
    b = epoch_batches(50, 8, generator=make_generator(3), drop_last=False, device="cpu")
    c = epoch_batches(50, 8, generator=make_generator(4), drop_last=False, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 7
    assert not torch.equal(torch.cat(a), torch.cat(c))
    # InfoPro's CIFAR epoch: 48 full batches and one of 848.
    sizes = [t.numel() for t in epoch_batches(50000, 1024, generator=make_generator(0), drop_last=False)]
    assert len(sizes) == 49 and sizes[-1] == 848


def test_make_generator():
    g = make_generator(11, "cpu")
    assert isinstance(g, torch.Generator) and g.device.type == "cpu" and g.initial_seed() == 11


# ----------------------------------------------------------------------------------------------
# ImageFolder loading and caching
# ----------------------------------------------------------------------------------------------


def test_imagefolder_round_trip(tree):
    root, written = tree
    data = load_dataset("imagefolder", root)
    assert data.class_names == ("ant", "bee", "cat")  # sorted, as ImageFolder does
    assert data.spec.num_classes == 3 and data.spec.image_size == 8 and data.spec.name == "imagefolder"
    assert data.spec.mean == RECIPES["cifar10"].mean and data.spec.pad_mode == "reflect"
    assert data.train_x.shape == (9, 3, 8, 8) and data.test_x.shape == (6, 3, 8, 8)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.train_x.is_contiguous()
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    k = 0
    for cls in data.class_names:
        for i in range(3):
            assert np.array_equal(data.train_x[k].permute(1, 2, 0).numpy(), written[("train", cls, i)])
            k += 1
    assert torch.equal(data.test_x[2 * 2 + 1].permute(1, 2, 0), torch.from_numpy(written[("test", "cat", 1)]))
    assert data.meta["train_source"] == data.meta["test_source"] == "decoded"
    assert load_dataset("imagefolder", root, recipe="svhn").spec.flip is False


def test_imagefolder_jpeg_matches_pil(tmp_path):
    root = tmp_path / "jpg"
    make_tree(root, classes=("a", "b"), n_train=2, n_test=1, size=(16, 16), fmt="JPEG")
    data = load_dataset("imagefolder", root, cache_dir=tmp_path / "c")
    pil = np.asarray(Image.open(root / "train" / "b" / "01.jpg").convert("RGB"))
    assert np.array_equal(data.train_x[3].permute(1, 2, 0).numpy(), pil)


def test_imagefolder_parent_with_single_subfolder(tmp_path):
    make_tree(tmp_path / "outer" / "cifar10-jpeg")
    (tmp_path / "outer" / "notes").mkdir()  # folders without train/ do not count
    data = load_dataset("imagefolder", tmp_path / "outer")
    assert data.meta["root"] == str(tmp_path / "outer" / "cifar10-jpeg")
    assert data.num_train == 9


def test_cache_hit_and_invalidation(tree):
    root, _ = tree
    first = load_dataset("imagefolder", root)
    cache = root / ".pgl_cache"
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)
    second = load_dataset("imagefolder", root)
    assert second.meta["train_source"] == second.meta["test_source"] == "cache"
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    # A new training image changes the train fingerprint only.
    _write(root / "train" / "bee" / "99.png", _image(999))
    third = load_dataset("imagefolder", root)
    assert third.meta["train_source"] == "decoded" and third.meta["test_source"] == "cache"
    assert third.num_train == 10
    assert sorted(p.name for p in cache.iterdir()) == files  # overwritten, not piled up
    # A replaced image (same name, new content and size in bytes) is noticed too.
    _write(root / "test" / "ant" / "00.png", _image(1234))
    fourth = load_dataset("imagefolder", root)
    assert fourth.meta["test_source"] == "decoded"
    assert np.array_equal(fourth.test_x[0].permute(1, 2, 0).numpy(), _image(1234))


def test_cache_written_atomically_and_loadable_weights_only(tree):
    root, _ = tree
    load_dataset("imagefolder", root)
    cache = root / ".pgl_cache"
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    for p in cache.iterdir():
        blob = torch.load(p, weights_only=True)
        assert blob["x"].dtype == torch.uint8 and blob["split"] in ("train", "test")


def test_cache_dir_fallback_when_data_dir_read_only(tree, tmp_path, monkeypatch):
    root, _ = tree
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = D._writable_dir
    monkeypatch.setattr(D, "_writable_dir", lambda p: False if p == root / ".pgl_cache" else real(p))
    data = load_dataset("imagefolder", root)
    assert data.meta["cache_dir"] == str(tmp_path / "xdg" / "pgl_fast")
    assert not (root / ".pgl_cache").exists()
    assert load_dataset("imagefolder", root).meta["train_source"] == "cache"


def test_unreadable_cache_is_rebuilt(tree):
    root, _ = tree
    load_dataset("imagefolder", root)
    for p in (root / ".pgl_cache").iterdir():
        p.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        data = load_dataset("imagefolder", root)
    assert data.meta["train_source"] == "decoded"
    assert load_dataset("imagefolder", root).meta["train_source"] == "cache"


def test_cache_with_bad_labels_is_an_error(tree):
    root, _ = tree
    data = load_dataset("imagefolder", root)
    path = Path(data.meta["train_cache"])
    blob = torch.load(path, weights_only=True)
    blob["y"] = blob["y"] + 5
    torch.save(blob, path)
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    msg = _err(e)
    assert str(path) in msg and "labels" in msg and "delete" in msg


# ----------------------------------------------------------------------------------------------
# Every UserError case names what is wrong
# ----------------------------------------------------------------------------------------------


def test_error_missing_dir(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", tmp_path / "nope")
    msg = _err(e)
    assert str(tmp_path / "nope") in msg and "does not exist" in msg and "train/<class>" in msg


def test_error_no_train_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", tmp_path / "empty")
    msg = _err(e)
    assert str(tmp_path / "empty") in msg and "no train/ folder" in msg


def test_error_no_test_folder(tmp_path):
    _write(tmp_path / "d" / "train" / "a" / "0.png", _image(0))
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", tmp_path / "d")
    assert "no test/ folder" in _err(e) and str(tmp_path / "d") in str(e.value)


def test_error_empty_class_folder(tree):
    root, _ = tree
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "readme.txt").write_text("not an image")
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    msg = _err(e)
    assert str(root / "train" / "dog") in msg and "no images" in msg


@pytest.mark.parametrize("payload", [b"garbage bytes, not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 64])
def test_error_corrupt_image(tree, payload):
    root, _ = tree
    bad = root / "train" / "bee" / "01.png"
    bad.unlink()
    bad = bad.with_suffix(".jpg")
    bad.write_bytes(payload)
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    msg = _err(e)
    assert str(bad) in msg and "cannot decode" in msg


def test_error_mixed_sizes(tree):
    root, _ = tree
    odd = root / "train" / "bee" / "01.png"
    _write(odd, _image(5, size=(10, 6)))
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    msg = _err(e)
    assert str(odd) in msg and "10x6" in msg and "8x8" in msg and "ant" in msg


def test_error_test_size_differs_from_train(tmp_path):
    root = tmp_path / "d"
    for cls in ("a", "b"):
        _write(root / "train" / cls / "0.png", _image(1, (8, 8)))
        _write(root / "test" / cls / "0.png", _image(2, (9, 9)))
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    msg = _err(e)
    assert str(root / "test" / "a" / "0.png") in msg and "9x9" in msg and "8x8" in msg


def test_error_non_square(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "test"):
        _write(root / split / "a" / "0.png", _image(1, (8, 6)))
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    assert "square" in _err(e) and "8x6" in str(e.value)


def test_error_class_mismatch(tree):
    root, _ = tree
    _write(root / "test" / "zebra" / "0.png", _image(0))
    (root / "test" / "cat").rename(root / "test" / ".hidden_cat")
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root)
    msg = _err(e)
    assert str(root / "test") in msg and "cat" in msg and "zebra" in msg


def test_error_subset_too_large(tree):
    root, _ = tree
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root, train_subset=10)
    msg = _err(e)
    assert "--train-subset" in msg and "10" in msg and "(9 images)" in msg
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", root, test_subset=7)
    assert "--test-subset" in _err(e) and "(6 images)" in str(e.value)
    with pytest.raises(UserError, match="--train-subset must be a positive integer"):
        load_dataset("imagefolder", root, train_subset=0)


def test_error_unknown_dataset_and_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where an archive data dir unpacks
    with pytest.raises(UserError) as e:
        load_dataset("imagenet", tmp_path)
    assert "imagenet" in _err(e) and "cifar10" in str(e.value)
    with pytest.raises(UserError) as e:
        extract_archive_if_needed(tmp_path / "missing.tar.gz", tmp_path / "out")
    assert str(tmp_path / "missing.tar.gz") in _err(e)
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_dataset("imagefolder", archive)
    assert "cannot read archive" in _err(e) and str(archive) in str(e.value)


# ----------------------------------------------------------------------------------------------
# torchvision data sets (faked: no network here)
# ----------------------------------------------------------------------------------------------


class _FakeCIFAR10:
    calls = 0

    def __init__(self, root, train=True, download=False):
        type(self).calls += 1
        n = 20 if train else 10
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)  # NHWC like torchvision
        self.targets = [i % 10 for i in range(n)]
        self.classes = list(CIFAR_CLASSES)


class _FakeSVHN:
    def __init__(self, root, split="train", download=False):
        n = 12 if split == "train" else 6
        self.data = np.random.default_rng(2).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)  # NCHW
        self.labels = np.arange(n, dtype=np.int64) % 10


def test_torchvision_arrays_converted_and_cached(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "CIFAR10", _FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x")
    _FakeCIFAR10.calls = 0
    data = load_dataset("cifar10", tmp_path, train_subset=10)
    assert data.spec == RECIPES["cifar10"] and data.class_names == CIFAR_CLASSES
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
    full = _FakeCIFAR10(tmp_path, train=False)
    assert torch.equal(data.test_x, torch.from_numpy(full.data).permute(0, 3, 1, 2))
    calls = _FakeCIFAR10.calls
    again = load_dataset("cifar10", tmp_path)
    assert _FakeCIFAR10.calls == calls and again.meta["train_source"] == "cache"

    monkeypatch.setattr(tvd, "SVHN", _FakeSVHN)
    svhn = load_dataset("svhn", tmp_path / "svhn", cache_dir=tmp_path / "c")
    assert svhn.spec.flip is False and svhn.train_x.shape == (12, 3, 32, 32)
    assert torch.equal(svhn.train_x, torch.from_numpy(_FakeSVHN(None).data))


def test_torchvision_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", tmp_path / "c10", download=True)
    msg = _err(e)
    assert "CIFAR-10 not found in" in msg and "download failed" in msg and str(tmp_path / "c10") in msg
    monkeypatch.setattr(tvd, "STL10", offline)
    with pytest.raises(UserError) as e:
        load_dataset("stl10", tmp_path, download=False)
    assert "STL-10" in _err(e) and "stl10_binary" in str(e.value)


def test_real_torchvision_missing_without_download(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = _err(e)
    assert "CIFAR-10 not found" in msg and "imagefolder" in msg


# ----------------------------------------------------------------------------------------------
# Subsets and synthetic data
# ----------------------------------------------------------------------------------------------


def test_subset_balanced_seeded_and_sorted():
    data = load_dataset("synthetic", None, synthetic_train=1000, synthetic_test=300)
    sub = load_dataset("synthetic", None, synthetic_train=1000, synthetic_test=300, train_subset=95, test_subset=30)
    counts = torch.bincount(sub.train_y, minlength=10)
    assert sub.num_train == 95 and int(counts.max() - counts.min()) <= 1
    assert torch.bincount(sub.test_y, minlength=10).tolist() == [3] * 10
    same = load_dataset("synthetic", None, synthetic_train=1000, train_subset=95)
    other = load_dataset("synthetic", None, synthetic_train=1000, train_subset=95, subset_seed=1)
    assert torch.equal(same.train_x, sub.train_x)
    assert not torch.equal(other.train_x, sub.train_x)
    # Rows are real rows of the full split, kept in data set order.
    full = {bytes(r.numpy()): i for i, r in enumerate(data.train_x.flatten(1))}
    idx = [full[bytes(r.numpy())] for r in sub.train_x.flatten(1)]
    assert idx == sorted(idx) and torch.equal(data.train_y[idx], sub.train_y)


def test_synthetic_deterministic_and_learnable():
    a = load_dataset("synthetic", None, synthetic_train=600, synthetic_test=200, image_size=16)
    b = load_dataset("synthetic", None, synthetic_train=600, synthetic_test=200, image_size=16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (600, 3, 16, 16) and a.spec.num_classes == 10 and a.spec.image_size == 16
    assert torch.bincount(a.train_y).tolist() == [60] * 10 and len(a.class_names) == 10
    assert not torch.equal(a.train_x[:200], a.test_x)
    # A nearest-class-mean classifier does clearly better than chance, but not perfectly.
    feats = lambda x: x.float().flatten(1)  # noqa: E731
    means = torch.stack([feats(a.train_x)[a.train_y == c].mean(0) for c in range(10)])
    pred = torch.cdist(feats(a.test_x), means).argmin(1)
    acc = float((pred == a.test_y).float().mean())
    assert 0.3 < acc
    assert load_dataset("synthetic", None).train_x.shape == (512, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# Archives and the real offline CIFAR-10 copy
# ----------------------------------------------------------------------------------------------


def test_extract_archive_if_needed(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_tree(src / "tiny", classes=("a", "b"), n_train=1, n_test=1)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "tiny", arcname="tiny")
    out = extract_archive_if_needed(archive, tmp_path / "cache")
    assert out == tmp_path / "cache" / "tiny" and (out / "train" / "a" / "00.png").is_file()
    # nothing but the tree and the extraction's own record and lock (dot files)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        ".tiny.tar.gz.extracted.json", ".tiny.tar.gz.lock", "tiny"]
    # Second call: already there, nothing is extracted.
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("extracted twice"))
    assert extract_archive_if_needed(archive, tmp_path / "cache") == out
    assert load_dataset("imagefolder", tmp_path / "cache").num_train == 2


def _offline_archive() -> Path | None:
    for base in (Path("/work/shared/data"), REPO.parent / "shared" / "data"):
        if (base / "cifar10-jpeg.tar.gz").is_file():
            return base / "cifar10-jpeg.tar.gz"
    return None


def test_real_offline_cifar10_subset():
    archive = _offline_archive()
    if archive is None:
        pytest.skip("offline CIFAR-10 copy not found in /work/shared/data or ../shared/data")
    root = extract_archive_if_needed(archive, REPO / ".cache")
    data = load_dataset("imagefolder", root, train_subset=1000, test_subset=500)
    assert data.class_names == CIFAR_CLASSES
    assert data.spec.num_classes == 10 and data.spec.image_size == 32
    assert data.spec.mean == RECIPES["cifar10"].mean and data.spec.pad_mode == "reflect"
    assert data.train_x.shape == (1000, 3, 32, 32) and data.test_x.shape == (500, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [100] * 10
    assert torch.bincount(data.test_y).tolist() == [50] * 10


# ----------------------------------------------------------------------------------------------
# GPU: same results on the device, and capturable into a CUDA graph
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_matches_cpu_and_captures():
    spec = RECIPES["cifar10"]
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    cpu = BatchAugmenter(spec, "cpu")
    gpu = BatchAugmenter(spec, "cuda")
    dy, dx, fl = cpu.sample_params(64, make_generator(0))
    xc = x.cuda()
    assert torch.equal(gpu.apply(xc, dy.cuda(), dx.cuda(), fl.cuda()).cpu(), cpu.apply(x, dy, dx, fl))
    gen = make_generator(0, "cuda")
    static_x = xc.clone()
    # Warm up (allocates the ramps and normalisation constants) on a side stream, then capture.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            normalize(gpu(static_x, gen), spec)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        static_out = normalize(gpu(static_x, gen), spec, dtype=torch.bfloat16, channels_last=True)
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert static_out.shape == (64, 3, 32, 32) and not torch.equal(first, static_out)
