"""Benchmark set-up: the Triton interpreter on the CPU, the device and versions in every
pytest-benchmark machine_info record, and the fixtures the step benchmarks share."""
import gc
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    import torchvision

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    machine_info["torch"] = torch.__version__
    machine_info["torchvision"] = torchvision.__version__
    machine_info["triton"] = triton_version
    machine_info["cuda"] = torch.version.cuda
    machine_info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    machine_info["cpu_threads"] = torch.get_num_threads()


@pytest.fixture(scope="module")
def bench_threads(request):
    """On the CPU, the module's benchmarks run on ``PGL_FAST_BENCH_THREADS`` threads (default: the
    module's ``BENCH_THREADS``, else 1): every case of a module on the same count, so that their
    ratios compare steps, not thread counts."""
    n = torch.get_num_threads()
    if not torch.cuda.is_available():
        default = getattr(request.module, "BENCH_THREADS", 1)
        torch.set_num_threads(int(os.environ.get("PGL_FAST_BENCH_THREADS", str(default))))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def release_memory():
    """After each case: the last case's network and caches go, before the next one's peak is read."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
