"""Benchmark set-up: the Triton interpreter on the CPU, and the device and versions in every
pytest-benchmark machine_info record."""
import os

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
