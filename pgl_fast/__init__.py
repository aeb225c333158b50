"""pgl_fast: locally supervised learning with Periodic Global Guidance.

The public API (imported on first use, so ``python -m pgl_fast.<tool>`` starts without it):

- ``pgl_fast.split(model, cuts, *, aux="1c2f", input_shape=(3, 32, 32), num_classes=None,
  example_input=None)``: cut a network into local modules, an aux head at every cut -> ``LocalModel``
  (``example_input``: a batch to probe with, for inputs that are not float images);
- ``pgl_fast.LocalModel(blocks, classifier, heads)``: the pieces, assembled by hand;
- ``pgl_fast.methods``: ``BP()``, ``DGL()``, ``InfoPro(...)``, ``MAN(...)``, ``HPFF(...)``,
  ``PGL(period, duration, local=...)``, and ``Method``, the base class of a new one;
- ``pgl_fast.LocalLearner(local_model, method, ...)``: local and global steps, evaluation, state;
- ``pgl_fast.Trainer(learner, train_data, test_data, *, epochs, output_dir, strategy=None, ...)``: the
  training loop; ``strategy``: ``SingleProcess()``, ``DataParallel()`` or ``Pipeline(runner)``;
- presets and pieces the examples use: ``cifar_resnet``, ``cifar_stem``, the optimizer factory
  ``sgd`` (and ``SGD``), the methods ``BP``/``DGL``/``InfoPro``/``PGL``, and for torchrun
  ``DistContext``, ``DataParallelLearner``, ``init_pipeline_group``, ``build_stage``; the data
  sets: ``load_dataset``, ``extract_archive_if_needed``; ``main(argv)``, the CLI in process;
- the registries: ``register_method(name, MethodClass)`` (a ``--method``, and a ``--pgl-local``
  when its epochs are all local), ``register_head(name, HeadSpec(...))`` (an aux head ``--aux``/``split(aux=...)``
  can name) and ``register_dataset(name, DatasetSource(...))`` (with ``LoadRequest`` and ``Splits``: a data set ``load_dataset`` and
  ``--dataset`` can name).
"""
import importlib
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

from .memory import host as host_memory  # noqa: E402  (ctypes only)

host_memory.ask_huge_pages()  # before anything imports torch: torch reads it once (host_memory.py)


_API = {
    "split": ("pgl_fast.models.split", "split"),
    "LocalModel": ("pgl_fast.models.local_model", "LocalModel"),
    "LocalLearner": ("pgl_fast.core.learner", "LocalLearner"),
    "Trainer": ("pgl_fast.training.trainer", "Trainer"),
    "methods": ("pgl_fast.core.methods", None),
    "BP": ("pgl_fast.core.methods", "BP"),
    "DGL": ("pgl_fast.core.methods", "DGL"),
    "InfoPro": ("pgl_fast.core.methods", "InfoPro"),
    "PGL": ("pgl_fast.core.methods", "PGL"),
    "MAN": ("pgl_fast.core.methods", "MAN"),
    "HPFF": ("pgl_fast.core.methods", "HPFF"),
    "Method": ("pgl_fast.core.methods", "Method"),
    "register_method": ("pgl_fast.core.methods", "register_method"),
    "cifar_resnet": ("pgl_fast.models.presets", "cifar_resnet"),
    "cifar_stem": ("pgl_fast.models.presets", "cifar_stem"),
    "sgd": ("pgl_fast.runtime.optim", "sgd"),
    "SGD": ("pgl_fast.runtime.optim", "SGD"),
    "DistContext": ("pgl_fast.distributed", "DistContext"),
    "DataParallelLearner": ("pgl_fast.distributed", "DataParallelLearner"),
    "init_pipeline_group": ("pgl_fast.distributed.pipeline", "init_pipeline_group"),
    "build_stage": ("pgl_fast.distributed.pipeline", "build_stage"),
    "SingleProcess": ("pgl_fast.distributed.strategies", "SingleProcess"),
    "DataParallel": ("pgl_fast.distributed.strategies", "DataParallel"),
    "Pipeline": ("pgl_fast.distributed.strategies", "Pipeline"),
    "load_dataset": ("pgl_fast.data", "load_dataset"),
    "extract_archive_if_needed": ("pgl_fast.data", "extract_archive_if_needed"),
    "register_dataset": ("pgl_fast.data", "register_dataset"),
    "DatasetSource": ("pgl_fast.data", "DatasetSource"),
    "LoadRequest": ("pgl_fast.data", "LoadRequest"),
    "Splits": ("pgl_fast.data", "Splits"),
    "main": ("pgl_fast.train", "main"),  # the CLI in process: main(["--method", "pgl", ...]) -> exit code
    "register_head": ("pgl_fast.models.heads", "register_head"),
    "HeadSpec": ("pgl_fast.models.heads", "HeadSpec"),
    "UserError": ("pgl_fast.errors", "UserError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pgl_fast' has no attribute {name!r}")
    module, attr = _API[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
