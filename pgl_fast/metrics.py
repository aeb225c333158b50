"""Run header, per-epoch JSONL metrics, and per-phase peak memory.

Peak memory: on CUDA ``max_memory_allocated``/``max_memory_reserved``, reset at the start of each
epoch. On the CPU the process's peak resident set (``VmHWM``), reset per epoch through
``/proc/self/clear_refs`` where Linux allows it; the tensor-level breakdown comes from
``pgl_fast.profile``.

Under CUDA graphs the allocator's counters miss what a replay holds (a replay never allocates: its
activations sit in the graph pool, allocated only while the capture ran), so an epoch that replayed
graphs reports the larger of the counter and the graphs' capture peaks, and says so in ``kind``
(``cuda_allocated+graph_capture_peak``); the pool's reserved bytes are reported on their own.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    def __init__(self, device: torch.device, graphs=None):
        self.device = device
        self.graphs = graphs  # a graphs.GraphedLocalSteps whose replays this window may contain

    def reset(self) -> None:
        if self.graphs is not None:
            self.graphs.begin_epoch()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

    def read(self) -> dict:
        if self.device.type == "cuda":
            out = {
                "kind": "cuda_allocated",
                "peak_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2**20,
                "graph_pool_mib": None,
            }
            g = self.graphs.memory_reading() if self.graphs is not None else None
            if g is not None:
                out["kind"] = "cuda_allocated+graph_capture_peak"
                out["peak_mib"] = max(out["peak_mib"] * 2**20, g["capture_peak_bytes"], g["outside_peak_bytes"]) / 2**20
                out["peak_reserved_mib"] = max(out["peak_reserved_mib"] * 2**20, g["capture_reserved_bytes"],
                                               g["outside_reserved_bytes"]) / 2**20
                out["graph_pool_mib"] = g["pool_reserved_bytes"] / 2**20
            return out
        hwm = _proc_status_kib("VmHWM")
        return {"kind": "cpu_rss", "peak_mib": None if hwm is None else hwm / 1024, "peak_reserved_mib": None,
                "graph_pool_mib": None}


def git_sha() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def run_header(config: dict, device: torch.device) -> dict:
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:  # triton is optional on the CPU
        triton_version = None
    import torchvision

    from . import __version__

    return {
        "event": "header",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pgl_fast": __version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "config": config,
    }


class JsonlWriter:
    """Appends one JSON object per line, flushed and fsynced so a kill never leaves half a line."""

    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a torn last line from a crash: everything before it is good
        return out


def read_json(path: str, default=None):
    """The JSON in path, or default when it is missing or unreadable (e.g. a run that never got that far)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
