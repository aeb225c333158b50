"""Which data a run trains on and how it is read: the data set, its folder and cache, subsets, and
the pipeline that decodes it."""
from __future__ import annotations

from dataclasses import dataclass

from .. import data as data_mod
from ..data import stream as data_stream
from .base import _f, bad

# the data sets and recipes the flags name: the data module's own tables (one registry each)
DATASETS = data_mod.DATASETS
RECIPES = tuple(data_mod.RECIPES)
PIPELINES = data_stream.PIPELINES


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = _f("cifar10", "data set", group="data", choices=DATASETS)
    data_dir: str = _f("./data", "data folder (torchvision download target, or an ImageFolder tree with train/ and test/, or a .tar.gz/.tgz/.tar archive of one, unpacked once into ~/.cache/pgl_fast/archives)", group="data")
    recipe: str = _f("cifar10", "augmentation/normalisation recipe for --dataset imagefolder or synthetic (and the split table key for --split balanced)", group="data", choices=RECIPES)
    train_subset: int | None = _f(None, "train on a seeded random subset of N images", group="data", metavar="N")
    test_subset: int | None = _f(None, "evaluate on a seeded random subset of N test images", group="data", metavar="N")
    no_download: bool = _f(False, "never try to download a torchvision data set", group="data")
    cache_dir: str | None = _f(None, "where decoded uint8 tensors are cached (default <data-dir>/.pgl_cache)", group="data")
    drop_last: bool = _f(False, "drop the last partial training batch (InfoPro keeps it)", group="data")
    synthetic_train: int = _f(512, "training images of --dataset synthetic", group="data")
    synthetic_test: int = _f(256, "test images of --dataset synthetic", group="data")
    data_pipeline: str = _f("auto", "resident: decode the whole set once and keep it on the device; stream: DataLoader workers decode each batch from the files (ImageFolder trees); auto: stream for --recipe imagenet or when the decoded set would exceed --resident-budget, else resident", group="data", choices=PIPELINES)
    workers: int = _f(2, "with --data-pipeline stream: DataLoader worker processes decoding files (0: in the training process)", group="data", metavar="N")
    image_size: int | None = _f(None, "with --data-pipeline stream: the crop size the network sees (default: the recipe's, 224 for imagenet)", group="data", metavar="PX")
    skip_bad_images: bool = _f(False, "with --data-pipeline stream: decode every file once before training and leave out the ones that fail (counted in header.json) instead of stopping at the first", group="data")
    resident_budget: float = _f(4096.0, "with --data-pipeline auto: the most MiB a decoded ImageFolder may take to be kept resident", group="data", metavar="MiB")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Everything the data fields alone decide."""
        if self.dataset not in DATASETS:
            bad("--dataset", f"{self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.workers < 0:
            bad("--workers", f"must be >= 0, got {self.workers}")
        if self.image_size is not None and self.image_size < 8:
            bad("--image-size", f"must be >= 8 pixels, got {self.image_size}")
        if self.resident_budget <= 0:
            bad("--resident-budget", f"must be > 0 MiB, got {self.resident_budget}")
        data_stream.check_pipeline(self.data_pipeline, self.dataset, self.recipe)
        for flag, v in (("--train-subset", self.train_subset), ("--test-subset", self.test_subset)):
            if v is not None and v < 1:
                bad(flag, f"must be >= 1, got {v}")
        if self.synthetic_train < 1 or self.synthetic_test < 1:
            bad("--synthetic-train/--synthetic-test", "must be >= 1")

    @property
    def recipe_name(self) -> str:
        return DATASETS[self.dataset].recipe or self.recipe

    @property
    def split_recipe(self) -> str:
        return data_mod.run_defaults(self.dataset, self.recipe).split_table
