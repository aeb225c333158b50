"""The quick start's restart is quick: an archive is unpacked once, and a later call only checks it;
the install check says what is missing. Every expectation is written out by hand here (file
contents, which calls may happen), never read back from the code under test."""
import importlib.metadata
import os
import tarfile
from pathlib import Path

import pytest

import pgl_fast
from pgl_fast.data import sources as D
from pgl_fast.errors import UserError
from pgl_fast.tools import check_install

FILES = {"tiny/train/a/0.txt": b"alpha", "tiny/train/b/0.txt": b"beta!", "tiny/test/a/0.txt": b"gamma-gamma"}


def _archive(path: Path, files=FILES) -> Path:
    src = path.parent / (path.name + ".src")
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(body)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "tiny", arcname="tiny")
    return path


def _tree(root: Path) -> dict:
    """{relative path: bytes} of the files under ``root``, the extraction's own dot files left out."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_second_call_neither_extracts_nor_opens_the_archive(tmp_path, monkeypatch):
    archive = _archive(tmp_path / "tiny.tar.gz")
    out = D.extract_archive_if_needed(archive, tmp_path / "cache")
    assert out == tmp_path / "cache" / "tiny"
    assert _tree(tmp_path / "cache") == FILES
    monkeypatch.setattr(D.tarfile, "open", lambda *a, **k: pytest.fail("the archive was opened again"))
    assert D.extract_archive_if_needed(archive, tmp_path / "cache") == out


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_incomplete_copy_is_extracted_again(tmp_path, monkeypatch, damage):
    archive = _archive(tmp_path / "tiny.tar.gz")
    out = D.extract_archive_if_needed(archive, tmp_path / "cache")
    victim = out / "train" / "b" / "0.txt"
    if damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"be")
    (out / ".pgl_cache").mkdir()  # a decoded-tensor cache inside the tree: not the archive's, left alone
    (out / ".pgl_cache" / "x.pt").write_bytes(b"keep")
    calls = []
    real = tarfile.TarFile.extractall
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert D.extract_archive_if_needed(archive, tmp_path / "cache") == out
    assert calls == [1]
    assert victim.read_bytes() == b"beta!" and (out / ".pgl_cache" / "x.pt").read_bytes() == b"keep"


def test_interrupted_extraction_without_record_is_finished(tmp_path):
    """A run stopped mid-extraction leaves some files and no record: the next call completes it."""
    archive = _archive(tmp_path / "tiny.tar.gz")
    (tmp_path / "cache" / "tiny" / "train" / "a").mkdir(parents=True)
    (tmp_path / "cache" / "tiny" / "train" / "a" / "0.txt").write_bytes(b"alp")  # cut short
    D.extract_archive_if_needed(archive, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == FILES


def test_copy_unpacked_by_hand_is_adopted_without_extracting(tmp_path, monkeypatch):
    archive = _archive(tmp_path / "tiny.tar.gz")
    with tarfile.open(archive) as tar:  # what `tar -xzf` does
        tar.extractall(tmp_path / "cache", filter="data")
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("extracted a complete copy"))
    assert D.extract_archive_if_needed(archive, tmp_path / "cache") == tmp_path / "cache" / "tiny"
    assert (tmp_path / "cache" / ".tiny.tar.gz.extracted.json").is_file()


def test_a_replaced_archive_is_extracted_again(tmp_path):
    archive = _archive(tmp_path / "tiny.tar.gz")
    D.extract_archive_if_needed(archive, tmp_path / "cache")
    changed = {**FILES, "tiny/test/b/0.txt": b"new"}
    os.remove(archive)
    _archive(tmp_path / "tiny.tar.gz", changed)
    D.extract_archive_if_needed(archive, tmp_path / "cache")
    assert _tree(tmp_path / "cache") == changed


def test_corrupt_archive_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError) as e:
        D.extract_archive_if_needed(bad, tmp_path / "cache")
    assert "\n" not in str(e.value) and str(bad) in str(e.value) and "cannot read archive" in str(e.value)


def test_archive_as_data_dir_is_unpacked_once_into_the_user_cache(tmp_path, monkeypatch):
    """``--data-dir some.tar.gz``: the first load unpacks it under $XDG_CACHE_HOME/pgl_fast/archives and
    caches the decoded tensors beside the tree; the second opens neither the archive nor a JPEG."""
    from PIL import Image  # the only test here that writes images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = tmp_path / "src" / "pics"
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("cat", "dog"):
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4), (10 * i, 200, 30)).save(src / split / cls / f"{i}.png")
    archive = tmp_path / "pics.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="pics")
    first = D.load_dataset("imagefolder", archive)
    unpacked = list((tmp_path / "xdg" / "pgl_fast" / "archives").glob("pics-*/pics"))
    assert len(unpacked) == 1 and (unpacked[0] / "train" / "dog" / "1.png").is_file()
    assert list((unpacked[0] / ".pgl_cache").glob("imagefolder-train-*.pt"))
    monkeypatch.setattr(D.tarfile, "open", lambda *a, **k: pytest.fail("the archive was opened again"))
    monkeypatch.setattr(D, "_decode_files", lambda *a, **k: pytest.fail("decoded again"))
    second = D.load_dataset("imagefolder", archive)
    assert second.num_train == first.num_train == 4 and list(second.class_names) == ["cat", "dog"]
    assert (second.train_x == first.train_x).all()


def test_check_install_passes_here_and_names_what_is_missing(monkeypatch, capsys):
    assert check_install.main([]) == 0  # this machine has the engine installed with its test extras
    real = importlib.metadata.version

    def version(name):
        if name == "scipy":
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.0.1" if name == "pgl_fast" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert check_install.main([]) == 1
    assert capsys.readouterr().err == f"check_install: pgl_fast 0.0.1 is installed, this checkout is {pgl_fast.__version__}\n"
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda n: pgl_fast.__version__ if n == "pgl_fast" else version(n))
    assert check_install.main([]) == 1
    assert capsys.readouterr().err == "check_install: scipy is not installed (needed by pgl_fast[test])\n"
    assert check_install.main(["--extras", ""]) == 0  # scipy is needed by the test extra only
