"""The builders most tests share, as plain functions with arguments: a tiny CIFAR ResNet cut into J
modules with aux heads, a ``LocalLearner`` over it, and an in-process run of the command line into a
folder. ``conftest.py`` hands them to tests as fixtures; worker scripts that run outside pytest
(torchrun, spawned processes) import them directly.

Each default is the value most tests already used, so a test that switches to these builders keeps
its numbers: the model is seeded before it is built (the weights are a function of ``seed`` alone),
and the command line carries exactly the flags given here plus the test's own."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import Method, from_name
from pgl_fast.jsonio import read_jsonl
from pgl_fast.models.presets import cifar_resnet
from pgl_fast.runtime.optim import sgd
from pgl_fast.train import main


def tiny_resnet(J: int = 2, *, seed: int | None = 0, arch: str = "resnet8", image_size: int = 8, split: str = "even",
                aux: str | None = "1c2f", num_classes: int = 10, device=None, dtype=None, **kw):
    """``cifar_resnet(arch, J, ...)`` at ``image_size`` pixels. ``seed`` seeds torch's global
    generator first (``None``: build from the generator's current state, for tests that build
    several models in a row and want them to differ); ``kw`` goes to ``cifar_resnet``
    (``decoders``, ``droprate``, ``head_out_dim``...)."""
    if seed is not None:
        torch.manual_seed(seed)
    net = cifar_resnet(arch, J, num_classes=num_classes, image_size=image_size, split=split, aux=aux, **kw)
    if device is not None or dtype is not None:
        net = net.to(device=device, dtype=dtype)
    return net


def tiny_learner(net, method: Method | str = "dgl", *, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 1e-4, **kw) -> LocalLearner:
    """``LocalLearner(net, method)`` with the engine's SGD at these settings (its own defaults but the
    learning rate); ``kw`` goes to ``LocalLearner`` (``amp``, ``cuda_graphs``, ``checkpoint_global``...)."""
    method = from_name(method) if isinstance(method, str) else method
    return LocalLearner(net, method, optimizer=sgd(lr=lr, momentum=momentum, nesterov=nesterov,
                                                   weight_decay=weight_decay), **kw)


def tiny_cli_args(*, train: int = 32, test: int = 16, arch: str = "resnet8", J: int = 4, split: str = "layerwise",
                  batch: int = 16, lr: float = 0.05, progress: str | None = "off") -> list[str]:
    """The flags of a tiny synthetic run (``progress=None`` leaves ``--progress`` at its default)."""
    args = ["--dataset", "synthetic", "--synthetic-train", str(train), "--synthetic-test", str(test), "--arch", arch,
            "-J", str(J), "--split", split, "-b", str(batch), "--lr", str(lr)]
    return args + (["--progress", progress] if progress is not None else [])


@dataclass
class CliRun:
    """One finished in-process run: its exit code and what it wrote into ``out``."""
    rc: int
    out: Path

    def _json(self, name: str):
        return json.loads((self.out / name).read_text())

    @property
    def rows(self) -> list[dict]:
        """``metrics.jsonl``, one dict per epoch."""
        return read_jsonl(str(self.out / "metrics.jsonl"))

    @property
    def summary(self) -> dict:
        return self._json("summary.json")

    @property
    def header(self) -> dict:
        return self._json("header.json")

    @property
    def config(self) -> dict:
        return self._json("config.json")


def run_cli(out, *args: str, expect_rc: int | None = 0, tiny: bool = True, **sizes) -> CliRun:
    """``pgl_fast.train.main`` in this process on ``tiny_cli_args(**sizes)`` (none of them when
    ``tiny`` is false, for a test that gives the whole command line), then ``args``, then ``-o out``.
    Checks the exit code against ``expect_rc`` unless that is ``None``."""
    out = Path(out)
    argv = [*(tiny_cli_args(**sizes) if tiny else []), *args, "-o", str(out)]
    rc = main(argv)
    if expect_rc is not None:
        assert rc == expect_rc, f"exit code {rc}, expected {expect_rc}: {argv}"
    return CliRun(rc, out)


# ImageFolder trees written with PIL


def image_array(seed: int, size=(8, 8)) -> np.ndarray:
    """A deterministic random RGB image, HWC uint8; size is (width, height) like PIL."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def write_image(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def make_tree(root: Path, classes=("cat", "ant", "bee"), n_train=3, n_test=2, size=(8, 8), fmt="PNG"):
    """Write ``root/{train,test}/<class>/NN.png``; returns {(split, class, i): HWC array}."""
    ext = ".png" if fmt == "PNG" else ".jpg"
    written = {}
    seed = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            for i in range(n):
                arr = image_array(seed, size)
                seed += 1
                write_image(root / split / cls / f"{i:02d}{ext}", arr, fmt)
                written[(split, cls, i)] = arr
    return written
