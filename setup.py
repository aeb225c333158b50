"""pgl_fast: locally supervised learning with Periodic Global Guidance (PGL)."""
import sys

from setuptools import find_packages, setup

# torch is deliberately unpinned from above: the GPU machine runs torch 2.11 and this
# must not upgrade it; the CPU machines install 2.14.1 from local wheels first.
install_requires = ["torch>=2.4", "torchvision>=0.19", "numpy", "tqdm", "pillow"]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="pgl_fast",
    version="0.1.0",
    description="Fast local learning with Periodic Global Guidance (PGL) for any network",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder but are installed under the
    # engine's namespace, so no top-level package called `kernels` is ever installed.
    packages=find_packages(include=["pgl_fast", "pgl_fast.*"]) + ["pgl_fast.kernels"],
    package_dir={"pgl_fast": "pgl_fast", "pgl_fast.kernels": "kernels"},
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5", "scipy"],
        "bench": ["pytest>=7", "pytest-benchmark>=4"],
        "report": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": [
        "pgl-train=pgl_fast.train:main",
        "pgl-experiments=pgl_fast.experiments:main",
        "pgl-report=pgl_fast.report:main",
    ]},
)
