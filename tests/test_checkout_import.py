"""A bare checkout (no ``pip install``) must import ``pgl_fast.kernels`` from its own ``kernels/``
folder: that is what a GPU machine receives before anything is installed."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bare_checkout_imports_its_own_kernels(tmp_path):
    for name in ("pgl_fast", "kernels"):
        shutil.copytree(os.path.join(REPO, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(os.path.join(REPO, "setup.py"), tmp_path / "setup.py")
    code = "import pgl_fast.kernels as k; print(k.__file__); print(k.conv_bn_relu.__module__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    # the copy's kernels, never the ones of the checkout the editable install points at
    assert os.path.realpath(first) == os.path.realpath(str(tmp_path / "kernels" / "__init__.py"))


def test_installed_layout_is_left_alone(tmp_path):
    """Without setup.py beside the package (a wheel in site-packages) no finder is registered."""
    shutil.copytree(os.path.join(REPO, "pgl_fast"), tmp_path / "pgl_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, pgl_fast; "
            "print(any(type(f).__name__ == '_CheckoutKernelsFinder' for f in sys.meta_path))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
