"""Atomic whole-file writes and JSON Lines: what a reader sees while a writer is killed, a failed
write, a torn last line, and the exact bytes (the same as json.dumps with the settings the run
files have always used)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pgl_fast import jsonio
from pgl_fast.jsonio import (JsonlWriter, atomic_write, read_json, read_jsonl, write_json_atomic, write_jsonl_atomic,
                             write_text_atomic)


def test_json_bytes_and_no_temporary_file_left(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"z": "é", "y": True}}
    path = str(tmp_path / "x.json")
    write_json_atomic(path, obj)
    with open(path) as f:
        assert f.read() == json.dumps(obj, indent=2, sort_keys=True)
    assert read_json(path) == obj and os.listdir(tmp_path) == ["x.json"]
    write_text_atomic(str(tmp_path / "r.md"), "# t\n")
    assert (tmp_path / "r.md").read_text() == "# t\n"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "x.json")
    write_json_atomic(path, {"old": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"new": object()})  # not serialisable: fails half way through
    assert read_json(path) == {"old": 1} and not os.path.exists(jsonio.tmp_path(path))
    write_json_atomic(path, {"new": object()}, default=lambda o: "obj")
    assert read_json(path) == {"new": "obj"}


def test_read_json_default_for_missing_or_corrupt(tmp_path):
    assert read_json(str(tmp_path / "nope.json"), {"d": 1}) == {"d": 1}
    (tmp_path / "bad.json").write_text('{"a": ')
    assert read_json(str(tmp_path / "bad.json")) is None


def test_binary_write_and_dir_sync(tmp_path):
    path = str(tmp_path / "b.bin")
    atomic_write(path, lambda f: f.write(b"\x00\x01"), binary=True, sync_dir=True)
    assert open(path, "rb").read() == b"\x00\x01"


def test_a_reader_never_sees_half_a_file_while_the_writer_is_killed(tmp_path):
    # the writer rewrites a ~1 MB JSON file as fast as it can and is killed at a random point; every
    # read in between, and the file left behind, must be one complete version
    path = str(tmp_path / "big.json")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from pgl_fast.jsonio import write_json_atomic
        i = 0
        while True:
            write_json_atomic({path!r}, {{"i": i, "pad": ["x" * 1000] * 1000}})
            i += 1
    """)
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 10
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.01)
        seen = set()
        t_end = time.time() + 1.0
        while time.time() < t_end:
            with open(path) as f:
                d = json.load(f)  # raises on a half-written file
            assert len(d["pad"]) == 1000
            seen.add(d["i"])
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert len(seen) > 1, "the writer made no progress"
    assert len(read_json(path)["pad"]) == 1000


def test_jsonl_append_read_and_torn_last_line(tmp_path):
    path = str(tmp_path / "m.jsonl")
    w = JsonlWriter(path)
    assert w.read() == []
    w.write({"epoch": 1, "b": 2})
    w.write({"epoch": 2, "a": 1})
    with open(path) as f:
        assert f.read() == '{"b": 2, "epoch": 1}\n{"a": 1, "epoch": 2}\n'
    with open(path, "a") as f:
        f.write('{"epoch": 3, "te')  # a kill in the middle of a line
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2]
    with pytest.raises(TypeError):
        w.write({"dtype": object()})
    JsonlWriter(path, default=lambda o: "obj").write({"x": object()})


def test_jsonl_rewrite_is_the_lines_json_dumps_gives(tmp_path):
    records = [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.25, "phase": "global"}]
    path = str(tmp_path / "m.jsonl")
    with open(path, "w") as f:
        f.write("stale\n" * 5)
    write_jsonl_atomic(path, records)
    with open(path) as f:
        assert f.read() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    assert read_jsonl(path) == records and os.listdir(tmp_path) == ["m.jsonl"]
