"""pgl_fast: locally supervised learning with Periodic Global Guidance."""
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Resolves ``pgl_fast.kernels`` to the top-level ``kernels/`` folder of a source checkout.

    ``setup.py`` installs that folder under the engine's namespace; a bare checkout (``python -m
    pgl_fast.gpu_check`` before any ``pip install``) has no such mapping, and an editable install
    would map it to the folder of the checkout it was made from, not the one being run. The finder is
    registered only when this package sits in a checkout (``setup.py`` and ``kernels/`` beside it),
    so an installed wheel is never affected."""

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.folder, "__init__.py"), submodule_search_locations=[self.folder])


def _register_checkout_kernels() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "kernels")
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isfile(os.path.join(folder, "__init__.py")):
        if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _CheckoutKernelsFinder(folder))


_register_checkout_kernels()
