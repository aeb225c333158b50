"""SVHN and STL-10 from files in each data set's own on-disk format, through the real torchvision
loaders (no download, no fake dataset classes).

The files are tiny (40 train / 20 test images) but laid out exactly as the published releases:

- SVHN: ``{train,test,extra}_32x32.mat`` (MATLAB v5), ``X`` uint8 of shape (32, 32, 3, N), i.e.
  (height, width, channel, image), and ``y`` of shape (N, 1) with labels 1..10 where 10 is the
  digit 0.
- STL-10: ``stl10_binary/{train,test,unlabeled}_X.bin``: raw uint8, image after image, channel
  after channel (R, G, B), each channel stored column-major, so byte ``(c * 96 + w) * 96 + h`` of
  an image is its pixel at row h, column w of channel c; ``{train,test}_y.bin``: one uint8 label
  1..10 per image; ``class_names.txt`` and ``fold_indices.txt`` as text.

torchvision verifies every file against the md5 of the official release. The product path keeps
that check (the official files pass it); to load the tiny files the tests point torchvision's
expected digests at the files they wrote, so torchvision's own presence and checksum checks still
run. Without that, the files must be rejected with a one-line error naming them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from pgl_fast.data import batches
from pgl_fast.data import BatchAugmenter, load_dataset
from pgl_fast.errors import UserError
from pgl_fast.train import main

N_TRAIN, N_TEST = 40, 20
SVHN_EXTRA = 7
STL_UNLABELED = 3
STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Random uint8 images [n, 3, size, size] (image, channel, row, column): the reference layout."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def _classes(n: int, seed: int) -> np.ndarray:
    """0..9 in a shuffled order, every class present (n >= 10)."""
    return np.random.default_rng(seed).permutation(np.arange(n) % 10)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _one_line(excinfo, tmp_path: Path) -> str:
    """The error message, checked to be one line, with the temporary folder (whose name is the
    test's) replaced by ``<tmp>`` so that words in it cannot satisfy an assertion."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg.replace(str(tmp_path), "<tmp>")


# ----------------------------------------------------------------------------------------------
# Writers for the two on-disk formats
# ----------------------------------------------------------------------------------------------


def _scipy_io():
    # torchvision reads SVHN's .mat files with scipy, an optional dependency of both.
    return pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy (pip install scipy)")


def write_svhn(root: Path, seed: int = 0) -> dict:
    """``root/{train,test,extra}_32x32.mat``; returns {split: (images NCHW, digits 0..9, X as saved)}."""
    sio = _scipy_io()
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, (split, n) in enumerate((("train", N_TRAIN), ("test", N_TEST), ("extra", SVHN_EXTRA))):
        img = _images(n, 32, seed + k)
        digits = _classes(max(n, 10), seed + 10 + k)[:n]
        x = np.ascontiguousarray(img.transpose(2, 3, 1, 0))  # (H, W, C, N) like the release
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        sio.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (img, digits, x)
    return out


def _stl_bytes(img: np.ndarray) -> bytes:
    # Per image and channel, column-major: the row index varies fastest.
    return np.ascontiguousarray(img.transpose(0, 1, 3, 2)).tobytes()


def write_stl10(root: Path, seed: int = 0) -> dict:
    """``root/stl10_binary/*``; returns {split: (images NCHW, labels 0..9)}."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, (split, n) in enumerate((("train", N_TRAIN), ("test", N_TEST))):
        img = _images(n, 96, seed + k)
        labels = _classes(n, seed + 10 + k)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(img))
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        out[split] = (img, labels)
    unlabeled = _images(STL_UNLABELED, 96, seed + 5)
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(unlabeled))
    out["unlabeled"] = (unlabeled, None)
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    # Ten folds of four training indices each, as the release's (1,000 indices a line) but tiny.
    folds = np.random.default_rng(seed + 7).permutation(N_TRAIN).reshape(10, 4)
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(map(str, f)) for f in folds) + "\n")
    return out


def trust_svhn(monkeypatch, root: Path) -> None:
    """Make torchvision expect the md5 of the SVHN files in ``root`` instead of the release's."""
    for split, (url, filename, _md5_release) in list(tvd.SVHN.split_list.items()):
        if (root / filename).exists():
            monkeypatch.setitem(tvd.SVHN.split_list, split, [url, filename, _md5(root / filename)])


def trust_stl10(monkeypatch, root: Path) -> None:
    """Make torchvision expect the md5 of the STL-10 files in ``root/stl10_binary``."""
    folder = root / tvd.STL10.base_folder
    for attr in ("train_list", "test_list"):
        entries = [[f, _md5(folder / f) if (folder / f).exists() else md5] for f, md5 in getattr(tvd.STL10, attr)]
        monkeypatch.setattr(tvd.STL10, attr, entries)


@pytest.fixture
def svhn(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    written = write_svhn(root)
    trust_svhn(monkeypatch, root)
    return root, written


@pytest.fixture
def stl10(tmp_path, monkeypatch):
    root = tmp_path / "stl10"
    written = write_stl10(root)
    trust_stl10(monkeypatch, root)
    return root, written


# ----------------------------------------------------------------------------------------------
# Loading: layout, labels, recipe
# ----------------------------------------------------------------------------------------------


def test_svhn_mat_files_load_with_pixel_layout_labels_and_recipe(svhn):
    root, written = svhn
    data = load_dataset("svhn", root, download=False)
    assert data.train_x.shape == (N_TRAIN, 3, 32, 32) and data.test_x.shape == (N_TEST, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        img, digits, saved = written[split]
        assert torch.equal(x, torch.from_numpy(img)), split
        # Pixel (c, h, w) of image i is X[h, w, c, i] of the .mat file, read back independently.
        mat = _scipy_io().loadmat(root / f"{split}_32x32.mat")
        assert np.array_equal(mat["X"], saved)
        for i, c, h, w in ((0, 0, 0, 1), (3, 2, 31, 0), (N_TEST - 1, 1, 5, 27)):
            assert int(x[i, c, h, w]) == int(mat["X"][h, w, c, i])
        # Label 10 in the file is the digit 0; 1..9 are themselves.
        stored = mat["y"].reshape(-1).astype(np.int64)
        assert (stored == 10).any() and set(stored.tolist()) == set(range(1, 11))
        assert y.tolist() == [0 if s == 10 else int(s) for s in stored]
        assert torch.equal(y, torch.from_numpy(digits.astype(np.int64)))
    # The extra split is never mixed into training.
    assert data.num_train == N_TRAIN
    assert data.class_names == tuple(str(d) for d in range(10))
    spec = data.spec
    assert (spec.name, spec.num_classes, spec.image_size) == ("svhn", 10, 32)
    assert (spec.pad, spec.pad_mode, spec.flip) == (2, "zeros", False)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)


def test_stl10_binary_files_load_with_pixel_layout_labels_and_recipe(stl10):
    root, written = stl10
    data = load_dataset("stl10", root, download=False)
    assert data.train_x.shape == (N_TRAIN, 3, 96, 96) and data.test_x.shape == (N_TEST, 3, 96, 96)
    per_image = 3 * 96 * 96
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        img, labels = written[split]
        assert torch.equal(x, torch.from_numpy(img)), split
        # Byte offsets of the column-major layout, computed from the raw file.
        raw = np.fromfile(root / "stl10_binary" / f"{split}_X.bin", dtype=np.uint8)
        assert raw.size == x.shape[0] * per_image
        for i, c, h, w in ((0, 0, 0, 1), (2, 1, 95, 0), (N_TEST - 1, 2, 17, 60)):
            assert int(x[i, c, h, w]) == int(raw[i * per_image + (c * 96 + w) * 96 + h])
        raw_y = np.fromfile(root / "stl10_binary" / f"{split}_y.bin", dtype=np.uint8)
        assert sorted(set(raw_y.tolist())) == list(range(1, 11))
        assert y.tolist() == [int(v) - 1 for v in raw_y]
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    # All 40 labelled training images: neither the unlabeled split nor a fold subset.
    assert data.num_train == N_TRAIN
    assert data.class_names == STL_CLASSES
    spec = data.spec
    assert (spec.name, spec.num_classes, spec.image_size) == ("stl10", 10, 96)
    assert (spec.pad, spec.pad_mode, spec.flip) == (4, "zeros", True)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)


def test_subsets_of_the_files_keep_image_label_pairs(svhn):
    root, written = svhn
    data = load_dataset("svhn", root, download=False, train_subset=20, test_subset=10)
    img, digits, _ = written["train"]
    assert data.num_train == 20 and data.num_test == 10
    assert torch.bincount(data.train_y, minlength=10).tolist() == [2] * 10
    # Every kept image is one of the written ones, with its own label.
    for x, y in zip(data.train_x, data.train_y):
        matches = [i for i in range(N_TRAIN) if np.array_equal(img[i], x.numpy())]
        assert len(matches) == 1 and digits[matches[0]] == int(y)


# ----------------------------------------------------------------------------------------------
# Decoded-tensor cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["svhn", "stl10"])
def test_cache_hit_and_rebuild_when_files_change(name, tmp_path, monkeypatch):
    root = tmp_path / name
    write, trust = (write_svhn, trust_svhn) if name == "svhn" else (write_stl10, trust_stl10)
    write(root, seed=0)
    trust(monkeypatch, root)
    first = load_dataset(name, root, download=False)
    assert first.meta["train_source"] == "decoded" and first.meta["test_source"] == "decoded"
    cache_files = sorted(p.name for p in (root / ".pgl_cache").iterdir())
    assert cache_files == sorted(Path(first.meta[f"{s}_cache"]).name for s in ("train", "test"))

    # A hit does not call torchvision at all.
    def boom(*args, **kwargs):
        raise AssertionError("torchvision read the files despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(tvd, "SVHN" if name == "svhn" else "STL10", boom)
        again = load_dataset(name, root, download=False)
    assert again.meta["train_source"] == "cache" and again.meta["test_source"] == "cache"
    for attr in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, attr), getattr(first, attr)), attr
    assert again.class_names == first.class_names

    # New files (other content) invalidate the cache: the new pixels are decoded.
    new = write(root, seed=100)
    trust(monkeypatch, root)
    fresh = load_dataset(name, root, download=False)
    assert fresh.meta["train_source"] == "decoded"
    assert torch.equal(fresh.train_x, torch.from_numpy(new["train"][0]))
    assert not torch.equal(fresh.train_x, first.train_x)


@pytest.mark.parametrize("name", ["svhn", "stl10"])
def test_cache_dir_flag(name, tmp_path, monkeypatch):
    root, cdir = tmp_path / name, tmp_path / "elsewhere"
    write, trust = (write_svhn, trust_svhn) if name == "svhn" else (write_stl10, trust_stl10)
    written = write(root)
    trust(monkeypatch, root)
    first = load_dataset(name, root, download=False, cache_dir=cdir)
    assert not (root / ".pgl_cache").exists()
    assert {Path(first.meta[f"{s}_cache"]).parent for s in ("train", "test")} == {cdir}
    again = load_dataset(name, root, download=False, cache_dir=cdir)
    assert again.meta["train_source"] == "cache"
    assert torch.equal(again.test_x, torch.from_numpy(written["test"][0]))


# ----------------------------------------------------------------------------------------------
# Files that are not the official release, or incomplete
# ----------------------------------------------------------------------------------------------


def test_svhn_files_failing_the_md5_check_are_named(tmp_path):
    root = tmp_path / "svhn"
    write_svhn(root)
    with pytest.raises(UserError) as e:
        load_dataset("svhn", root, download=False)
    msg = _one_line(e, tmp_path)
    # The files are there: the error says they fail the checksum, not that they are missing.
    assert "md5" in msg and "<tmp>/svhn/train_32x32.mat" in msg and "not found" not in msg


def test_svhn_unofficial_files_when_the_download_fails(tmp_path, monkeypatch):
    # With downloading on, torchvision re-fetches a file that fails its md5; here that fails.
    import urllib.error

    import torchvision.datasets.svhn as tv_svhn

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_svhn, "download_url", offline)
    root = tmp_path / "svhn"
    write_svhn(root)
    with pytest.raises(UserError) as e:
        load_dataset("svhn", root, download=True)
    msg = _one_line(e, tmp_path)
    assert "md5" in msg and "<tmp>/svhn/train_32x32.mat" in msg and "downloading the official files failed" in msg


def test_svhn_missing_test_file_is_named(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    write_svhn(root)
    trust_svhn(monkeypatch, root)
    (root / "test_32x32.mat").unlink()
    with pytest.raises(UserError) as e:
        load_dataset("svhn", root, download=False)
    msg = _one_line(e, tmp_path)
    assert "missing" in msg and "<tmp>/svhn/test_32x32.mat" in msg and "download" in msg


def test_stl10_files_failing_the_md5_check_are_named(tmp_path):
    root = tmp_path / "stl10"
    write_stl10(root)
    with pytest.raises(UserError) as e:
        load_dataset("stl10", root, download=False)
    msg = _one_line(e, tmp_path)
    assert "md5" in msg and "<tmp>/stl10/stl10_binary/train_X.bin" in msg and "not found" not in msg


def test_stl10_needs_the_unlabeled_file(tmp_path, monkeypatch):
    # torchvision checks unlabeled_X.bin even for the train and test splits.
    root = tmp_path / "stl10"
    write_stl10(root)
    trust_stl10(monkeypatch, root)
    (root / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(UserError) as e:
        load_dataset("stl10", root, download=False)
    msg = _one_line(e, tmp_path)
    assert "missing" in msg and "<tmp>/stl10/stl10_binary/unlabeled_X.bin" in msg
    for present in ("train_X.bin", "test_y.bin"):
        assert present not in msg


def test_cifar10_incomplete_folder_names_the_missing_batches(tmp_path):
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in ("data_batch_1", "data_batch_2", "batches.meta"):
        (folder / f).write_bytes(b"x")
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", tmp_path / "c10", download=False)
    msg = _one_line(e, tmp_path)
    assert "missing" in msg and "imagefolder" in msg
    named = {f for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                         "test_batch", "batches.meta") if f"<tmp>/c10/cifar-10-batches-py/{f}" in msg}
    assert named == {"data_batch_3", "data_batch_4", "data_batch_5", "test_batch"}


def test_svhn_without_scipy_is_one_line(tmp_path, monkeypatch):
    root = tmp_path / "svhn"
    root.mkdir()
    for split in ("train", "test"):
        (root / f"{split}_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file")  # never parsed
    trust_svhn(monkeypatch, root)
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy.io` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(UserError) as e:
        load_dataset("svhn", root, download=False)
    msg = _one_line(e, tmp_path)
    assert "scipy" in msg and "pip install" in msg and "<tmp>/svhn/train_32x32.mat" in msg


def test_cli_rejects_unofficial_files_with_one_line(tmp_path, capsys):
    root = tmp_path / "svhn"
    write_svhn(root)
    rc = main(["--dataset", "svhn", "--no-download", "--data-dir", str(root), "--arch", "resnet8", "-J", "2",
               "--method", "dgl", "--epochs", "1", "-b", "16", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().replace(str(tmp_path), "<tmp>")
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: ")
    assert "md5" in err and "<tmp>/svhn/train_32x32.mat" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# The CLI trains on them
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["svhn", "stl10"])
def test_cli_trains_one_epoch_on_the_files(name, tmp_path, monkeypatch, capsys):
    root = tmp_path / name
    if name == "svhn":
        write_svhn(root)
        trust_svhn(monkeypatch, root)
        extra = ["-b", "16", "--lr", "0.05"]  # 3 steps
    else:
        write_stl10(root)
        trust_stl10(monkeypatch, root)
        extra = []  # STL-10's defaults, batch 128 and lr 0.1: one step of all 40 images
    specs = []

    class SpyAugmenter(BatchAugmenter):
        def __init__(self, spec, device="cpu"):
            specs.append(spec)
            super().__init__(spec, device)

    monkeypatch.setattr(batches, "BatchAugmenter", SpyAugmenter)  # the trainer's batches build it
    out = tmp_path / "run"
    rc = main(["--dataset", name, "--no-download", "--data-dir", str(root), "--arch", "resnet8", "-J", "2",
               "--method", "dgl", "--epochs", "1", "--seed", "0", "--progress", "off", "-o", str(out)] + extra)
    printed = capsys.readouterr().out
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(1, "local")]
    assert all(np.isfinite(loss) for loss in rows[0]["module_losses"])
    assert 0.0 <= rows[0]["test_acc"] <= 1.0
    header = json.loads((out / "header.json").read_text())
    assert (header["train_images"], header["test_images"]) == (N_TRAIN, N_TEST)
    cfg = json.loads((out / "config.json").read_text())
    size = 32 if name == "svhn" else 96
    assert f"input {size}x{size}" in printed
    if name == "svhn":
        assert (cfg["batch_size"], cfg["lr"]) == (16, 0.05)
        assert [(s.pad, s.pad_mode, s.flip) for s in specs] == [(2, "zeros", False)]
    else:
        assert (cfg["batch_size"], cfg["lr"]) == (128, 0.1)
        assert [(s.pad, s.pad_mode, s.flip, s.image_size) for s in specs] == [(4, "zeros", True, 96)]
