"""Run-time measurement: the run header and per-phase peak memory.

Peak memory: on CUDA ``max_memory_allocated``/``max_memory_reserved``, reset at the start of each
epoch. On the CPU the process's peak resident set (``VmHWM``), reset per epoch through
``/proc/self/clear_refs`` where Linux allows it; the tensor-level breakdown comes from
``pgl_fast.memory.profile``.

Under CUDA graphs the allocator's counters miss what a replay holds (a replay never allocates: its
activations sit in the graph pool, allocated only while the capture ran), so an epoch that replayed
graphs reports the larger of the counter and the graphs' capture peaks, and says so in ``kind``
(``cuda_allocated+graph_capture_peak``); the pool's reserved bytes are reported on their own.

Freed host memory is returned to the system by ``host_memory`` (see there).
"""
from __future__ import annotations

import time

import torch

from ..versions import device_name, git_sha, versions


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """The process's resident set now (``VmRSS``), or None where /proc does not say."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


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


def memory_summary(predicted_mib: dict | None, peak_by_phase: dict, setup_rss_mib: float | None, kind: str) -> dict:
    """The planner's prediction next to what the run measured, per phase (``summary.json``).

    ``predicted_mib``: the planner's peak of tracked tensor bytes (parameters, gradients, optimizer
    state, activations); ``measured_peak_mib``: the phase's measured peak (``kind``: the resident
    set on the CPU, allocated bytes on CUDA). On the CPU the resident set also holds the
    interpreter, the libraries and the data set, which ``setup_rss_mib`` (the resident set once the
    set-up's freed memory is returned) measures: ``measured_above_setup_mib`` is what compares with
    the prediction there."""
    phases = {}
    for ph in sorted(set(peak_by_phase) | set(predicted_mib or {})):
        measured = peak_by_phase.get(ph)
        above = measured - setup_rss_mib if kind == "cpu_rss" and None not in (measured, setup_rss_mib) else None
        phases[ph] = {"predicted_mib": (predicted_mib or {}).get(ph), "measured_peak_mib": measured,
                      "measured_above_setup_mib": above}
    return {"kind": kind, "setup_rss_mib": setup_rss_mib if kind == "cpu_rss" else None, "phases": phases}


def run_header(config: dict, device: torch.device) -> dict:
    """The first record of a run (``header.json``): when, with which versions, on which device."""
    return {
        "event": "header",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **versions(),
        "git_sha": git_sha(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "config": config,
    }
