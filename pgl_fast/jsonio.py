"""The engine's files on disk: atomic whole-file writes, JSON, and append-only JSON Lines.

Every file a reader may open while a run is being killed (``config.json``, ``header.json``,
``summary.json``, a grid's ``grid.json``, a report, a checkpoint) is written whole or not at all:
its content goes to ``<path>.tmp``, is flushed and fsynced, and is then renamed over ``<path>``,
which POSIX makes atomic. A reader therefore sees the old file or the new one, never half of one.
A kill may leave the ``.tmp`` file behind; it is never read under the final name, and the next
write replaces it.

JSON Lines files (``metrics.jsonl``, the GPU check's results) are appended to one record at a time,
each flushed and fsynced, so a kill loses at most the line being written; the reader stops at a
torn last line and keeps everything before it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, IO, Iterable


def tmp_path(path: str) -> str:
    """Where :func:`atomic_write` stages ``path`` (the run-directory cleanup removes these too)."""
    return path + ".tmp"


def _fsync_dir(folder: str) -> None:
    try:  # makes the rename itself durable; some file systems cannot open a folder for this
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = False, sync_dir: bool = False) -> None:
    """Call ``write(f)`` on a fresh ``<path>.tmp``, fsync it and rename it over ``path``.

    ``binary`` opens the file in bytes mode (``torch.save``); ``sync_dir`` also fsyncs the folder
    after the rename, for files whose loss after a power cut would cost work (checkpoints). When
    ``write`` raises, the temporary file is removed and the exception propagates; ``path`` is
    untouched."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_json_atomic(path: str, obj: Any, *, default: Callable | None = None) -> None:
    """``obj`` as indented JSON with sorted keys (diffable, stable across runs), written atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=default))


def read_json(path: str, default=None):
    """The JSON in path, or default when it is missing or unreadable (e.g. a run that never got that far)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _line(record: dict, default: Callable | None) -> str:
    return json.dumps(record, sort_keys=True, default=default) + "\n"


def write_jsonl_atomic(path: str, records: Iterable[dict], *, default: Callable | None = None) -> None:
    """Replace a JSON Lines file as a whole (one record per line), atomically."""
    atomic_write(path, lambda f: f.writelines(_line(r, default) for r in records))


class JsonlWriter:
    """Appends one JSON object per line, flushed and fsynced so a kill never leaves half a line.

    ``default`` is passed to ``json.dumps`` for values JSON has no type for (``str`` turns a
    ``torch.dtype`` or a path into text instead of failing the write)."""

    def __init__(self, path: str, *, default: Callable | None = None):
        self.path = path
        self.default = default

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(_line(record, self.default))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return read_jsonl(self.path)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON Lines file ([] when it does not exist), up to a torn last line."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: everything before it is good
    return out
