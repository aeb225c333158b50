"""Host memory given back to the system (glibc's allocator).

The C allocator (glibc's malloc) keeps much of what a process frees: chunks
below its mmap threshold stay in its heaps, and the threshold itself rises to the size of every
large block freed, so after the first steps a step's activations are served from -- and left in --
the heap. The resident set then remembers the largest phase of the run (a global step's full
activations stay resident through every later local epoch). Two remedies, both glibc's:
``retain_less_memory`` fixes the mmap threshold at start-up (``mallopt``; fixing it also stops
the threshold from rising), so every block of 4 MiB or more -- the activations of any real batch
-- is mapped on its own and returned on free; ``release_freed_memory`` hands the heap's free pages
back (``malloc_trim``), which the trainer does after the set-up and whenever the phase changes, so
each phase's peak resident set is that phase's own.

The price of a fixed threshold is page faults: every large block is fresh memory each step. With
4 KiB pages a resnet32 J=16 local step at batch 512 took 1.5x as long (2-core CPU, quiet); with
transparent huge pages for torch's large allocations (``THP_MEM_ALLOC_ENABLE=1``, which torch reads
once, at its first allocation, hence ``ask_huge_pages`` from ``pgl_fast/__init__`` before torch is
imported) the step took the same time as with the default allocator, and its peak above the
set-up fell from 411-475 MiB to 285 MiB. So the threshold is fixed only where torch got huge pages
(``huge_pages_for_torch``); elsewhere the run only trims.

This module imports nothing but ``ctypes``, so that a process can use it (and a test can load it)
without importing torch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_LIBC: list = []


def _libc():
    """glibc, where this process runs on it (None elsewhere: musl, macOS, Windows)."""
    if not _LIBC:
        lib = None
        name = ctypes.util.find_library("c")
        if name is not None:
            try:
                lib = ctypes.CDLL(name)
                lib.malloc_trim  # glibc only
                lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def release_freed_memory() -> bool:
    """Return the C allocator's free pages to the system (glibc ``malloc_trim(0)``): the resident
    set drops to what is in use. False where the allocator is not glibc's (nothing done)."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 4 * 2**20


def retain_less_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Blocks of ``threshold`` bytes or more are mapped on their own from now on, and unmapped on
    free (glibc ``mallopt(M_MMAP_THRESHOLD)``). False where the allocator is not glibc's."""
    lib = _libc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, int(threshold)))


_HUGE_PAGES: list = []
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def ask_huge_pages() -> None:
    """Before torch is imported: ask its CPU allocator for transparent huge pages on large blocks
    (a user's own ``THP_MEM_ALLOC_ENABLE`` stays as set), and remember whether torch will see it."""
    if _HUGE_PAGES:
        return
    if _libc() is None:
        # huge pages pay off only with the fixed threshold, which needs glibc; alone they made
        # the resident set larger (whole pages stay resident)
        _HUGE_PAGES.append(False)
    elif "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        _HUGE_PAGES.append(os.environ["THP_MEM_ALLOC_ENABLE"] == "1")
    else:
        _HUGE_PAGES.append(False)  # too late: torch read the variable at its first allocation


def huge_pages_for_torch() -> bool:
    """Whether torch's large CPU blocks get transparent huge pages in this process."""
    if not _HUGE_PAGES or not _HUGE_PAGES[0]:
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False
