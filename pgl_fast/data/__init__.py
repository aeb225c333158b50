"""Data in one place: where images come from (``sources``: the data set registry, download, decode,
cache, archives), how a recipe augments and normalises them (``recipes``), the on-device batch
pipeline (``augment``), the streamed pipeline for sets too big to keep resident (``stream``) and the
hand-out of batches to the trainer (``batches``). The names below are the public ones."""
from .augment import BatchAugmenter, epoch_batches, make_generator, normalize
from .recipes import RECIPES, DatasetSpec
from .sources import (DATASETS, IMAGE_EXTENSIONS, READS, Data, DatasetSource, LoadRequest, Splits, archive_cache_dir,
                      dataset_spec, extract_archive_if_needed, is_archive, load_dataset, reads, register_dataset,
                      run_defaults)

__all__ = ["BatchAugmenter", "epoch_batches", "make_generator", "normalize", "RECIPES", "DatasetSpec", "DATASETS",
           "IMAGE_EXTENSIONS", "READS", "Data", "DatasetSource", "LoadRequest", "Splits", "archive_cache_dir",
           "dataset_spec", "extract_archive_if_needed", "is_archive", "load_dataset", "reads", "register_dataset",
           "run_defaults"]
