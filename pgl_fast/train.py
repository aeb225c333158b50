"""Train with BP, DGL, InfoPro or PGL from the command line: a CIFAR ResNet preset, a torchvision
model (``--arch torchvision:resnet18 --cuts layer1,layer2,layer3``) or a user's factory
(``--model package.module:factory --cuts ...``).

    python -m pgl_fast.train --dataset imagefolder --data-dir .cache/cifar10-jpeg \\
        --arch resnet32 --method pgl -J 16 --aux adapt -P 10 -Q 2

Outputs go to ``--output-dir``: ``config.json`` (resolved config), ``header.json`` (versions,
device), ``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``checkpoints/``. This module
is the command line only: it builds through :mod:`pgl_fast.config.build` and trains with
:class:`pgl_fast.training.trainer.Trainer`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys

import torch

from .training import checkpoint as ckpt
from . import data as data_mod
from .data import stream as data_stream
from .memory import planner
from .training import rundir
from .config.build import DTYPES, build_learner, build_model, resolve_device, resolve_head_kernels
from .config import TrainConfig, config_from_args, explicit_fields
from .distributed import DistContext, launched_by_torchrun
from .distributed.cost_model import measured_module_times
from .distributed.pipeline import PipelineError, build_stage, exit_on_error, init_pipeline_group
from .distributed.strategies import Pipeline
from .errors import UserError
from .models.local_model import LocalModel
from .runtime import autotune
from .runtime.head_select import configure_head_kernels
from .runtime.optim import sgd
from .runtime.rng import seed_everything
from .training.trainer import NonFiniteError, RunInterrupted, Trainer


def format_table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def describe(cfg: TrainConfig, net: LocalModel, image_size: int) -> str:
    rows = net.describe()
    counts = net.count_parameters()
    how = f"--cuts {cfg.cuts}" if cfg.custom_model else f"--split {cfg.split}"
    name = cfg.model or cfg.arch
    head = (f"{name} split into J={net.J} modules ({how}), method {cfg.method}, "
            f"aux {cfg.aux if net.heads else 'none'}, input {image_size}x{image_size}")
    ema = f"ema {counts['ema']:,}  " if "ema" in counts else ""
    total = (f"parameters: backbone {counts['backbone']:,}  aux {counts['aux']:,}  {ema}"
             f"total {counts['total']:,} ({counts['total'] / 1e6:.3f}M)")
    return "\n".join([head, format_table(rows, list(rows[0].keys())), total])


def _flag_names() -> dict[str, str]:
    """Every long and short flag of the CLI -> its config field."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        for flag in f.metadata["flags"] or ("--" + f.name.replace("_", "-"),):
            out[flag] = f.name
    return out


def _cli_args(cfg: TrainConfig, argv: list[str] | None) -> list[str]:
    """The flags this run was started with: ``argv``, or (for a run started in-process without
    one) every flag whose value differs from its default."""
    if argv is not None:
        return list(argv)
    out = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if v == f.default:
            continue
        flag = (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[-1]
        out += [flag] if isinstance(v, bool) else [flag, str(v)]
    return out


def command_line(cfg: TrainConfig, argv: list[str] | None) -> str:
    return shlex.join([sys.executable, "-m", "pgl_fast.train", *_cli_args(cfg, argv)])


def resume_command(cfg: TrainConfig, argv: list[str] | None) -> str:
    """The command line that continues this run: the one it was started with, minus
    --resume/--overwrite/--allow-schedule-change, plus ``--resume auto``."""
    drop = {"resume", "overwrite", "allow_schedule_change"}
    argv = _cli_args(cfg, argv)
    names = _flag_names()
    longs = [n for n in names if n.startswith("--")]
    kept, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name, eq, _ = tok.partition("=")
        dest = names.get(name)
        if dest is None and name.startswith("--") and len(name) > 2:  # argparse accepts unique prefixes
            hits = {names[n] for n in longs if n.startswith(name)}
            dest = hits.pop() if len(hits) == 1 else None
        if dest in drop:
            i += 1 if eq or dest != "resume" else 2
            continue
        kept.append(tok)
        i += 1
    return shlex.join([sys.executable, "-m", "pgl_fast.train", *kept, "--resume", "auto"])


def run(cfg: TrainConfig, argv: list[str] | None = None, explicit: set[str] | None = None) -> dict:
    """Train ``cfg``. ``argv``, the command line it came from, is what the resume hint after an
    interrupt is built from. ``explicit``: the fields set on the command line
    (``config.explicit_fields``), for the warnings about flags that have no effect; None compares
    with the defaults instead. The output dir's lock and the signal handlers end with the call, and
    the intra-op thread count that ``--threads`` or the CPU tuner set is put back."""
    threads = torch.get_num_threads()
    try:
        return _run(cfg, argv, explicit)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, argv: list[str] | None, explicit: set[str] | None) -> dict:
    warnings = cfg.no_effect_warnings(explicit)

    def warn() -> None:  # once every check has passed: bad input stays a one-line error
        for w in warnings:
            print(w, file=sys.stderr, flush=True)

    # under torchrun, WORLD_SIZE > 1 means data parallel unless --pipeline S asks for S stages
    pipe_ctx = None
    if cfg.pipeline > 1 and not (cfg.describe or cfg.plan):
        S = cfg.pipeline
        if not launched_by_torchrun():
            raise UserError(f"--pipeline {S} runs one stage per process: start it with "
                            f"torchrun --nproc_per_node={S} -m pgl_fast.train ...")
        world = os.environ.get("WORLD_SIZE", "?")
        if world != str(S):
            raise UserError(f"--pipeline {S}: WORLD_SIZE is {world}, it must equal S (one rank per stage; "
                            "pipelining combined with data parallel is not supported)")
        pipe_ctx = init_pipeline_group(timeout_s=cfg.pipeline_timeout, device=cfg.device)
        ctx = DistContext(device=pipe_ctx.device)  # no data parallel: each stage is its own replica
    else:
        ctx = DistContext.from_env(cfg.device)  # torchrun's rank and device, or the single process
    try:
        return _run_on(cfg, argv, explicit, ctx, warnings, warn, pipe_ctx)
    finally:
        (pipe_ctx or ctx).shutdown()


def recorded_cpu_choice(cfg: TrainConfig, resume_state: dict | None) -> dict | None:
    """What the run being resumed trained with (header.json's ``cpu_tune.used`` next to its
    checkpoints), or None for a new run or a run that recorded none."""
    if cfg.resume is None:
        return None
    if resume_state is not None:  # an explicit checkpoint file: <run dir>/checkpoints/<name>
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume_state["path"])))
    elif ckpt.list_checkpoints(cfg.output_dir):  # --resume auto with a checkpoint to continue
        run_dir = cfg.output_dir
    else:
        return None
    try:
        with open(os.path.join(run_dir, "header.json")) as f:
            used = json.load(f).get("cpu_tune", {}).get("used")
    except (OSError, ValueError):
        return None
    return used if isinstance(used, dict) else None


def tune_cpu(cfg: TrainConfig, net, device, group, *, batch: int, image_size: int, steps: int | None = None,
             recorded: dict | None = None) -> tuple[TrainConfig, dict]:
    """``--threads`` and ``--cpu-tune``: the thread count, memory format, optimizer kernel and
    ``--compile`` this run trains with (``runtime.autotune``), and their record for header.json.
    ``steps``: the run's training steps (it is tuned only if long enough); ``recorded``: what the
    run being resumed trained with, reused as it was. The returned config carries the choice
    (config.json keeps the flags as given)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    record = {"mode": cfg.cpu_tune}
    forced = {}
    if cfg.threads > 0:
        forced["threads"] = cfg.threads
    if cfg.channels_last:
        forced["channels_last"] = True
    if cfg.optimizer_kernel != "auto":
        forced["optimizer_kernel"] = cfg.optimizer_kernel
    if cfg.compile:
        forced["compile"] = True
    choice = None
    if cfg.cpu_tune != "auto":
        record["reason"] = "--cpu-tune off"
    elif device.type != "cpu" or group.distributed:
        record["reason"] = "tunes single-process CPU runs only"
    elif recorded is not None:
        # a resumed run continues with what it trained with; a flag given now still wins
        choice = {k: recorded[k] for k in ("threads", "channels_last", "optimizer_kernel", "compile") if k in recorded}
        choice.update(forced)
        record.update({"reason": "resumed: the choice recorded by the run it continues", "choice": choice,
                       "forced": sorted(forced)})
    else:
        try:
            dataclasses.replace(cfg, compile=True)
            compile_blocker = None
        except UserError as e:  # the run's other flags exclude --compile (the message says which)
            compile_blocker = str(e)

        def build(net_copy, channels_last, compile=False):
            learner = build_learner(dataclasses.replace(cfg, channels_last=channels_last, compile=compile,
                                                        global_memory="none", checkpoint_global=False), net_copy)
            learner.start_epoch(0)
            return learner

        def make_optimizer(params, kernel):
            return sgd(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                       kernel=kernel)(params)

        shape = {"arch": cfg.model or cfg.arch, "J": cfg.modules, "aux": cfg.aux, "split": cfg.split,
                 "method": cfg.method, "batch": batch, "image_size": image_size, "amp": cfg.amp,
                 "lean_blocks": cfg.lean_blocks}
        result = autotune.tune(net=net, build=build, make_optimizer=make_optimizer, shape=shape, batch=batch,
                               image_size=image_size, forced=forced, steps=steps, compile_blocker=compile_blocker,
                               step_kinds=2 if cfg.method == "pgl" else 1)  # PGL compiles a global step too
        record.update(result)
        choice = result["choice"]
    if choice:
        if "threads" in choice:
            torch.set_num_threads(int(choice["threads"]))
        cfg = dataclasses.replace(cfg, channels_last=bool(choice.get("channels_last", cfg.channels_last)),
                                  optimizer_kernel=choice.get("optimizer_kernel", cfg.optimizer_kernel),
                                  compile=bool(choice.get("compile", cfg.compile)))
    record["used"] = {"threads": torch.get_num_threads(), "channels_last": cfg.channels_last,
                      "optimizer_kernel": "fused" if cfg.optimizer_kernel == "auto" else cfg.optimizer_kernel,
                      "compile": cfg.compile}
    return cfg, record


def _device_of(cfg: TrainConfig, group) -> torch.device:
    """The run's device, with determinism set as ``--deterministic`` asks."""
    if group.distributed:
        device = group.device
        if cfg.cuda_graphs:
            raise UserError("--cuda-graphs is not supported under torchrun (a captured step cannot hold the "
                            "gradient all-reduces); drop it")
        if not group.is_main:
            sys.stdout = open(os.devnull, "w")  # one banner and one set of epoch lines: rank 0's
    else:
        device = resolve_device(cfg)
    return device


def _set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _describe_and_plan(cfg: TrainConfig, warn) -> None:
    """``--describe``/``--plan``: the network (and the memory plan) printed, nothing trained."""
    spec_size, n_classes = data_mod.RECIPES[cfg.recipe_name].image_size, 10
    folder = data_mod.reads(cfg.dataset) == "imagefolder"
    if cfg.plan and folder and data_stream.choose_pipeline(
            cfg.data_pipeline, cfg.dataset, cfg.recipe, cfg.data_dir, cfg.resident_budget) == "stream":
        spec = data_stream.load_stream(cfg.data_dir, recipe=cfg.recipe, image_size=cfg.image_size,
                                       workers=cfg.workers).spec
        spec_size, n_classes = spec.image_size, spec.num_classes
    elif cfg.plan and folder:
        # the plan depends on the images' size and the class count: read them as the run will
        spec = data_mod.load_dataset(
            cfg.dataset, cfg.data_dir, device=torch.device("cpu"), train_subset=cfg.train_subset,
            test_subset=cfg.test_subset, subset_seed=cfg.seed, download=False, cache_dir=cfg.cache_dir,
            recipe=cfg.recipe).spec
        spec_size, n_classes = spec.image_size, spec.num_classes
    net = build_model(cfg, n_classes, spec_size)
    warn()
    print(describe(cfg, net, spec_size))
    if cfg.plan:
        print(planner.plan_run(cfg, net, spec_size, n_classes).text())


@dataclasses.dataclass
class _RunData:
    data: object           # the loaded data set (its spec, and meta for a stream)
    pipeline: str          # "resident" or "stream"
    n_train: int
    train: object          # what the Trainer takes: (x, y) tensors or the stream
    test: object


def _load_data(cfg: TrainConfig, device: torch.device, explicit, warnings: list[str]) -> _RunData:
    pipeline = data_stream.choose_pipeline(cfg.data_pipeline, cfg.dataset, cfg.recipe, cfg.data_dir,
                                           cfg.resident_budget)
    if pipeline == "stream":
        data = data_stream.load_stream(cfg.data_dir, recipe=cfg.recipe, image_size=cfg.image_size,
                                       workers=cfg.workers, skip_bad=cfg.skip_bad_images,
                                       train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                                       subset_seed=cfg.seed)
        if data.meta["skipped_images"]:
            warnings.append(f"warning: --skip-bad-images left out {data.meta['skipped_images']} image(s) that failed "
                            f"to decode (first: {data.meta['skipped_files'][0]})")
        return _RunData(data, pipeline, data.num_train, data, None)
    if data_mod.reads(cfg.dataset) == "imagefolder" and cfg.data_pipeline == "auto" and (
            cfg.image_size is not None or cfg.skip_bad_images or "workers" in (explicit or ())):
        warnings.append(f"warning: --data-pipeline auto keeps {cfg.data_dir} resident (it fits --resident-budget "
                        f"{cfg.resident_budget:g} MiB): --workers, --image-size and --skip-bad-images have no "
                        "effect (pass --data-pipeline stream to stream it)")
    data = data_mod.load_dataset(
        cfg.dataset, cfg.data_dir, device=device, train_subset=cfg.train_subset,
        test_subset=cfg.test_subset, subset_seed=cfg.seed, download=not cfg.no_download,
        cache_dir=cfg.cache_dir, recipe=cfg.recipe, synthetic_train=cfg.synthetic_train,
        synthetic_test=cfg.synthetic_test)
    return _RunData(data, pipeline, int(data.train_y.shape[0]), (data.train_x, data.train_y),
                    (data.test_x, data.test_y))


def _build_network(cfg: TrainConfig, spec, device, group, batch: int, use_kernels: bool):
    """The run's network on its device with its head kernels chosen: (network, head-kernel record)."""
    net = build_model(cfg, spec.num_classes, spec.image_size).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    head_kernels = configure_head_kernels(
        net, cfg.head_kernels, use_kernels, batch=batch, device=device, channels_last=cfg.channels_last,
        dtype=DTYPES[cfg.amp_dtype if cfg.amp else "fp32"],
        deterministic=cfg.deterministic, ctx=group)
    net.set_lean_blocks(cfg.lean_blocks)
    return net, head_kernels


def _stage_runner(cfg: TrainConfig, learner, net, spec, batch: int):
    """This rank's stage of the module pipeline: every rank built the same model from the same seed;
    each trains its own stage of it."""
    balance = None if cfg.pipeline_balance == "even" else cfg.pipeline_balance
    if balance == "auto":
        balance = measured_module_times(cfg.arch, net.J, batch=batch, aux=cfg.aux, split=cfg.split,
                                        image_size=spec.image_size)
    return build_stage(learner, cfg.pipeline, balance=balance, depth=cfg.pipeline_depth,
                       micro_batches=cfg.pipeline_micro_batches,
                       input_shape=(3, spec.image_size, spec.image_size), timeout_s=cfg.pipeline_timeout)


def _header(cfg, run_cfg, group, rd: _RunData, mem_plan, predicted_mib, head_kernels, cpu_tune) -> dict:
    """What header.json records beside versions and device: the choices this run made."""
    header = {"memory_plan": mem_plan.record(), "global_memory": mem_plan.choice, "global_segments": mem_plan.segments,
              "head_kernels": head_kernels["resolved"], "head_kernels_mode": head_kernels["mode"],
              "head_kernel_selection": head_kernels["selection"], "head_kernel_rule": head_kernels.get("rule"),
              "compile": run_cfg.compile_mode if run_cfg.compile else None,
              "world_size": group.world_size, "backend": group.backend, "sync_bn": cfg.sync_bn,
              "data_pipeline": rd.pipeline, "memory_prediction_mib": predicted_mib, "cpu_tune": cpu_tune}
    if rd.pipeline == "stream":
        meta = rd.data.meta
        header.update({"loader_workers": cfg.workers, "image_size": rd.data.spec.image_size,
                       "skipped_images": meta["skipped_images"], "skipped_files": meta["skipped_files"]})
    if cfg.uses_infopro_lambdas:
        # InfoPro's loss is the objective, MAN's or HPFF's base, or PGL's local one: its lambdas
        header["infopro_lambdas"] = cfg.infopro_lambda_record()
    return header


def _run_on(cfg: TrainConfig, argv, explicit, ctx, warnings, warn, pipe_ctx=None) -> dict:
    group = pipe_ctx or ctx  # the ranks of this launch (pipeline stages or data-parallel replicas)
    device = _device_of(cfg, group)
    use_kernels = resolve_head_kernels(cfg, device) and not cfg.sync_bn
    seed_everything(cfg.seed)
    _set_determinism(cfg, device)
    if cfg.describe or cfg.plan:
        _describe_and_plan(cfg, warn)
        return {}

    # everything is validated before the output dir is created or touched
    rundir.check_output_dir(cfg.output_dir)
    resume_state = ckpt.find_resume_state(cfg.resume, cfg.output_dir, cfg.to_dict(), cfg.allow_schedule_change)
    rd = _load_data(cfg, device, explicit, warnings)
    spec, run_batch = rd.data.spec, min(cfg.batch_size, rd.n_train)
    net, head_kernels = _build_network(cfg, spec, device, group, run_batch, use_kernels)
    # the flags stay as given in config.json; the learner trains with what they and the tuner chose
    run_cfg, cpu_tune = tune_cpu(cfg, net, device, group, batch=run_batch, image_size=spec.image_size,
                                 steps=autotune.run_steps(rd.n_train, run_batch, cfg.epochs, cfg.drop_last),
                                 recorded=recorded_cpu_choice(cfg, resume_state))
    if run_cfg.channels_last and not cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # measured on rank 0 only: every rank must checkpoint the same segments. A pipeline's global
    # steps are never checkpointed (each stage holds its own modules' graphs): auto means none there
    plan_cfg = dataclasses.replace(cfg, global_memory="none") if pipe_ctx is not None else cfg
    mem_plan = group.on_main(planner.plan_run, plan_cfg, net, spec.image_size, spec.num_classes)
    # summary.json sets it beside the measured peak of every phase (measured before the run's learner exists)
    predicted_mib = None if pipe_ctx is not None else group.on_main(
        planner.phase_predictions, cfg, mem_plan, spec.image_size, spec.num_classes)
    learner = build_learner(run_cfg, net, mem_plan, ctx=ctx)
    header = _header(cfg, run_cfg, group, rd, mem_plan, predicted_mib, head_kernels, cpu_tune)
    strategy = Pipeline(_stage_runner(cfg, learner, net, spec, run_batch)) if pipe_ctx is not None else None

    def banner(h: dict) -> list[str]:
        return [f"pgl_fast {h['pgl_fast']} | torch {h['torch']} | device {h['device_name']} "
                f"({device}) | {cfg.method} {cfg.model or cfg.arch} J={net.J} aux={cfg.aux if net.heads else '-'} "
                f"| {h['train_images']} train / {h['test_images']} test images",
                describe(cfg, net, spec.image_size), mem_plan.text()]

    trainer = Trainer(
        learner, rd.train, rd.test, spec=spec, epochs=cfg.epochs,
        output_dir=cfg.output_dir, batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size, seed=cfg.seed,
        drop_last=cfg.drop_last, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
        resume=cfg.resume, overwrite=cfg.overwrite, allow_schedule_change=cfg.allow_schedule_change,
        progress=cfg.progress, heartbeat=cfg.heartbeat, eval_heads=not cfg.no_head_eval, config=cfg.to_dict(),
        header=header, summary_extra={"arch": cfg.model or cfg.arch, "aux": cfg.aux if net.heads else None},
        warnings=warnings, banner=banner, command=command_line(cfg, argv), resume_hint=resume_command(cfg, argv),
        config_writer=cfg.save, resume_state=resume_state, strategy=strategy, cli_flags=True)
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        run(cfg, sys.argv[1:] if argv is None else argv, explicit_fields(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the last checkpoint is intact", file=sys.stderr)
        return 3
    except RunInterrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, PipelineError):  # one line, and out without waiting on a peer that is gone
            exit_on_error(e)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
