"""One command for a GPU session: ``python -m pgl_fast.gpu_check``.

1. Runs the GPU-relevant tests on the real device: the Triton kernels against float64 eager
   references, the Triton heads in training against eager heads, and graphed vs eager local steps
   (fp32 and bf16), plus everything marked ``cuda``.
2. Measures the throughput / memory table at batch 1024 on synthetic device-resident data:
   for resnet32 and resnet110 at J in {4, 16}: ``bp`` (global step, no heads), ``dgl`` (local step,
   1c2f heads), ``pgl-local`` (local step, AUX-ADAPT heads) and ``pgl-global`` (checkpointed global
   step, AUX-ADAPT heads), each as eager, CUDA graphs (local kinds) and graphs + Triton heads, all
   under bf16 autocast with channels-last; plus a plain eager PyTorch BP loop (``torch.optim.SGD``,
   no pgl_fast executor) as the baseline in the same run.
3. Writes ``bench/results/<device>-<date>.json`` and ``.md`` with the device, driver and versions.

Budget: it is meant to finish well inside 10 minutes on an H100; ``--quick`` measures fewer steps.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _versions() -> dict:
    import torchvision

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "triton": tv,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name(0)}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def run_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "tests/test_graphs.py",
           "tests/test_head_kernels_train.py", "tests/test_methods.py"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {"command": " ".join(cmd[1:]), "returncode": r.returncode, "seconds": time.time() - t0, "tail": tail}


def _time_steps(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


def measure(arch: str, J: int, kind: str, mode: str, batch: int, steps: int) -> dict:
    from .engine import Executor, LossSpec, StepStats
    from .graphs import GraphedLocalSteps
    from .network import LocalNet

    torch.manual_seed(0)
    aux = {"bp": None, "dgl": "1c2f", "pgl-local": "adapt", "pgl-global": "adapt"}[kind]
    net = LocalNet(arch, J, aux=aux).cuda().to(memory_format=torch.channels_last)
    net.set_head_kernels(mode.endswith("triton"))
    exe = Executor(net, method="bp" if kind == "bp" else "pgl", lr=0.1, momentum=0.9, nesterov=True,
                   weight_decay=1e-4, loss_spec=LossSpec("ce"), amp_dtype=torch.bfloat16,
                   checkpoint_global=kind == "pgl-global", channels_last=True)
    stats = StepStats(net.J, torch.device("cuda"))
    x = torch.randn(batch, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    if kind in ("bp", "pgl-global"):
        fn = lambda: exe.global_step(x, y, stats)  # noqa: E731
    elif mode.startswith("graphs"):
        graphed = GraphedLocalSteps(exe, stats)
        fn = lambda: graphed(x, y)  # noqa: E731
    else:
        fn = lambda: exe.local_step(x, y, stats)  # noqa: E731
    fn()  # capture / compile / autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sec = _time_steps(fn, steps)
    return {"arch": arch, "J": J, "kind": kind, "mode": mode, "batch": batch, "step_ms": sec * 1e3,
            "images_per_s": batch / sec, "peak_alloc_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
            "epoch_s_50k": sec * 50000 / batch}


def plain_bp_baseline(arch: str, batch: int, steps: int) -> dict:
    """Eager PyTorch as a user would write it: nn.Sequential backbone, torch.optim.SGD, bf16."""
    from .models import Classifier, build_units

    torch.manual_seed(0)
    units = build_units(arch)
    model = torch.nn.Sequential(*units, Classifier(64, 10)).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sec = _time_steps(step, steps)
    return {"arch": arch, "J": 1, "kind": "plain-pytorch-bp", "mode": "eager", "batch": batch, "step_ms": sec * 1e3,
            "images_per_s": batch / sec, "peak_alloc_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20, "epoch_s_50k": sec * 50000 / batch}


def markdown(rows: list[dict], info: dict, tests: dict | None) -> str:
    lines = [f"# GPU check: {info['device']} ({datetime.date.today().isoformat()})", "",
             f"torch {info['torch']}, torchvision {info['torchvision']}, triton {info['triton']}, CUDA {info['cuda']}, "
             f"cuDNN {info['cudnn']}; nvidia-smi: {info.get('nvidia_smi')}", "",
             "Batch 1024, bf16 autocast, channels-last, synthetic device-resident data; step time from CUDA events "
             "after warm-up (capture/compile excluded). `ratio` = images/s relative to the plain eager PyTorch BP loop "
             "of the same arch measured in this run.", ""]
    if tests is not None:
        lines += [f"Tests on the device: `{tests['command']}` -> exit {tests['returncode']} "
                  f"({tests['tail'][-1] if tests['tail'] else ''})", ""]
    lines += ["| arch | J | kind | mode | step ms | images/s | ratio | epoch s (50k) | peak alloc MiB | peak reserved MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["arch"]: r["images_per_s"] for r in rows if r["kind"] == "plain-pytorch-bp"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['J']} | {r['kind']} | {r['mode']} | error: {r['error']} | | | | | |")
            continue
        ratio = r["images_per_s"] / base[r["arch"]] if r["arch"] in base else float("nan")
        lines.append(f"| {r['arch']} | {r['J']} | {r['kind']} | {r['mode']} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | "
                     f"{ratio:.2f} | {r['epoch_s_50k']:.2f} | {r['peak_alloc_mib']:.0f} | {r['peak_reserved_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgl_fast.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--skip-tests", action="store_true", help="only the throughput/memory table")
    p.add_argument("--quick", action="store_true", help="fewer timed steps, resnet32 only")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU; on the CPU run `python -m pytest` instead", file=sys.stderr)
        return 2
    info = _versions()
    print(json.dumps(info, indent=1), flush=True)
    torch.backends.cudnn.benchmark = True  # as in training; warm-up runs before every measurement
    tests = None if args.skip_tests else run_tests()
    steps = 5 if args.quick else 20
    archs = ("resnet32",) if args.quick else ("resnet32", "resnet110")
    rows = []
    for arch in archs:
        rows.append(plain_bp_baseline(arch, args.batch, steps))
        print(rows[-1], flush=True)
        for J in (4, 16):
            for kind in ("bp", "dgl", "pgl-local", "pgl-global"):
                modes = ("eager", "graphs", "graphs+triton") if kind in ("dgl", "pgl-local") else (
                    ("eager",) if kind == "bp" else ("eager", "eager+triton"))
                for mode in modes:
                    try:
                        rows.append(measure(arch, J, kind, mode, args.batch, steps))
                    except Exception as e:  # one failing cell must not lose the rest of the table
                        rows.append({"arch": arch, "J": J, "kind": kind, "mode": mode,
                                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                    print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    stem = os.path.join(args.out, f"gpu-check-{slug}-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w") as f:
        json.dump({"versions": info, "tests": tests, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, info, tests))
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if (tests is None or tests["returncode"] == 0) and not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
