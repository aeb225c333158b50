"""Freed host memory goes back to the system (glibc): measured on the process's own resident set
(``/proc/self/status``) in fresh subprocesses, and the planner's prediction beside the measured
peak of every phase in ``summary.json``."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pgl_fast.memory import planner
from pgl_fast.train import main

from pgl_fast.memory import host as host_memory

from helpers import tiny_cli_args

HOST_MEMORY = host_memory.__file__
glibc = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="glibc's allocator on Linux")

# One 16 MiB block allocated and freed, then 40 blocks of 8 MiB, each followed by a small block
# allocated after it (which keeps the heap from shrinking at its top on its own), all written to,
# then the big ones freed: what the resident set keeps of the 320 MiB is printed, in MiB.
PATTERN = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import importlib.util
    spec = importlib.util.spec_from_file_location("host_memory", sys.argv[2])  # without torch: fast
    hm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hm)
    if sys.argv[1] == "retain":
        assert hm.retain_less_memory()
    first = libc.malloc(16 << 20)  # mapped on its own; freeing it raises glibc's threshold to 16 MiB
    libc.free(first)
    before = rss()
    big, pins = [], []
    for _ in range(40):
        p = libc.malloc(8 << 20)
        ctypes.memset(p, 1, 8 << 20)
        big.append(p)
        pins.append(libc.malloc(256 << 10))  # too big for a free hole: carved from the heap's top, after it
    for p in big:
        libc.free(p)
    kept = rss() - before
    if sys.argv[1] == "trim":
        assert hm.release_freed_memory()
    print(kept, rss() - before)
""")


def _run_pattern(mode: str) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", PATTERN, mode, HOST_MEMORY], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout.split()
    return float(out[0]), float(out[1])


@glibc
def test_freed_blocks_stay_resident_without_help():
    """The control: glibc's default keeps most of the freed 320 MiB (its mmap threshold rose to
    16 MiB when the first block was freed, so the 8 MiB blocks come from the heap)."""
    kept, _ = _run_pattern("plain")
    assert kept > 200, kept


@glibc
def test_retain_less_memory_returns_large_blocks_on_free():
    kept, _ = _run_pattern("retain")
    assert kept < 40, kept


@glibc
def test_release_freed_memory_trims_the_heap():
    kept, after = _run_pattern("trim")
    assert kept > 200 and after < 40, (kept, after)


ARGS = tiny_cli_args() + ["--no-head-eval", "--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2"]


@glibc
def test_huge_pages_asked_only_before_torch():
    """Imported before torch, pgl_fast asks torch's allocator for huge pages (so the trainer may fix
    the mmap threshold without paying page faults); imported after it -- as in this test process,
    whose conftest imports torch first -- it cannot, and says so."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    code = ("import os, pgl_fast, torch; from pgl_fast.memory.host import huge_pages_for_torch; "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), huge_pages_for_torch())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         timeout=120).stdout.split()
    thp_possible = os.path.exists(host_memory.THP_SETTING) and "[never]" not in open(host_memory.THP_SETTING).read()
    assert out == ["1", str(thp_possible)]
    assert host_memory.huge_pages_for_torch() is False


@pytest.mark.usefixtures("one_thread")
def test_summary_sets_prediction_beside_measured_peak(tmp_path):
    assert main(ARGS + ["-o", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    header = json.loads((tmp_path / "run" / "header.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mem = summary["memory"]
    assert mem["kind"] == "cpu_rss" and set(mem["phases"]) == {"local", "global"}
    # the prediction is the planner's for this configuration, under the checkpointing the run used
    want = planner.predict(method="pgl", arch="resnet8", J=4, aux="1c2f", batch=16, split="layerwise",
                           candidates=(header["global_memory"],))
    assert mem["phases"]["local"]["predicted_mib"] == pytest.approx(want["local"] / 2**20)
    assert mem["phases"]["global"]["predicted_mib"] == pytest.approx(want["global"][header["global_memory"]] / 2**20)
    for r in records:
        got = mem["phases"][r["phase"]]
        assert got["measured_peak_mib"] == r["peak_mem_mib"]
        assert got["measured_above_setup_mib"] == pytest.approx(r["peak_mem_mib"] - mem["setup_rss_mib"])
    assert 0 < mem["setup_rss_mib"] <= min(r["peak_mem_mib"] for r in records)
    # this process imported torch before pgl_fast: trimmed, threshold left to glibc
    assert mem["allocator"] == {"trim_at_phase_switch": True, "mmap_threshold_mib": None}
