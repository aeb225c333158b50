"""One command for a GPU session: ``python -m pgl_fast.gpu_check [--quick] [--budget-s S]``.

1. **Tests on the device** (a pytest subprocess with a time limit): the Triton kernels against
   float64 references (``tests/kernels``), fused vs eager heads in training, the ``auto`` head
   selection, and ``tests/test_gpu.py`` (graphed vs eager local steps, InfoPro under ``--amp``, a
   checkpointed global step, graph memory, a 2-epoch PGL run through the CLI). Tests that only
   build CPU float64 tensors (``tests/core/test_methods.py``) are left out: they add nothing here.
2. **Throughput and memory rows** at batch 1024, bf16 autocast, channels-last, synthetic
   device-resident data, for resnet32 and resnet110 at J in {4, 16}: plain PyTorch loops written as
   a user would (BP; DGL with 1c2f heads), ``torch.compile`` of each, and this engine (the DGL local
   step eager, CUDA-graphed, graphed + fused heads, compiled; the checkpointed PGL global step with
   AUX-ADAPT heads, eager and with fused heads). Step times come from CUDA events after warm-up;
   compilation and capture are timed separately (``first call s``).
3. **Results**: ``bench/results/gpu-check-<device>-<date>[-quick].jsonl`` gets one JSON line per
   row as soon as the row is measured (flushed and fsynced, so a kill keeps every finished row), and
   the ``.md`` table next to it is regenerated from the JSONL after every row. The path is printed
   first.

Time: a wall-clock budget (``--budget-s``: 330 s, or 165 s with ``--quick``) covers everything;
rows that no longer fit are recorded as skipped, with the reason, instead of being killed, so the
full run fits 6 minutes (and ``--quick`` 3) and can run twice in one 15-minute slot.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config.argparsing import OneLineParser
from .core.learner import LocalLearner
from .core.methods import PGL
from .jsonio import JsonlWriter, write_text_atomic
from .models.cifar_resnet import Classifier, build_units
from .models.presets import cifar_resnet
from .runtime.optim import sgd
from .versions import device_name, nvidia_smi, versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What gpu_check runs on the device: everything that exercises CUDA (compiled Triton kernels,
# capture, autocast on CUDA). The --quick set keeps the kernels' fast cases and the GPU tests.
TESTS_FULL = ["tests/test_gpu.py", "tests/kernels", "tests/runtime/test_head_kernels_train.py", "tests/runtime/test_head_select.py",
              "tests/runtime/test_graphs.py"]
TESTS_QUICK = ["tests/test_gpu.py", "tests/kernels", "-m", "not slow"]

# How each memory figure is taken (the .md prints this legend).
MEM_KINDS = {
    "cuda_allocated": "`torch.cuda.max_memory_allocated` / `max_memory_reserved` from right after the model, "
                      "optimizer state and batch exist (they are included) through compilation, warm-up and the "
                      "timed steps",
    "cuda_allocated+graph_capture_peak": "the same counters, combined with the peak allocated during each CUDA-graph "
                                         "capture (reset right before `torch.cuda.graph`, read right after): a replay "
                                         "never allocates, so its activations (in the graph pool) appear only in the "
                                         "capture peak; `graph pool MiB` is the pool's reserved segments "
                                         "(`torch.cuda.memory_snapshot`); the warm-up's cached blocks are released "
                                         "before capture",
    "cuda_allocated+compile_recording": "the same counters; with `reduce-overhead` torch.compile records its CUDA "
                                        "graphs during the first calls, inside the measured window, so their pool's "
                                        "allocations are included",
    "not_measured_on_cpu": "no device memory counter on the CPU",
}


class RowSkip(Exception):
    """A row that cannot run here (e.g. CUDA graphs on the CPU): recorded as skipped, with why."""


@dataclass
class Row:
    impl: str  # "plain" (a PyTorch loop written out, no engine) or "ours"
    kind: str  # "bp", "dgl" (local step) or "pgl-global" (checkpointed global step)
    arch: str
    J: int
    mode: str  # "eager", "compile", "graphs", "graphs+fused", "eager+fused"
    est_s: float  # what the row is expected to cost (build, compile/capture, timing): the budget check

    @property
    def name(self) -> str:
        return f"{self.impl} {self.kind} {self.arch} J={self.J} {self.mode}"


def plan_rows(archs=("resnet32", "resnet110"), Js=(4, 16), compile_Js=(4,)) -> list[Row]:
    """The rows, most informative first: the eager and graph rows of every arch, then the
    torch.compile rows (the costly ones: a minute or more of compilation each), only at
    ``compile_Js`` (a compiled J=16 local step is 31 separate graphs to compile)."""
    rows, compiled = [], []
    for arch in archs:
        big = arch not in ("resnet8", "resnet20", "resnet32")
        cost = 20.0 if big else 8.0
        rows.append(Row("plain", "bp", arch, 1, "eager", cost))
        for J in Js:
            for mode in ("eager", "graphs", "graphs+fused"):
                rows.append(Row("ours", "dgl", arch, J, mode, cost))
            rows.append(Row("plain", "dgl", arch, J, "eager", cost))
            for mode in ("eager", "eager+fused"):
                rows.append(Row("ours", "pgl-global", arch, J, mode, cost))
        compile_cost = 150.0 if big else 60.0
        compiled.append(Row("plain", "bp", arch, 1, "compile", compile_cost))
        for J in compile_Js:
            compiled.append(Row("ours", "dgl", arch, J, "compile", compile_cost))
            compiled.append(Row("plain", "dgl", arch, J, "compile", compile_cost))
    return rows + compiled


# -- the step functions ---------------------------------------------------------------------------

def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _batch(batch: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), generator=g).to(device)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _compile(fn, device: torch.device, mode: str):
    if device.type != "cuda":
        raise RowSkip("torch.compile rows are measured on CUDA only (on the CPU it needs minutes of C++ builds)")
    return torch.compile(fn, mode=mode)


def _mark_step(compiled: bool) -> None:
    # reduce-overhead's CUDA-graph trees need to know where an iteration starts
    if compiled and hasattr(torch, "compiler") and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()


def plain_bp_step(arch: str, batch: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
                  compile_mode: str | None = None) -> Callable[[], None]:
    """End-to-end BP as a user writes it: nn.Sequential of the same units, torch.optim.SGD."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*build_units(arch), Classifier(64, 10)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = _sgd(model.parameters())
    fwd = _compile(model, device, compile_mode) if compile_mode else model
    x, y = _batch(batch, device, channels_last)

    def step() -> None:
        _mark_step(compile_mode is not None)
        with _autocast(device, dtype):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def plain_dgl_step(arch: str, J: int, batch: int, device: torch.device, dtype: torch.dtype | None,
                   channels_last: bool, compile_mode: str | None = None) -> Callable[[], None]:
    """DGL's local step as a user writes it: per module, forward on the detached input, its 1c2f
    head's cross-entropy (the classifier's for the last), backward, its own torch.optim.SGD step."""
    torch.manual_seed(0)
    net = cifar_resnet(arch, J, aux="1c2f").to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    blocks = list(net.blocks)
    heads = list(net.heads) + [net.classifier]
    opts = [_sgd(list(b.parameters()) + list(h.parameters())) for b, h in zip(blocks, heads)]
    if compile_mode:
        blocks = [_compile(b, device, compile_mode) for b in blocks]
        heads = [_compile(h, device, compile_mode) for h in heads]
    x, y = _batch(batch, device, channels_last)

    def step() -> None:
        _mark_step(compile_mode is not None)
        h = x
        for block, head, opt in zip(blocks, heads, opts):
            with _autocast(device, dtype):
                h = block(h.detach())
                loss = F.cross_entropy(head(h).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def ours_step(kind: str, arch: str, J: int, mode: str, batch: int, device: torch.device,
              dtype: torch.dtype | None, channels_last: bool, compile_mode: str | None = None):
    """This engine's step: ``(step, graphed)`` where graphed is the GraphedLocalSteps (or None)."""
    if "fused" in mode and device.type != "cuda":
        raise RowSkip("fused heads are timed on CUDA only (the CPU runs Triton under its interpreter)")
    if mode.startswith("graphs") and device.type != "cuda":
        raise RowSkip("CUDA graphs need a CUDA GPU")
    kwargs = {}
    if mode == "compile":
        if "compile" not in inspect.signature(LocalLearner).parameters:
            raise RowSkip("this checkout's LocalLearner has no compile parameter")
        if device.type != "cuda":
            raise RowSkip("torch.compile rows are measured on CUDA only (on the CPU it needs minutes of C++ builds)")
        kwargs["compile"] = compile_mode
    if mode.startswith("graphs") and kind != "pgl-global":
        kwargs["cuda_graphs"] = True  # local steps replay as CUDA graphs; global steps stay eager
    torch.manual_seed(0)
    net = cifar_resnet(arch, J, aux="1c2f" if kind == "dgl" else "adapt").to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.set_head_kernels("fused" in mode)
    learner = LocalLearner(net, PGL(1, 1), optimizer=sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
                           amp=dtype, checkpoint_global=kind == "pgl-global", channels_last=channels_last, **kwargs)
    x, y = _batch(batch, device, channels_last)
    if kind == "pgl-global":
        return (lambda: learner.global_step(x, y)), None
    return (lambda: learner.local_step(x, y)), learner.graphed


def build_row(row: Row, batch: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
              compile_mode: str):
    cm = compile_mode if row.mode == "compile" else None
    if row.impl == "plain" and row.kind == "bp":
        return plain_bp_step(row.arch, batch, device, dtype, channels_last, cm), None
    if row.impl == "plain" and row.kind == "dgl":
        return plain_dgl_step(row.arch, row.J, batch, device, dtype, channels_last, cm), None
    if row.impl == "ours":
        return ours_step(row.kind, row.arch, row.J, row.mode, batch, device, dtype, channels_last, cm)
    raise ValueError(f"unknown row {row.name}")


# -- measurement ----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, steps: int, max_s: float) -> list[float]:
    """Seconds of each of up to ``steps`` calls (at least 2; fewer than ``steps`` once ``max_s`` of
    host time has passed): CUDA events on a GPU, ``time.perf_counter`` on the CPU."""
    out: list[float] = []
    t0 = time.perf_counter()
    if device.type == "cuda":
        events = []
        for i in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            events.append((a, b))
            if i >= 1 and time.perf_counter() - t0 > max_s:
                break
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) / 1000 for a, b in events]
    for i in range(steps):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
        if i >= 1 and time.perf_counter() - t0 > max_s:
            break
    return out


def measure_row(row: Row, *, batch: int, device: torch.device, dtype: torch.dtype | None = torch.bfloat16,
                channels_last: bool = True, warmup: int = 3, steps: int = 10, max_timed_s: float = 5.0,
                compile_mode: str = "reduce-overhead") -> dict:
    """Build, run once (compile / capture / autotune: ``first_call_s``), warm up, time; with the
    peak memory of the whole window, taken as ``mem_kind`` says."""
    if device.type == "cuda":  # the previous row's memory must not count in this one's peak
        gc.collect()
        torch.cuda.empty_cache()
    rec = dict(asdict(row), name=row.name, batch=batch, dtype=str(dtype).replace("torch.", "") if dtype else "float32",
               channels_last=channels_last)
    step, graphed = build_row(row, batch, device, dtype, channels_last, compile_mode)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    step()
    _sync(device)
    rec["first_call_s"] = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        step()
    _sync(device)
    times = time_steps(step, device, steps, max_timed_s)
    med = statistics.median(times)
    rec.update(status="ok", steps=len(times), step_ms=med * 1e3, step_ms_mean=statistics.fmean(times) * 1e3,
               images_per_s=batch / med)
    if device.type != "cuda":
        rec.update(peak_alloc_mib=None, peak_reserved_mib=None, graph_pool_mib=None, mem_kind="not_measured_on_cpu")
        return rec
    peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    pool, kind = None, "cuda_allocated+compile_recording" if row.mode == "compile" else "cuda_allocated"
    reading = graphed.memory_reading() if graphed is not None else None
    if reading is not None:
        peak = max(peak, reading["capture_peak_bytes"], reading["outside_peak_bytes"])
        reserved = max(reserved, reading["capture_reserved_bytes"], reading["outside_reserved_bytes"])
        pool, kind = reading["pool_reserved_bytes"] / 2**20, "cuda_allocated+graph_capture_peak"
    rec.update(peak_alloc_mib=peak / 2**20, peak_reserved_mib=reserved / 2**20, graph_pool_mib=pool, mem_kind=kind)
    return rec


# -- results files --------------------------------------------------------------------------------

class Results:
    """The JSONL (appended, flushed and fsynced per record) and the .md regenerated from it."""

    def __init__(self, stem: str):
        self.jsonl, self.md = stem + ".jsonl", stem + ".md"
        # default=str: a record may carry a dtype or a path, which must not fail the write
        self._writer = JsonlWriter(self.jsonl, default=str)

    def append(self, record: dict) -> None:
        self._writer.write(record)
        self.render()

    def read(self) -> list[dict]:
        return self._writer.read()

    def render(self) -> None:
        write_text_atomic(self.md, markdown(self.read()))


def results_stem(out_dir: str, device_name: str, quick: bool, today: str | None = None) -> str:
    """``<out>/gpu-check-<device>-<date>[-quick]``, numbered ``-2``, ``-3``... when taken."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"
    base = os.path.join(out_dir, f"gpu-check-{slug}-{today or datetime.date.today().isoformat()}"
                                 f"{'-quick' if quick else ''}")
    stem, n = base, 1
    while os.path.exists(stem + ".jsonl") or os.path.exists(stem + ".md"):
        n += 1
        stem = f"{base}-{n}"
    return stem


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(records: list[dict]) -> str:
    head = next((r for r in records if r.get("event") == "header"), {})
    info = head.get("versions", {})
    lines = [f"# GPU check: {info.get('device', '?')} ({head.get('date', '?')})", ""]
    if info:
        lines += [f"torch {info.get('torch')}, torchvision {info.get('torchvision')}, triton {info.get('triton')}, "
                  f"CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, Python {info.get('python')}; "
                  f"nvidia-smi: {info.get('nvidia_smi')}", ""]
    if head:
        lines += [f"Command: `{head.get('command')}`; budget {head.get('budget_s')} s. Batch {head.get('batch')}, "
                  f"{head.get('dtype')} autocast, channels-last, synthetic device-resident data, "
                  f"`cudnn.benchmark` on. Step time: median of up to {head.get('steps')} steps timed with CUDA "
                  f"events after {head.get('warmup')} warm-up calls; `first call s` is the first call alone "
                  f"(torch.compile, CUDA-graph capture, cuDNN/Triton autotuning). `ratio` = images/s over the "
                  f"plain PyTorch BP loop of the same arch in this run. torch.compile rows use "
                  f"`mode={head.get('compile_mode')!r}`.", ""]
    for t in (r for r in records if r.get("event") == "tests"):
        lines += [f"Tests on the device: `{t['command']}` -> {t['outcome']} ({t['seconds']:.0f} s): "
                  f"{t.get('summary') or ''}", ""]
    rows = [r for r in records if r.get("event") == "row"]
    base = {r["arch"]: r["images_per_s"] for r in rows
            if r.get("status") == "ok" and r["impl"] == "plain" and r["kind"] == "bp" and r["mode"] == "eager"}
    lines += ["| impl | kind | arch | J | mode | step ms | images/s | ratio | first call s | peak alloc MiB | "
              "peak reserved MiB | graph pool MiB | memory taken as |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["impl"], r["kind"], r["arch"], str(r["J"]), r["mode"]]
        if r.get("status") != "ok":
            what = r.get("reason") or r.get("error") or ""
            lines.append("| " + " | ".join(cells) + f" | {r.get('status')}: {what} | | | | | | | |")
            continue
        ratio = r["images_per_s"] / base[r["arch"]] if r["arch"] in base else None
        lines.append("| " + " | ".join(cells + [
            _fmt(r["step_ms"], ".2f"), _fmt(r["images_per_s"], ".0f"), _fmt(ratio, ".2f"),
            _fmt(r["first_call_s"], ".1f"), _fmt(r["peak_alloc_mib"], ".0f"), _fmt(r["peak_reserved_mib"], ".0f"),
            _fmt(r["graph_pool_mib"], ".0f"), f"`{r['mem_kind']}`"]) + " |")
    end = next((r for r in records if r.get("event") == "end"), None)
    if end is not None:
        lines += ["", f"Finished in {end['seconds']:.0f} s (exit code {end['exit_code']})."]
    kinds = sorted({r["mem_kind"] for r in rows if r.get("mem_kind")})
    if kinds:
        lines += ["", "How the memory numbers were taken:", ""]
        lines += [f"- `{k}`: {MEM_KINDS.get(k, k)}." for k in kinds]
    return "\n".join(lines) + "\n"


# -- running --------------------------------------------------------------------------------------

def run_rows(rows: list[Row], results: Results, *, batch: int, device: torch.device, deadline: float,
             clock: Callable[[], float] = time.monotonic, log=print, **measure_kw) -> list[dict]:
    """Measure each row in turn and append it at once; a row whose estimated cost no longer fits
    before ``deadline`` (a ``clock()`` value) is recorded as skipped, as is one that cannot run
    here; a row that fails is recorded with its error and the run goes on."""
    out = []
    for row in rows:
        left = deadline - clock()
        base = dict(asdict(row), name=row.name, batch=batch, event="row")
        if left < row.est_s:
            rec = dict(base, status="skipped", reason=f"budget: {max(left, 0):.0f} s left, the row needs ~{row.est_s:.0f} s")
        else:
            try:
                rec = dict(measure_row(row, batch=batch, device=device, **measure_kw), event="row")
            except RowSkip as e:
                rec = dict(base, status="skipped", reason=str(e))
            except Exception as e:  # one failing row (OOM, a compile error) must not lose the others
                msg = str(e).strip()
                rec = dict(base, status="error", error=f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rec["row_s"] = round(clock() - (deadline - left), 3)
        results.append(rec)
        out.append(rec)
        log(f"{row.name}: " + (f"{rec['images_per_s']:.0f} img/s, {rec['step_ms']:.2f} ms, peak "
                               f"{_fmt(rec.get('peak_alloc_mib'), '.0f') or '-'} MiB ({rec['mem_kind']})"
                               if rec["status"] == "ok" else f"{rec['status']}: {rec.get('reason') or rec.get('error')}"))
    return out


def test_command(quick: bool) -> list[str]:
    # --durations: the slowest tests are listed, to size the next session's budget
    # the kernels' ahead-of-time lowering test compiles with ptxas on the host: the CPU suite runs it,
    # and on the device the kernels compile for real anyway
    return [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--durations=8",
            "--ignore=tests/kernels/test_lowering.py", *(TESTS_QUICK if quick else TESTS_FULL)]


def run_tests(quick: bool, timeout_s: float) -> dict:
    cmd = test_command(quick)
    # unbuffered, so that a run stopped at its time limit still shows how far it got
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
        text, outcome = r.stdout + r.stderr, "passed" if r.returncode == 0 else f"failed (exit {r.returncode})"
        code = r.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        text, outcome, code = out + err, f"timed out after {timeout_s:.0f} s", None
    tail = text.strip().splitlines()[-40:]
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|error)", ln)), None)
    return {"event": "tests", "command": " ".join(["python"] + cmd[1:]), "returncode": code, "outcome": outcome,
            "seconds": time.monotonic() - t0, "summary": summary, "tail": tail}


def _versions() -> dict:
    """The versions of everything the numbers depend on, the GPU's name and the driver's view of it."""
    return dict(versions(), device=device_name(torch.device("cuda", 0)), nvidia_smi=nvidia_smi())


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m pgl_fast.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="resnet32 only, fewer steps, the fast tests (<= 3 min)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget for the whole check, tests included (default 330, --quick 165)")
    p.add_argument("--skip-tests", action="store_true", help="only the throughput/memory rows")
    p.add_argument("--tests-only", action="store_true", help="only the tests on the device")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the compile rows")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args(argv)
    if args.batch < 2:
        print(f"error: --batch must be >= 2 (batch norm needs two samples), got {args.batch}", file=sys.stderr)
        return 2
    if args.skip_tests and args.tests_only:
        print("error: --skip-tests and --tests-only exclude each other", file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (165.0 if args.quick else 330.0)
    if budget <= 0:
        print(f"error: --budget-s must be > 0, got {budget:g}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    deadline = t_start + budget
    if not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here); on the CPU run "
              "`python -m pytest` instead", file=sys.stderr)
        return 2
    try:
        info = _versions()
    except ImportError as e:
        print(f"error: gpu_check: {e} (install the project first: pip install --no-build-isolation --no-deps -e .)",
              file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
        results = Results(results_stem(args.out, info["device"], args.quick))
    except OSError as e:
        print(f"error: --out {args.out}: not writable ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"results: {results.jsonl} (one line per row as it is measured) and {results.md}", flush=True)
    print(json.dumps(info), flush=True)
    warmup, steps = (2, 5) if args.quick else (3, 10)
    results.append({"event": "header", "versions": info, "date": datetime.date.today().isoformat(),
                    "command": " ".join(["python -m pgl_fast.gpu_check"] + (argv if argv is not None else sys.argv[1:])),
                    "budget_s": budget, "batch": args.batch, "dtype": "bfloat16", "warmup": warmup, "steps": steps,
                    "compile_mode": args.compile_mode, "quick": args.quick})
    ok = True
    if not args.skip_tests:
        # the tests may use at most this share of the budget, so the rows always get their turn
        cap = (0.45 if args.quick else 0.4) * budget if not args.tests_only else budget
        print(f"tests on the device (at most {cap:.0f} s): {' '.join(test_command(args.quick)[1:])}", flush=True)
        tests = run_tests(args.quick, max(min(cap, deadline - time.monotonic()), 1.0))
        print("\n".join(tests["tail"][-12:]), flush=True)
        results.append(tests)
        ok = tests["returncode"] == 0
    if not args.tests_only:
        torch.backends.cudnn.benchmark = True  # as in training; every row warms up before timing
        rows = plan_rows(archs=("resnet32",) if args.quick else ("resnet32", "resnet110"))
        done = run_rows(rows, results, batch=args.batch, device=torch.device("cuda"), deadline=deadline,
                        warmup=warmup, steps=steps, compile_mode=args.compile_mode,
                        max_timed_s=2.0 if args.quick else 4.0,
                        log=lambda s: print(s, flush=True))
        ok = ok and not any(r["status"] == "error" for r in done)
    code = 0 if ok else 1
    results.append({"event": "end", "seconds": time.monotonic() - t_start, "exit_code": code})
    print(f"wrote {results.jsonl} and {results.md} ({time.monotonic() - t_start:.0f} s)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
