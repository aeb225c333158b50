"""Trainer as a Python caller uses it: any channel count, data checked before anything is written,
exact resume over a user's DataLoader, Ctrl-C that an ``except Exception`` does not swallow, and
refusals that name the constructor's arguments."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pgl_fast
from pgl_fast.core.methods import DGL, PGL
from pgl_fast.data import BatchAugmenter, DatasetSpec, normalize
from pgl_fast.errors import UserError
from pgl_fast.training.trainer import RunInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

VOLATILE = {"images_per_s", "epoch_seconds", "peak_mem_mib", "peak_reserved_mib", "mem_kind", "graph_pool_mib"}


def model(channels=1, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    return pgl_fast.split(net, [1], aux="1c2f", input_shape=(channels, 8, 8))


def images(n, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def fit(learner, train, out, **kw):
    kw = {"epochs": 2, "batch_size": 8, "progress": "off", "heartbeat": 0, **kw}
    return pgl_fast.Trainer(learner, train, None, output_dir=str(out), **kw).fit()


# -- any channel count ---------------------------------------------------------------------------
def test_one_channel_uint8_images_train_with_a_one_channel_spec(tmp_path):
    spec = DatasetSpec("grey", 3, 8, mean=[0.25], std=[0.5], pad=1, pad_mode="zeros", flip=True)
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    want = (x.double() / 255 - 0.25) / 0.5  # by hand
    assert torch.allclose(normalize(x, spec, torch.float64), want.float().double(), atol=1e-6)
    learner = pgl_fast.LocalLearner(model(1), DGL())
    summary = fit(learner, images(16), tmp_path / "run", spec=spec)
    assert summary["epochs"] == 2 and len(rows(tmp_path / "run")) == 2


def test_one_channel_images_without_a_spec_are_normalised_at_half_and_say_so(tmp_path):
    learner = pgl_fast.LocalLearner(model(1), DGL())
    trainer = pgl_fast.Trainer(learner, images(16), None, epochs=1, output_dir=str(tmp_path / "run"),
                               progress="off", heartbeat=0)
    assert trainer.data.spec.mean == (0.5,) and trainer.data.spec.std == (0.5,)
    assert any("1-channel" in w and "spec=" in w for w in trainer.warnings)


def test_crop_and_flip_of_a_two_channel_batch_match_pad_crop_flip_by_hand():
    spec = DatasetSpec("two", 3, 5, mean=(0.5, 0.5), std=(0.5, 0.5), pad=2, pad_mode="zeros", flip=True)
    x = torch.randint(0, 256, (3, 2, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    dy, dx, flip = torch.tensor([0, 4, 1]), torch.tensor([3, 0, 2]), torch.tensor([True, False, True])
    got = BatchAugmenter(spec).apply(x, dy, dx, flip)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(3):
        ref = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5]
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.equal(got[i], ref), i


def test_spec_and_data_of_other_channel_counts_are_refused():
    with pytest.raises(ValueError, match="one entry per image channel"):
        DatasetSpec("bad", 3, 8, mean=(0.5,), std=(0.5, 0.5), pad=0, pad_mode="zeros", flip=False)
    spec3 = DatasetSpec("rgb", 3, 8, mean=(0.5,) * 3, std=(0.5,) * 3, pad=0, pad_mode="zeros", flip=False)
    with pytest.raises(UserError, match=r"^spec: rgb has mean/std for 3 channel\(s\); train_data's uint8 images have 1"):
        pgl_fast.Trainer(pgl_fast.LocalLearner(model(1), DGL()), images(8), None, epochs=1, output_dir="unused",
                         spec=spec3)


def test_data_that_does_not_fit_the_model_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    learner = pgl_fast.LocalLearner(model(3), DGL())  # a 3-channel model, 1-channel images
    with pytest.raises(UserError) as e:
        fit(learner, images(16, channels=1), out)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train_data (torch.uint8 (16, 1, 8, 8)) does not fit the model")
    assert "expects input of shape (3, 8, 8) per sample" in msg
    assert not out.exists()  # nothing left to block the retry
    fit(pgl_fast.LocalLearner(model(1), DGL()), images(16, channels=1), out, epochs=1)  # the retry


def test_a_loader_whose_samples_do_not_fit_is_refused_before_anything_is_written(tmp_path):
    x, y = images(16, channels=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.double(), y), batch_size=8)
    with pytest.raises(UserError, match=r"^train_data \(samples of shape \(1, 8, 8\), torch.float64\) does not fit"):
        fit(pgl_fast.LocalLearner(model(3), DGL()), loader, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- exact resume over a user's DataLoader --------------------------------------------------------
def loader(seed=5):
    x, y = images(24, channels=1, seed=3)
    ds = torch.utils.data.TensorDataset((x.double() - 128) / 64, y)
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_resume_over_a_dataloader_with_its_own_generator_continues_its_order(tmp_path, monkeypatch):
    def run(out, **kw):
        learner = pgl_fast.LocalLearner(model(1), PGL(1, 1), lr_schedule=lambda e: 0.05)
        fit(learner, loader(), out, **kw)
        return learner

    full = run(tmp_path / "full")
    monkeypatch.setenv("PGL_FAST_SIGNAL_AT", "1:3:INT")  # after the last step of epoch 1: stop at its end
    with pytest.raises(RunInterrupted, match="the end of epoch 1"):
        run(tmp_path / "cut")
    monkeypatch.delenv("PGL_FAST_SIGNAL_AT")
    resumed = run(tmp_path / "cut", resume="auto")
    assert rows(tmp_path / "cut") == rows(tmp_path / "full") and len(rows(tmp_path / "full")) == 2
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


class Batches:
    """An iterable of batches with no state to save."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_a_loader_whose_order_cannot_be_saved_is_warned_about_at_the_start(tmp_path, capsys):
    x, y = images(8, channels=1)
    learner = pgl_fast.LocalLearner(model(1), DGL())
    fit(learner, Batches([((x.double() - 128) / 64, y)]), tmp_path / "run", epochs=1)
    err = capsys.readouterr().err
    assert err.count("warning: train_data's order cannot be saved (a Batches has no state to save)") == 1
    header = json.loads((tmp_path / "run" / "header.json").read_text())
    assert any("cannot be saved" in w for w in header["warnings"])


# -- Ctrl-C ----------------------------------------------------------------------------------------
def test_an_interrupt_is_a_keyboard_interrupt_that_except_exception_does_not_swallow(tmp_path, monkeypatch):
    monkeypatch.setenv("PGL_FAST_SIGNAL_AT", "1:1:INT")
    learner = pgl_fast.LocalLearner(model(1), DGL())
    with pytest.raises(KeyboardInterrupt) as e:
        try:
            fit(learner, images(16), tmp_path / "run")
        except Exception:  # what a user's retry loop writes: it must not catch Ctrl-C
            pytest.fail("RunInterrupted was caught by except Exception")
    assert isinstance(e.value, RunInterrupted) and e.value.code == 130
    assert "epoch 1, step 1/2" in str(e.value)


# -- refusals in the API's words -------------------------------------------------------------------
def test_refusals_name_the_constructors_arguments_not_the_cli_flags(tmp_path):
    out = tmp_path / "run"
    fit(pgl_fast.LocalLearner(model(1), DGL()), images(16), out, epochs=1)
    with pytest.raises(UserError) as e:
        fit(pgl_fast.LocalLearner(model(1), DGL()), images(16), out, epochs=1)
    msg = str(e.value)
    assert 'use resume="auto", another output_dir, or overwrite=True' in msg and "--" not in msg
    with pytest.raises(UserError) as e:
        fit(pgl_fast.LocalLearner(model(1), DGL()), images(16), tmp_path / "other", resume=str(tmp_path / "no.pt"))
    assert str(e.value) == f'resume="{tmp_path / "no.pt"}": no such checkpoint file'
    empty = tmp_path / "empty"
    os.makedirs(empty / "checkpoints")
    (empty / "checkpoints" / "ckpt-e0001-s000000.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match=r'^resume="auto": every checkpoint in .* is corrupt$'):
        fit(pgl_fast.LocalLearner(model(1), DGL()), images(16), empty, resume="auto")


class StatefulBatches:
    """A loader with its own resumable state (the protocol of torchdata's StatefulDataLoader): each
    epoch's order comes from a generator it owns, and state_dict/load_state_dict carry it."""

    def __init__(self, x, y, seed):
        self.x, self.y, self.g = x, y, torch.Generator().manual_seed(seed)

    def __len__(self):
        return 3

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.g)
        return iter([(self.x[i], self.y[i]) for i in perm.split(8)])

    def state_dict(self):
        return {"rng": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["rng"])


def test_resume_over_a_stateful_loader_restores_its_state(tmp_path, monkeypatch):
    x, y = images(24, channels=1, seed=3)

    def run(out, **kw):
        learner = pgl_fast.LocalLearner(model(1), DGL(), lr_schedule=lambda e: 0.05)
        trainer = pgl_fast.Trainer(learner, StatefulBatches((x.double() - 128) / 64, y, 9), None, epochs=2,
                                   batch_size=8, output_dir=str(out), progress="off", heartbeat=0, **kw)
        assert not any("cannot be saved" in w for w in trainer.warnings)
        trainer.fit()
        return learner

    full = run(tmp_path / "full")
    monkeypatch.setenv("PGL_FAST_SIGNAL_AT", "1:3:INT")
    with pytest.raises(RunInterrupted):
        run(tmp_path / "cut")
    monkeypatch.delenv("PGL_FAST_SIGNAL_AT")
    resumed = run(tmp_path / "cut", resume="auto")
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
