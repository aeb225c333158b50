"""What a result was produced with: package versions, the checkout's commit and the device's name.

One collector for every record that carries them (a training run's ``header.json``, the memory
profile's JSON, the GPU check's results), so they all name the same things the same way.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import subprocess
import sys

import torch

from . import __version__


def _installed_version(name: str) -> str | None:
    """``name.__version__`` as the package states it in its source, read without importing it:
    importing triton and torchvision only to read their versions costs a run ~250 MiB resident
    that it may never use. None where the package is absent."""
    try:
        spec = importlib.util.find_spec(name)  # finds a top-level package without running it
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        for fname in ("version.py", "__init__.py"):
            try:
                with open(os.path.join(folder, fname)) as f:
                    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
            except OSError:
                continue
            if found:
                return found.group(1)
    try:  # a version computed at import time: the package's own attribute
        return getattr(importlib.import_module(name), "__version__", None)
    except Exception:  # optional: triton is absent on the CPU machines and on macOS/Windows
        return None


def _triton_version() -> str | None:
    return _installed_version("triton")


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # a CUDA build whose cuDNN library cannot be loaded here
        return None


def versions() -> dict:
    """{pgl_fast, torch, torchvision, triton, python, cuda, cudnn}: None for what is not installed
    (triton on the CPU) or not built in (CUDA and cuDNN in a CPU build of torch)."""
    return {
        "pgl_fast": __version__,
        "torch": torch.__version__,
        "torchvision": _installed_version("torchvision"),
        "triton": _triton_version(),
        "python": sys.version.split()[0],
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
    }


def device_name(device: torch.device | str) -> str:
    """The GPU's marketing name on CUDA (e.g. ``NVIDIA H200``), else the CPU's processor name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    """The short commit of the checkout this package runs from, or None (an installed wheel, no git)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def nvidia_smi() -> str | None:
    """The driver's view of the GPUs (name, driver, memory, power limit, max SM clock), one CSV line
    per GPU, or None where ``nvidia-smi`` is missing or fails."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return smi.stdout.strip() or None
