"""Atomic checkpoints and resume.

A checkpoint is ``checkpoints/ckpt-e{epoch:04d}-s{step:06d}.pt``: written to a temporary file,
fsynced, then renamed into place, so a crash leaves either the old set of checkpoints or the new
one, never a half-written file under a final name. The newest ``keep`` are kept; older ones are
deleted only after the new one exists. Loading uses ``weights_only=True``: a checkpoint can hold
tensors, numbers, strings and containers, never code.
"""
from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

from ..errors import UserError
from ..jsonio import atomic_write
from ..runtime.rng import seed_rank_streams

FORMAT_VERSION = 1
# Fields that define what the weights *are*: resuming across a change in any of them is an error.
STRUCTURAL_FIELDS = ("method", "arch", "model", "cuts", "cifar_stem", "modules", "split", "aux", "aux_widen",
                     "aux_feature_dim", "dataset",
                     "infopro_loss", "recipe", "droprate", "ixx_1", "ixy_1", "ixx_2", "ixy_2",
                     # a pipeline's checkpoint is one file per stage: resume with the same stages
                     "pipeline", "pipeline_balance", "pipeline_micro_batches")
# what a checkpoint from before a structural field existed meant by it (no pipeline: one process)
_ABSENT = {"pipeline": 1, "pipeline_balance": "even", "pipeline_micro_batches": 1,
           "image_size": None, "skip_bad_images": False, "data_pipeline": "auto"}
# Fields that define the data order and what each sample becomes: a resumed run must see the same
# images in the same order, cropped and normalised the same way (the number of stream workers is
# not one of them: a streamed sample's augmentation is a function of its index, not of the worker).
DATA_FIELDS = ("data_dir", "train_subset", "synthetic_train", "seed", "image_size", "skip_bad_images", "data_pipeline")
# ... and, inside an epoch, the same batches.
MID_EPOCH_FIELDS = ("batch_size", "drop_last")
# Fields that define the learning-rate schedule and the PGL phase of every epoch: a resume that
# changes one of them changes the rest of the run's trajectory, so it is refused unless asked for
# (--allow-schedule-change), and then recorded.
SCHEDULE_FIELDS = ("epochs", "lr", "sched", "warmup_epochs", "warmup_lr", "period", "duration")
# Optimizer hyper-parameters live in the optimizers' saved state and are restored from it on
# resume: a new value on the command line would be silently ignored, so a change is always refused.
OPTIMIZER_FIELDS = ("momentum", "no_nesterov", "weight_decay")
_NAME = re.compile(r"ckpt-e(\d+)-s(\d+)\.pt$")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_name(epoch: int, step: int) -> str:
    """``epoch`` = completed epochs; ``step`` = completed steps of the epoch in progress."""
    return f"ckpt-e{epoch:04d}-s{step:06d}.pt"


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint files, oldest first (temporary files are never listed)."""
    d = checkpoint_dir(output_dir)
    if not os.path.isdir(d):
        return []
    found = []
    for name in os.listdir(d):
        m = _NAME.fullmatch(name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), os.path.join(d, name)))
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached": float(np_state[4]), "state": torch.from_numpy(np_state[1].astype(np.int64))},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str, state: dict, keep: int) -> str:
    d = checkpoint_dir(output_dir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, checkpoint_name(state["epoch"], state["step"]))
    state = dict(state, format_version=FORMAT_VERSION)
    # the folder is fsynced too: a checkpoint that a power cut un-renames is lost work
    atomic_write(path, lambda f: torch.save(state, f), binary=True, sync_dir=True)
    # A resumed-from-older run supersedes the checkpoints that came after its starting point: drop
    # them first, so that pruning (which goes by position) keeps the one just written.
    here = (state["epoch"], state["step"])
    for later in list_checkpoints(output_dir):
        m = _NAME.search(os.path.basename(later))
        if (int(m.group(1)), int(m.group(2))) > here:
            try:
                os.remove(later)
            except OSError:
                pass
    for old in list_checkpoints(output_dir)[:-keep]:
        try:
            os.remove(old)
        except OSError:
            pass
    return path


def load_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--resume {path}: no such checkpoint file") from None
    except Exception as e:  # truncated, corrupt, or holding something other than weights
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"checkpoint {path} is not a pgl_fast checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {state['format_version']}; this pgl_fast reads {FORMAT_VERSION}")
    state["path"] = path
    return state


def schedule_changes(state: dict, config: dict) -> dict:
    """{field: checkpoint's value} for every schedule field the resumed run changes."""
    saved = state.get("config", {})
    return {k: saved.get(k) for k in SCHEDULE_FIELDS if k in saved and saved.get(k) != config.get(k)}


def check_compatible(state: dict, config: dict, path: str, allow_schedule_change: bool = False) -> None:
    saved = state.get("config", {})
    fields = STRUCTURAL_FIELDS + DATA_FIELDS + (MID_EPOCH_FIELDS if state.get("step", 0) > 0 else ())
    diffs = [f"{k}: checkpoint {saved.get(k, _ABSENT.get(k))!r} vs now {config.get(k, _ABSENT.get(k))!r}"
             for k in fields if saved.get(k, _ABSENT.get(k)) != config.get(k, _ABSENT.get(k))]
    if diffs:
        raise UserError(f"checkpoint {path} was made by a different run ({'; '.join(diffs)})")
    opt = [f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}"
           for k in OPTIMIZER_FIELDS if k in saved and saved.get(k) != config.get(k)]
    if opt:
        raise UserError(f"checkpoint {path}: the optimizer state it holds was made with other settings "
                              f"({'; '.join(opt)}); resume with the original values")
    changed = schedule_changes(state, config)
    if changed and not allow_schedule_change:
        what = "; ".join(f"{k}: checkpoint {v!r} vs now {config.get(k)!r}" for k, v in changed.items())
        raise UserError(f"checkpoint {path}: resuming would change the schedule ({what}); resume with the "
                              "original values, or pass --allow-schedule-change to continue on the new schedule")
    if "epochs" in changed and state.get("epoch", 0) + (state.get("step", 0) > 0) > config.get("epochs", 0):
        raise UserError(f"checkpoint {path}: --epochs {config.get('epochs')} is fewer than the "
                              f"{state.get('epoch')} epochs{' and a part' if state.get('step', 0) else ''} it has done")


def find_resume(resume: str, output_dir: str, config: dict, allow_schedule_change: bool = False) -> dict | None:
    """The checkpoint to resume from: an explicit path (any problem is an error), or ``auto``: the
    newest complete checkpoint in ``output_dir``, skipping corrupt ones with a warning, or None when
    there is no checkpoint at all (``auto`` then means: start a new run)."""
    if resume != "auto":
        state = load_checkpoint(resume)
        check_compatible(state, config, resume, allow_schedule_change)
        return state
    candidates = list_checkpoints(output_dir)
    if not candidates:
        return None
    for path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except UserError as e:
            print(f"warning: {e}; falling back to an older checkpoint", flush=True)
            continue
        check_compatible(state, config, path, allow_schedule_change)
        return state
    raise UserError(f"--resume auto: every checkpoint in {checkpoint_dir(output_dir)} is corrupt")


def find_resume_state(resume: str | None, output_dir: str, config: dict, allow_schedule_change: bool = False):
    """The checkpoint state of an explicit ``resume`` file (None for None or "auto", which is
    resolved under the output dir's lock), checked against ``config``."""
    if resume is None or resume == "auto":
        return None
    return find_resume(resume, output_dir, config, allow_schedule_change)


def restore_rank_rng(state: dict, rank: int, world: int, seed: int) -> str | None:
    """Put back this rank's random streams from the checkpoint ``state``: its own, saved by every
    rank (``rng_ranks``), or in a single process the one saved. A checkpoint without one state per
    rank of this run (written by another number of ranks, or before they were saved) restores the
    saved state and then gives each rank's default generators a stream of its own derived from
    (seed, rank, epoch, step); the returned line says so (None otherwise)."""
    per_rank = state.get("rng_ranks")
    if world == 1:
        set_rng_state(state["rng"])
        return None
    if per_rank is not None and len(per_rank) == world:
        set_rng_state(per_rank[rank])
        return None
    set_rng_state(state["rng"])
    seed_rank_streams(seed, rank, state["epoch"], state["step"])
    saved = f"{len(per_rank)} rank(s)" if per_rank is not None else "one process (rank 0)"
    return (f"the checkpoint holds the random streams of {saved}, this run has {world} ranks: each rank's "
            "dropout stream continues from one derived from (seed, rank, epoch, step), not the saved one")
