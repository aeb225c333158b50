"""The batches a :class:`~pgl_fast.training.trainer.Trainer` trains on, from whatever the user gives it:

- :class:`TensorData`: a pair ``(x, y)`` of tensors kept on the learner's device; uint8 images are
  augmented (random crop and flip) and normalised batch by batch on the device, so an epoch costs no
  host work beyond drawing its permutation; resumable inside an epoch (the permutation is saved);
- :class:`LoaderData`: any sized iterable of ``(x, y)`` batches such as a ``DataLoader`` (its order
  is its own: resumable at epoch ends, with the loader's generators or state saved);
- a :class:`~pgl_fast.data.stream.StreamData`: files decoded by loader workers
  (:mod:`pgl_fast.data.stream`), resumable inside an epoch.

:func:`bind_data` picks one for the given data and the learner; every kind answers the same calls
(``epoch_batches``, ``train_batch``, ``test_batches``, ``probe_batch``) that the loop and the
strategies use.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from .augment import BatchAugmenter, epoch_batches, normalize
from .sources import dataset_spec
from . import stream as data_stream
from ..errors import UserError


class TensorData:
    """Device-resident images: whole data set on the learner's device, batches by index."""

    resumable_mid_epoch = True

    def __init__(self, train, test, spec, augment: bool, device, channels_last: bool, test_batch_size: int,
                 dtype: torch.dtype = torch.float32):
        self.train_x, self.train_y = (t.to(device) for t in train)
        self.test_x, self.test_y = (t.to(device) for t in test) if test is not None else (None, None)
        self.uint8 = self.train_x.dtype == torch.uint8
        self.notes: list[str] = []
        if self.uint8:
            if self.train_x.dim() != 4:
                raise UserError(f"train_data: uint8 images must be [N, C, H, W], got shape {tuple(self.train_x.shape)}")
            channels = int(self.train_x.shape[1])
            if spec is None:
                n_cls = int(self.train_y.max().item()) + 1
                spec = dataset_spec("imagefolder", recipe="cifar10", num_classes=n_cls,
                                             image_size=int(self.train_x.shape[-1]))
                if channels != 3:
                    # the CIFAR-10 statistics are per colour channel: they say nothing about other images
                    spec = dataclasses.replace(spec, mean=(0.5,) * channels, std=(0.5,) * channels)
                    self.notes.append(f"warning: train_data has {channels}-channel uint8 images and no spec: "
                                      f"normalised with mean 0.5 and std 0.5 per channel (pass spec= to choose)")
            elif len(spec.mean) != channels:
                raise UserError(f"spec: {spec.name} has mean/std for {len(spec.mean)} channel(s); train_data's uint8 "
                                f"images have {channels} (shape {tuple(self.train_x.shape)})")
        self.spec = spec
        self.dtype = dtype  # uint8 images are normalised into the model's floating dtype
        self.device, self.channels_last, self.test_batch_size = device, channels_last, test_batch_size
        self.augment = BatchAugmenter(spec, device) if self.uint8 and augment else None
        self.num_train = int(self.train_y.shape[0])
        self.num_test = int(self.test_y.shape[0]) if self.test_y is not None else 0

    def epoch_batches(self, batch_size: int, gen, drop_last: bool):
        return epoch_batches(self.num_train, batch_size, generator=gen, drop_last=drop_last,
                                      device=self.device)

    def train_batch(self, idx, gen, needs_image: bool):
        xb = self.train_x[idx]
        if not self.uint8:
            return xb, self.train_y[idx], None
        if self.augment is not None:
            xb = self.augment(xb, gen)
        x = normalize(xb, self.spec, self.dtype, self.channels_last)
        return x, self.train_y[idx], xb.to(self.dtype).div_(255) if needs_image else None

    def test_batches(self):
        for i in range(0, self.num_test, self.test_batch_size):
            x = self.test_x[i:i + self.test_batch_size]
            if self.uint8:
                x = normalize(x, self.spec, self.dtype, self.channels_last)
            yield x, self.test_y[i:i + self.test_batch_size]

    def probe_batch(self):
        """Two training samples as the model will see them (no augmentation: it draws random numbers)."""
        x = self.train_x[:2]
        if self.uint8:
            x = normalize(x, self.spec, self.dtype, self.channels_last)
        return x, f"train_data ({self.train_x.dtype} {tuple(self.train_x.shape)})"


class LoaderBatches:
    """An epoch of a loader, read in order (the loop asks for batch 0, 1, 2, ...)."""

    def __init__(self, loader):
        self.it = iter(loader)
        self.n = len(loader)

    def __len__(self):
        return self.n

    def __getitem__(self, step):
        return next(self.it)


class LoaderData:
    """Batches from an iterable such as a ``DataLoader``, moved to the learner's device."""

    resumable_mid_epoch = False

    def __init__(self, train, test, device, needs_image: bool):
        if needs_image:
            raise UserError("InfoPro's loss reconstructs the input image: give the training data as uint8 tensors "
                            "(x, y), not a loader of normalised batches")
        try:
            len(train)
        except TypeError:
            raise UserError("train_data: a loader must have a length (a DataLoader over a sized data set)") from None
        self.train, self.test, self.device = train, test, device
        self.num_train = len(getattr(train, "dataset", ())) or len(train)
        self.num_test = len(getattr(test, "dataset", ())) if test is not None else 0

    def epoch_batches(self, batch_size, gen, drop_last):
        return LoaderBatches(self.train)

    def train_batch(self, batch, gen, needs_image):
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None

    def probe_batch(self):
        """The first sample of the loader's data set as a batch of one, read by index: iterating the
        loader would draw its epoch order from its generator. Random transforms of the data set
        draw from a forked random state, so the run's own draws are untouched. None where the
        loader has no indexable data set."""
        ds = getattr(self.train, "dataset", None)
        if ds is None or not hasattr(ds, "__getitem__") or isinstance(ds, torch.utils.data.IterableDataset):
            return None
        try:
            with torch.random.fork_rng(devices=[]):
                item = ds[0]
            x = item[0] if isinstance(item, (tuple, list)) else None
        except Exception:  # noqa: BLE001 - a data set without sample 0 by index: the check is skipped
            return None
        if not torch.is_tensor(x):
            return None
        return x.unsqueeze(0).to(self.device), f"train_data (samples of shape {tuple(x.shape)}, {x.dtype})"

    def _generators(self) -> list[torch.Generator]:
        """The distinct generators a DataLoader's epoch order is drawn from (the loader's, its
        sampler's, its batch sampler's sampler's)."""
        loader, found = self.train, []
        sampler = getattr(loader, "sampler", None)
        inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                  getattr(inner, "generator", None)):
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
        return found

    def resume_support(self) -> str | None:
        """None where an interrupted run continues on the order an uninterrupted one takes; else why not."""
        loader = self.train
        if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
            return None  # a stateful loader (torchdata's StatefulDataLoader, ...): its own state is saved
        if isinstance(loader, (list, tuple)):
            return None  # the same batches every epoch
        if not isinstance(loader, torch.utils.data.DataLoader):
            return f"a {type(loader).__name__} has no state to save"
        known = (torch.utils.data.RandomSampler, torch.utils.data.SequentialSampler)
        for s in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if s is not None and not isinstance(s, known + (torch.utils.data.BatchSampler,)) \
                    and not isinstance(s, torch.utils.data.dataloader._InfiniteConstantSampler):
                return f"its sampler is a {type(s).__name__}, whose state is unknown"
        if loader.batch_sampler is not None and type(loader.batch_sampler) is not torch.utils.data.BatchSampler:
            return f"its batch sampler is a {type(loader.batch_sampler).__name__}, whose state is unknown"
        # RandomSampler and the loader draw from their generators (saved here) or from torch's
        # global generator (saved with every checkpoint)
        return None

    def state_dict(self) -> dict:
        """The loader's state at an epoch end: what the next epoch's order is drawn from."""
        loader = self.train
        if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
            return {"loader": loader.state_dict()}
        return {"generators": [g.get_state() for g in self._generators()]}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        if "loader" in state:
            self.train.load_state_dict(state["loader"])
            return
        gens = self._generators()
        if len(gens) != len(state["generators"]):
            raise UserError(f"resume: the checkpoint saved {len(state['generators'])} generator(s) of train_data's "
                            f"loader; this loader has {len(gens)}: pass a loader built like the original")
        for g, st in zip(gens, state["generators"]):
            g.set_state(st)

    def test_batches(self):
        for x, y in (self.test if self.test is not None else ()):
            yield x.to(self.device), y.to(self.device)


def is_tensor_pair(d) -> bool:
    return isinstance(d, (tuple, list)) and len(d) == 2 and all(torch.is_tensor(t) for t in d)


def bind_data(learner, train_data, test_data, *, spec, augment: bool, test_batch_size: int, seed: int,
              save_every: int):
    """The batches of ``train_data``/``test_data`` for ``learner``, and the warnings they come with."""
    device = learner.device
    p = next((q for q in learner.model.parameters() if q.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    needs_image = learner.method.needs_image
    if is_tensor_pair(train_data):
        if test_data is not None and not is_tensor_pair(test_data):
            raise UserError("test_data: give (x, y) tensors like train_data, or None")
        data = TensorData(train_data, test_data, spec, augment, device, learner.channels_last, test_batch_size, dtype)
        if needs_image and not (data.uint8 and data.train_x.shape[1] == 3):
            raise UserError("InfoPro's loss reconstructs the input image: give uint8 images [N, 3, H, W]")
        return data, list(data.notes)
    if isinstance(train_data, data_stream.StreamData):
        # files decoded by loader workers, batch by batch (test_data: unused, the stream has its test split)
        data = data_stream.BoundStream(train_data, device, learner.channels_last, test_batch_size, dtype, seed)
        if needs_image and data.channels != 3:
            raise UserError("InfoPro's loss reconstructs the input image: it needs 3-channel images")
        return data, []
    if isinstance(train_data, Iterable):
        if save_every:
            raise UserError("Trainer: save_every needs tensor data (x, y); a loader's order is its own, so "
                            "checkpoints are taken at epoch ends")
        data = LoaderData(train_data, test_data, device, needs_image)
        why = data.resume_support()
        notes = []
        if why is not None:
            notes.append(f"warning: train_data's order cannot be saved ({why}): a resumed run continues "
                         "on another order than an uninterrupted one would (give a DataLoader with a "
                         "RandomSampler/generator, or a stateful loader with state_dict/load_state_dict)")
        return data, notes
    raise UserError(f"train_data: a pair (x, y) of tensors or an iterable of (x, y) batches, "
                    f"not a {type(train_data).__name__}")


__all__ = ["LoaderBatches", "LoaderData", "TensorData", "bind_data", "is_tensor_pair"]
