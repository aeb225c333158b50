"""What the three examples share: the command line, the offline CIFAR-10 copy, and one PGL run
through the public API (``pgl_fast.LocalLearner`` + ``pgl_fast.Trainer``)."""
from __future__ import annotations

import argparse
import os

import torch

import pgl_fast

HERE = os.path.dirname(os.path.abspath(__file__))
OFFLINE_ARCHIVE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "cifar10-jpeg.tar.gz")


def parse_args(description: str, argv=None, *, lr: float = 0.05) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=OFFLINE_ARCHIVE,
                   help="the CIFAR-10 JPEG tree (train/ and test/) or its .tar.gz (default: the offline copy)")
    p.add_argument("--method", default="pgl", choices=("pgl", "dgl", "bp"))
    p.add_argument("-P", "--period", type=int, default=1, help="PGL: local epochs per cycle")
    p.add_argument("-Q", "--duration", type=int, default=1, help="PGL: global epochs per cycle")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("-o", "--output-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_cifar(args):
    data_dir = args.data
    if data_dir.endswith((".tar.gz", ".tgz")):
        data_dir = str(pgl_fast.extract_archive_if_needed(data_dir, os.path.join(os.path.dirname(HERE), ".cache")))
    return pgl_fast.load_dataset("imagefolder", data_dir, train_subset=args.train_subset, test_subset=args.test_subset,
                                 subset_seed=args.seed, download=False, recipe="cifar10")


def method_of(args):
    m = pgl_fast.methods
    return {"pgl": lambda: m.PGL(args.period, args.duration), "dgl": m.DGL, "bp": m.BP}[args.method]()


def train(local_model: pgl_fast.LocalModel, args, name: str) -> dict:
    """Train ``local_model`` with the method of ``args`` on CIFAR-10 and return the summary."""
    data = load_cifar(args)
    epochs = args.epochs

    def cosine(epoch: int) -> float:  # per-epoch cosine annealing from the base lr
        return 0.5 * args.lr * (1 + torch.cos(torch.tensor(torch.pi * epoch / epochs)).item())

    learner = pgl_fast.LocalLearner(
        local_model, method_of(args),
        optimizer=lambda ps: torch.optim.SGD(ps, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
        amp="bf16" if args.amp else None, lr_schedule=cosine)
    trainer = pgl_fast.Trainer(
        learner, (data.train_x, data.train_y), (data.test_x, data.test_y), spec=data.spec, epochs=epochs,
        batch_size=args.batch_size, seed=args.seed, output_dir=args.output_dir or f"runs/example-{name}-{args.method}",
        overwrite=True, progress="off", heartbeat=0)
    return trainer.fit()
