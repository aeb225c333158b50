"""Train a CIFAR ResNet with BP, DGL, InfoPro or PGL.

    python -m pgl_fast.train --dataset imagefolder --data-dir .cache/cifar10-jpeg \\
        --arch resnet32 --method pgl -J 16 --aux adapt -P 10 -Q 2

Outputs go to ``--output-dir``: ``config.json`` (resolved config), ``header.json`` (versions,
device), ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``checkpoints/``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from . import checkpoint as ckpt
from . import data as data_mod
from .config import ConfigError, TrainConfig, config_from_args
from .engine import Executor, LossSpec, StepStats
from .metrics import JsonlWriter, PeakMemory, run_header, write_json_atomic
from .network import LocalNet
from .schedule import lr_at_epoch, phase_of_epoch


class UserError(Exception):
    """Anything the user can fix: printed as one line, exit code 2."""


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: no CUDA GPU is available here; use --device cpu or auto")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {cfg.device}: only {torch.cuda.device_count()} GPU(s) visible")
    if cfg.cuda_graphs and dev.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU (device here: cpu); drop the flag to train eagerly")
    if cfg.amp and cfg.amp_dtype == "fp16" and dev.type != "cuda":
        raise UserError("--amp-dtype fp16 needs a CUDA GPU; use the default bf16 on the CPU")
    return dev


def resolve_head_kernels(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.head_kernels == "eager" or cfg.method == "bp" or cfg.compile:  # --compile: Inductor fuses the heads
        return False
    if cfg.head_kernels == "auto" and device.type != "cuda":
        return False
    if cfg.aux in ("mlpsr",):
        if cfg.head_kernels == "triton":
            raise UserError("--head-kernels triton: the mlpsr head has no fused kernel; use --head-kernels eager")
        return False
    from .kernels import triton_available

    ok, reason = triton_available(device)
    if not ok:
        if cfg.head_kernels == "triton":
            raise UserError(f"--head-kernels triton: {reason}")
        return False
    return True


def build_network(cfg: TrainConfig, num_classes: int, image_size: int) -> LocalNet:
    infopro = cfg.method == "infopro"
    return LocalNet(
        # bp keeps the J-module split too: it only sets the checkpoint segments (--checkpoint-global)
        cfg.arch, cfg.modules, num_classes=num_classes, image_size=image_size, split=cfg.split,
        split_recipe=cfg.split_recipe, aux=None if cfg.method == "bp" else cfg.aux,
        aux_widen=cfg.aux_widen, aux_feature_dim=cfg.aux_feature_dim,
        head_out_dim=cfg.aux_feature_dim if infopro and cfg.infopro_loss == "contrast" else None,
        decoders=infopro, droprate=cfg.droprate,
    )


def plan_memory(cfg: TrainConfig, net: LocalNet, image_size: int, num_classes: int):
    """(segments for the global steps, text of the plan). The planner measures only when asked:
    ``--memory-budget``, ``--global-segments auto`` or ``--plan``."""
    from . import planner

    planned = cfg.memory_budget is not None or cfg.plan or (cfg.checkpoint_global and cfg.global_segments == "auto")
    if not planned:
        if not cfg.checkpoint_global:
            return None, "global steps: no checkpointing"
        segs = planner.candidate_segments(cfg.global_segments, net, cfg.arch, image_size)
        return segs, f"global steps: checkpoint segments = {cfg.global_segments} ({len(segs)})"
    pred = planner.predict(method=cfg.method, arch=cfg.arch, J=cfg.modules, aux=cfg.aux, batch=cfg.batch_size,
                           dtype=("bf16" if cfg.amp_dtype == "bf16" else "fp16") if cfg.amp else "fp32",
                           image_size=image_size, split=cfg.split, num_classes=num_classes,
                           lean_blocks=cfg.lean_blocks)
    try:
        chosen, why = planner.choose(pred, cfg.memory_budget)
    except planner.PlanError as e:
        raise UserError(str(e)) from None
    segs = planner.candidate_segments(chosen, net, cfg.arch, image_size)
    return segs, planner.format_plan(pred, chosen) + f"\n  choice: {chosen}: {why}"


def build_executor(cfg: TrainConfig, net: LocalNet, segments: list[tuple[int, int]] | None = None) -> Executor:
    """The executor a run of ``cfg`` trains ``net`` with (also used by the profiler)."""
    amp_dtype = None
    if cfg.amp:
        amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    return Executor(net, method=cfg.method, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                    weight_decay=cfg.weight_decay, loss_spec=loss_spec(cfg, net.J), amp_dtype=amp_dtype,
                    checkpoint_global=cfg.checkpoint_global, channels_last=cfg.channels_last, segments=segments,
                    compile_mode=cfg.compile_mode if cfg.compile else None)


def loss_spec(cfg: TrainConfig, J: int) -> LossSpec:
    if cfg.method != "infopro":
        return LossSpec(kind="ce")
    return LossSpec(kind="infopro", infopro_contrast=cfg.infopro_loss == "contrast",
                    lambdas=tuple(cfg.infopro_lambdas(j) for j in range(J - 1)))


def format_table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def describe(cfg: TrainConfig, net: LocalNet, image_size: int) -> str:
    rows = net.describe()
    counts = net.count_parameters()
    head = (f"{cfg.arch} split into J={net.J} modules (--split {cfg.split}), method {cfg.method}, "
            f"aux {'none' if cfg.method == 'bp' else cfg.aux}, input {image_size}x{image_size}")
    total = (f"parameters: backbone {counts['backbone']:,}  aux {counts['aux']:,}  "
             f"total {counts['total']:,} ({counts['total'] / 1e6:.3f}M)")
    return "\n".join([head, format_table(rows, list(rows[0].keys())), total])


def _progress(cfg: TrainConfig, total: int, desc: str):
    enabled = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--output-dir {path}: not writable ({e.strerror or e})") from None


def _test_batches(data, spec, cfg: TrainConfig):
    n = int(data.test_y.shape[0])
    for i in range(0, n, cfg.test_batch_size):
        x = data_mod.normalize(data.test_x[i:i + cfg.test_batch_size], spec, torch.float32, cfg.channels_last)
        yield x, data.test_y[i:i + cfg.test_batch_size]


def _check_finite(tr: dict, epoch: int, phase: str, J: int, *, partial: bool = False) -> None:
    """Raise NonFiniteError naming the *first* non-finite event (loss or gradient) of the epoch:
    epoch, step, phase and module."""
    events = [(s, order, j, what) for order, (key, what) in enumerate((("first_bad", "loss"), ("first_bad_grad", "gradient")))
              for j, s in enumerate(tr[key]) if s >= 0]
    if events:
        s, _, j, what = min(events)
        kind = "final loss" if j == J - 1 else "local loss"
        raise NonFiniteError(
            f"non-finite {what} at epoch {epoch + 1}, step {s + 1}, phase {phase}, module {j} ({kind})"
            f"{' (found before a mid-epoch checkpoint)' if partial else ''}")


def _kill_hook(epoch: int, step) -> None:
    """Test hook: ``PGL_FAST_KILL_AT=epoch:step`` (1-based epoch, completed steps of it, or ``end``
    once the epoch's checkpoint and metrics line are written) SIGKILLs this process right there, to
    test resume from a real, abrupt death."""
    spec = os.environ.get("PGL_FAST_KILL_AT")
    if spec and spec == f"{epoch + 1}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def run(cfg: TrainConfig) -> dict:
    device = resolve_device(cfg)
    use_kernels = resolve_head_kernels(cfg, device)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if cfg.describe or cfg.plan:
        spec_size = 96 if cfg.recipe_name == "stl10" else 32
        net = build_network(cfg, 10, spec_size)
        print(describe(cfg, net, spec_size))
        if cfg.plan:
            print(plan_memory(cfg, net, spec_size, 10)[1])
        return {}

    prepare_output_dir(cfg.output_dir)
    resume_state = None
    if cfg.resume is not None:
        try:
            resume_state = ckpt.find_resume(cfg.resume, cfg.output_dir, cfg.to_dict())
        except ckpt.CheckpointError as e:
            raise UserError(str(e)) from None
    try:
        data = data_mod.load_dataset(
            cfg.dataset, cfg.data_dir, device=device, train_subset=cfg.train_subset,
            test_subset=cfg.test_subset, subset_seed=cfg.seed, download=not cfg.no_download,
            cache_dir=cfg.cache_dir, recipe=cfg.recipe, synthetic_train=cfg.synthetic_train,
            synthetic_test=cfg.synthetic_test)
    except data_mod.DataError as e:
        raise UserError(str(e)) from None
    spec = data.spec
    net = build_network(cfg, spec.num_classes, spec.image_size).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.set_head_kernels(use_kernels)
    net.set_lean_blocks(cfg.lean_blocks)
    segments, plan_text = plan_memory(cfg, net, spec.image_size, spec.num_classes)
    exe = build_executor(cfg, net, segments)
    gen = data_mod.make_generator(cfg.seed, device)

    # -- the run's state, restored from a checkpoint when resuming --------------------------------
    start_epoch, start_step = 0, 0
    records: list[dict] = []
    best_acc, best_epoch, elapsed = -1.0, -1, 0.0
    peak_by_phase: dict[str, float] = {}
    mid_epoch = None
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        for opt, sd in zip(exe.optimizers, resume_state["optimizers"]):
            opt.load_state_dict(sd)
        if exe.scaler is not None and resume_state.get("scaler"):
            exe.scaler.load_state_dict(resume_state["scaler"])
        ckpt.set_rng_state(resume_state["rng"])
        gen.set_state(resume_state["data_generator"].to(gen.get_state().device))
        start_epoch, start_step = resume_state["epoch"], resume_state["step"]
        records = list(resume_state["records"])
        best_acc, best_epoch = resume_state["best_acc"], resume_state["best_epoch"]
        elapsed, peak_by_phase = resume_state["elapsed"], dict(resume_state["peak_by_phase"])
        mid_epoch = resume_state.get("mid_epoch")
        print(f"resumed from {resume_state['path']}: {start_epoch} epochs"
              f"{f' and {start_step} steps' if start_step else ''} done", flush=True)

    header = run_header(cfg.to_dict(), device)
    header.update({"split_ranges": net.ranges, "parameters": net.count_parameters(), "memory_plan": plan_text,
                   "global_segments": segments,
                   "head_kernels": "triton" if use_kernels else "eager",
                   "compile": cfg.compile_mode if cfg.compile else None,
                   "train_images": int(data.train_y.shape[0]), "test_images": int(data.test_y.shape[0]),
                   "resumed_from": resume_state["path"] if resume_state else None})
    cfg.save(os.path.join(cfg.output_dir, "config.json"))
    write_json_atomic(os.path.join(cfg.output_dir, "header.json"), header)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    # metrics.jsonl is exactly the checkpoint's epoch records: no duplicated or missing epochs
    with open(metrics_path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(metrics_path + ".tmp", metrics_path)
    metrics = JsonlWriter(metrics_path)
    print(f"pgl_fast {header['pgl_fast']} | torch {header['torch']} | device {header['device_name']} "
          f"({device}) | {cfg.method} {cfg.arch} J={net.J} aux={cfg.aux if cfg.method != 'bp' else '-'} "
          f"| {header['train_images']} train / {header['test_images']} test images")
    print(describe(cfg, net, spec.image_size))
    print(plan_text)

    augment = data_mod.BatchAugmenter(spec, device)
    memory = PeakMemory(device)
    # one statistics object for the whole run: captured graphs hold its addresses
    stats = StepStats(net.J, device)
    graphed = None
    if cfg.cuda_graphs:
        from .graphs import GraphedLocalSteps

        graphed = GraphedLocalSteps(exe, stats)
    n_train = int(data.train_y.shape[0])
    t_start = time.time() - elapsed

    def save(epoch_done: int, step: int, mid: dict | None) -> None:
        state = {
            "model": net.state_dict(), "optimizers": [o.state_dict() for o in exe.optimizers],
            "scaler": exe.scaler.state_dict() if exe.scaler is not None else None,
            "rng": ckpt.rng_state(), "data_generator": gen.get_state().cpu(),
            "epoch": epoch_done, "step": step, "mid_epoch": mid,
            "phase": phase_of_epoch(cfg.method, min(epoch_done, cfg.epochs - 1), cfg.period, cfg.duration),
            "records": records, "best_acc": best_acc, "best_epoch": best_epoch,
            "elapsed": time.time() - t_start, "peak_by_phase": peak_by_phase, "config": cfg.to_dict(),
            "versions": {"torch": str(torch.__version__), "pgl_fast": str(header["pgl_fast"])},
        }
        ckpt.save_checkpoint(cfg.output_dir, state, cfg.keep_checkpoints)

    for epoch in range(start_epoch, cfg.epochs):
        phase = "bp" if cfg.method == "bp" else phase_of_epoch(cfg.method, epoch, cfg.period, cfg.duration)
        exe_phase = "global" if phase in ("global", "bp") else "local"
        lr = lr_at_epoch(epoch, base_lr=cfg.lr, epochs=cfg.epochs, sched=cfg.sched,
                         warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                         milestones=(cfg.epochs // 2, cfg.epochs * 3 // 4))
        exe.set_lr(lr)
        print(f"epoch {epoch + 1}/{cfg.epochs} phase={phase} lr={lr:.5g}", flush=True)
        memory.reset()
        net.train()
        stats.reset()
        first_step, epoch_seconds = 0, 0.0
        if mid_epoch is not None and epoch == start_epoch and start_step > 0:
            # resume inside this epoch: same batch order, same accumulators, same generator state
            perm = mid_epoch["perm"].to(device)
            if perm.numel() != (n_train // cfg.batch_size * cfg.batch_size if cfg.drop_last else n_train):
                raise UserError(f"--resume: the checkpoint was taken inside an epoch of {perm.numel()} images; this "
                                f"run has {n_train} (use the original data flags)")
            batches = list(perm.split(cfg.batch_size))
            if cfg.drop_last and batches and batches[-1].shape[0] < cfg.batch_size:
                batches.pop()
            stats.load_state_dict(mid_epoch["stats"])
            first_step, epoch_seconds = start_step, mid_epoch["seconds"]
        else:
            batches = data_mod.epoch_batches(n_train, cfg.batch_size, generator=gen, drop_last=cfg.drop_last,
                                             device=device)
        perm_all = torch.cat(batches) if cfg.save_every and batches else None
        bar = _progress(cfg, len(batches), f"epoch {epoch + 1} {phase}")
        if bar is not None and first_step:
            bar.update(first_step)
        t0 = time.time()
        for step in range(first_step, len(batches)):
            idx = batches[step]
            xb = augment(data.train_x[idx], gen)
            x = data_mod.normalize(xb, spec, torch.float32, cfg.channels_last)
            image01 = xb.float().div_(255) if cfg.method == "infopro" else None
            if graphed is not None and exe_phase == "local":
                graphed(x, data.train_y[idx], image01)
            else:
                exe.train_step(exe_phase, x, data.train_y[idx], stats, image01)
            if bar is not None:
                bar.update(1)
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < len(batches):
                _check_finite(stats.read(), epoch, phase, net.J, partial=True)  # never save poisoned weights
                save(epoch, done, {"perm": perm_all.cpu(), "stats": stats.state_dict(),
                                   "seconds": epoch_seconds + time.time() - t0})
            _kill_hook(epoch, done)
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = epoch_seconds + time.time() - t0
        tr = stats.read()
        mem = memory.read()
        _check_finite(tr, epoch, phase, net.J)
        ev = exe.evaluate(_test_batches(data, spec, cfg), not cfg.no_head_eval)
        if ev["test_acc"] > best_acc:
            best_acc, best_epoch = ev["test_acc"], epoch + 1
        if mem["peak_mib"] is not None:
            peak_by_phase[phase] = max(peak_by_phase.get(phase, 0.0), mem["peak_mib"])
        record = {
            "event": "epoch", "epoch": epoch + 1, "phase": phase, "lr": lr,
            "train_loss": tr["losses"][-1], "module_losses": tr["losses"], "train_acc": tr["train_acc"],
            "test_acc": ev["test_acc"], "test_loss": ev["test_loss"], "head_acc": ev["head_acc"],
            "images_per_s": tr["samples"] / max(train_seconds, 1e-9), "epoch_seconds": train_seconds,
            "peak_mem_mib": mem["peak_mib"], "peak_reserved_mib": mem["peak_reserved_mib"],
            "mem_kind": mem["kind"],
        }
        records.append(record)
        # checkpoint first, then the metrics line: a kill in between is repaired on resume, since
        # metrics.jsonl is rewritten from the checkpoint's records
        save(epoch + 1, 0, None)
        metrics.write(record)
        _kill_hook(epoch, "end")
        print(f"epoch {epoch + 1:>4} {phase:<6} lr {lr:.4f} loss {tr['losses'][-1]:.4f} "
              f"train {100 * tr['train_acc']:.2f}% test {100 * ev['test_acc']:.2f}% "
              f"({record['images_per_s']:.0f} img/s, {train_seconds:.1f}s, peak {mem['peak_mib'] or 0:.0f} MiB)",
              flush=True)

    last = records[-1] if records else None
    counts = net.count_parameters()
    summary = {
        "final_test_acc": last["test_acc"] if last else None,
        "best_test_acc": best_acc, "best_epoch": best_epoch, "epochs": cfg.epochs,
        "parameters": counts, "parameters_with_aux": counts["total"], "parameters_without_aux": counts["backbone"],
        "wall_seconds": time.time() - t_start, "peak_mem_mib_by_phase": peak_by_phase,
        "mem_kind": memory.read()["kind"], "method": cfg.method, "arch": cfg.arch, "J": net.J,
        "aux": None if cfg.method == "bp" else cfg.aux, "seed": cfg.seed,
    }
    write_json_atomic(os.path.join(cfg.output_dir, "summary.json"), summary)
    print(f"done: final {100 * summary['final_test_acc']:.2f}%  best {100 * best_acc:.2f}% (epoch {best_epoch})  "
          f"wall {summary['wall_seconds']:.0f}s")
    return summary


class NonFiniteError(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        run(cfg)
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the last checkpoint is intact", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
