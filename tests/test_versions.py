"""The one version collector, against what each package reports about itself."""
import importlib.util
import platform
import sys

import torch
import torchvision

import pgl_fast
from pgl_fast.training.metrics import run_header
from pgl_fast.versions import device_name, git_sha, versions


def test_versions_are_what_the_packages_say():
    v = versions()
    assert set(v) == {"pgl_fast", "torch", "torchvision", "triton", "python", "cuda", "cudnn"}
    assert v["pgl_fast"] == pgl_fast.__version__
    assert v["torch"] == torch.__version__ and v["torchvision"] == torchvision.__version__
    assert v["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert v["cuda"] == torch.version.cuda
    if importlib.util.find_spec("triton") is None:
        assert v["triton"] is None
    else:
        import triton

        assert v["triton"] == triton.__version__
    if torch.backends.cudnn.is_available():
        assert v["cudnn"] == torch.backends.cudnn.version()
    else:
        assert v["cudnn"] is None


def test_device_name_and_git_sha():
    assert device_name(torch.device("cpu")) == (platform.processor() or platform.machine())
    assert device_name("cpu") == device_name(torch.device("cpu"))
    if torch.cuda.is_available():
        assert device_name("cuda:0") == torch.cuda.get_device_name(0)
    sha = git_sha()
    assert sha is None or (sha.isalnum() and 4 <= len(sha) <= 40)


def test_run_header_carries_the_versions():
    h = run_header({"seed": 1}, torch.device("cpu"))
    assert {k: h[k] for k in versions()} == versions()
    assert h["event"] == "header" and h["config"] == {"seed": 1} and h["device"] == "cpu"
    assert h["device_name"] == device_name("cpu") and h["cpu_threads"] == torch.get_num_threads()
