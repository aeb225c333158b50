"""Shared test set-up. The Triton kernels run under the interpreter on the CPU: the variable must be
set before anything imports triton, which is why it lives at the top of the root conftest."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import helpers  # noqa: E402  (after TRITON_INTERPRET: it imports the engine)
from pgl_fast.core.methods import METHODS  # noqa: E402
from pgl_fast.data import DATASETS  # noqa: E402
from pgl_fast.models.heads import HEADS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ARCHIVE = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")


@pytest.fixture(scope="session")
def offline_cifar():
    """The offline CIFAR-10 JPEG copy, unpacked once into .cache/ (skipped where it is absent)."""
    if not os.path.exists(OFFLINE_ARCHIVE):
        pytest.skip(f"offline CIFAR-10 copy not found at {OFFLINE_ARCHIVE}")
    from pgl_fast.data import extract_archive_if_needed

    return str(extract_archive_if_needed(OFFLINE_ARCHIVE, os.path.join(REPO, ".cache")))


@pytest.fixture(autouse=True)
def _seed_and_release():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def one_thread():
    """One intra-op thread: as fast for the tiny batches of these tests on an idle machine, and on a
    busy one it avoids OpenMP threads spinning against each other (many times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def load_example():
    """Imports ``examples/<name>.py`` (the examples are scripts, not a package) and returns the module."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(REPO, "examples", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def tiny_model():
    """``helpers.tiny_resnet``: builds a seeded resnet8 cut into J modules with aux heads
    (``tiny_model(J=3, aux="0c1f")``)."""
    return helpers.tiny_resnet


@pytest.fixture
def tiny_learner():
    """``helpers.tiny_learner``: a ``LocalLearner`` over a model with the engine's SGD
    (``tiny_learner(tiny_model(3), "pgl", lr=0.05)``)."""
    return helpers.tiny_learner


@pytest.fixture
def cli(tmp_path):
    """``helpers.run_cli`` into ``tmp_path / name``: ``cli("--method", "dgl", "--epochs", "1", name="dgl",
    train=16)`` runs a tiny synthetic CLI run and returns a ``helpers.CliRun`` (exit code, folder,
    ``rows`` of metrics.jsonl, ``summary``, ``header``, ``config``)."""
    def run(*args, name="run", **kw):
        return helpers.run_cli(tmp_path / name, *args, **kw)

    return run


@pytest.fixture
def restored_registries():
    """The method, aux-head and data-set registries as they were before the test: entries it
    registers leave with it."""
    methods, heads, datasets = dict(METHODS), dict(HEADS), dict(DATASETS)
    yield
    METHODS.clear()
    METHODS.update(methods)
    HEADS.clear()
    HEADS.update(heads)
    DATASETS.clear()
    DATASETS.update(datasets)
