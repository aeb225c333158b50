"""Ahead-of-time lowering of the fused head kernels to PTX and a cubin for a CUDA target, without a GPU.

Why: the kernels run under the Triton CPU interpreter in the CPU test suite, which checks their
numerics but never runs Triton's real compiler. A kernel can be correct under the interpreter and
still fail to compile for a GPU (an unsupported dot shape, a layout the backend rejects, more
shared memory than the chip has). Triton's NVIDIA backend ships ``ptxas``, so
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a kernel all the way
to a cubin on any machine; this module does that for exactly the variants training would launch.

What is compiled is never listed by hand: :func:`engine_launches` runs the real aux heads
(``pgl_fast.models.heads.AuxClassifier`` with ``use_kernels`` on, forward + backward in training mode and
forward in eval mode) on ``meta`` tensors inside
:func:`pgl_fast.kernels.conv_bn_relu.record_launches`, so the launchers pick the tile config and
constexprs with the same code as in training; :func:`variants` then derives each launch's
signature, constexprs and specialisation attributes with the JIT's own binder for the target (the
same values ``kernel[grid](...)`` would compile). :func:`matrix_launches` forces every listed tile
config, dtype and fp32 precision instead, for the full matrix.

The kernels must be real ``JITFunction`` objects, which ``@triton.jit`` does not produce under
``TRITON_INTERPRET=1``; the CPU tests therefore run this module as a subprocess with that variable
removed::

    python -m pgl_fast.kernels.lowering --set engine --arch 90 --arch 80 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from typing import Any, NamedTuple

import torch
from torch import nn

# the package re-exports the function conv_bn_relu under the submodule's name: fetch the module
cbr = importlib.import_module(".conv_bn_relu", __package__)

__all__ = [
    "ARCHS", "PRECISIONS", "ENGINE_AUX", "FEATURE_SIDE", "SHARED_MEMORY_LIMIT",
    "lowering_unavailable", "engine_launches", "matrix_launches", "variants", "covering", "compile_variant",
    "main",
]

# sm_90 (H100/H200, the GPU machine) and sm_80 (A100)
ARCHS = (90, 80)
# Largest shared memory one block may use (CUDA programming guide, per compute capability); a
# kernel over this cannot launch on that chip.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# name -> (head input dtype, torch.backends.cudnn.allow_tf32): the fp32 kernels follow that flag as
# F.conv2d does; torch's default is True, so "fp32-tf32" is what a run without --amp launches.
PRECISIONS = {
    "bf16": (torch.bfloat16, True),  # --amp (default --amp-dtype)
    "fp32-tf32": (torch.float32, True),  # no --amp
    "fp16": (torch.float16, True),  # --amp --amp-dtype fp16
    "fp32-ieee": (torch.float32, False),  # no --amp, torch.backends.cudnn.allow_tf32 switched off
}
ENGINE_PRECISIONS = ("bf16", "fp32-tf32")
# The InfoPro-style heads whose convs run fused: the default (1c2f), AUX-ADAPT (2c2f at 16
# channels, 1c3f at 32, 1c2f at 64) and 2c2f (whose first conv is the only pool=False launch).
# 1c1f/1c3f have the same single conv as 1c2f.
ENGINE_AUX = ("1c2f", "2c2f", "adapt")
# CIFAR ResNets (resnet32/110): the 16/32/64-channel stages run at 32/16/8 px for a 32 px input,
# and the heads sit on those stage outputs.
FEATURE_SIDE = {16: 32, 32: 16, 64: 8}
ENGINE_BATCH = 1024
# The full matrix runs at the stage-2 head shape: two channel blocks at block_n=16/32, masking at
# every listed config.
MATRIX_SHAPE = (32, 64, 16, 2)  # C_in, C_out, H=W, stride


class Variant(NamedTuple):
    """One distinct compilation: what the JIT would compile for a launch on ``arch``."""

    label: str  # readable: where it is launched, kernel, constexprs
    precision: str  # a PRECISIONS key
    kernel: Any  # the JITFunction
    meta: dict  # the launcher's constexpr keywords and num_warps
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def lowering_unavailable() -> str | None:
    """Why kernels cannot be lowered to cubins here (None when they can)."""
    if cbr._TRITON_IMPORT_ERROR is not None:
        return f"triton is not importable: {cbr._TRITON_IMPORT_ERROR}"
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", ARCHS[0], 32))
        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # no NVIDIA backend in this triton build, or no ptxas
        return f"triton's NVIDIA backend or its ptxas is unavailable: {type(exc).__name__}: {exc}"
    try:
        subprocess.run([ptxas, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:
        return f"ptxas at {ptxas} does not run: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def _allow_tf32(flag: bool):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = flag
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _tag(precision: str, launch: cbr.KernelLaunch) -> str:
    meta = ",".join(f"{k}={v}" for k, v in sorted(launch.meta.items()))
    return f"{launch.kernel.__name__}[{precision}; {meta}]"


def engine_launches(precisions=ENGINE_PRECISIONS, aux=ENGINE_AUX, channels=(16, 32, 64),
                    batch: int = ENGINE_BATCH) -> list[tuple[str, cbr.KernelLaunch]]:
    """``(precision, launch)`` for every kernel launch of the real aux heads in one training step
    (forward + backward, training mode) and one evaluation (forward, eval mode), per precision,
    head config and head input width, at ``batch`` on the CIFAR ResNet feature sizes."""
    from pgl_fast.models.heads import AuxClassifier

    out = []
    for precision in precisions:
        dtype, tf32 = PRECISIONS[precision]
        for config in aux:
            for c_in in channels:
                head = AuxClassifier(config, c_in, 10).to("meta")
                head.use_kernels = True
                # the classifier layers are plain eager ops that need autocast for a 16-bit input;
                # only the conv part launches kernels
                head.fc = nn.Identity()
                side = FEATURE_SIDE[c_in]
                with _allow_tf32(tf32), cbr.record_launches() as launches:
                    x = torch.empty(batch, c_in, side, side, device="meta", dtype=dtype, requires_grad=True)
                    head.train()
                    y = head(x)
                    # a dense upstream gradient, as the classifier's backward would produce
                    y.backward(torch.empty_like(y))
                    head.eval()
                    with torch.no_grad():
                        head(x.detach())
                out += [(f"{precision} {config} C_in={c_in}", launch) for launch in launches]
    return out


def matrix_launches(precisions=tuple(PRECISIONS), configs=tuple(cbr.CONFIGS), pools=(True, False),
                    shape=MATRIX_SHAPE, batch: int = 8) -> list[tuple[str, cbr.KernelLaunch]]:
    """``(precision, launch)`` for forward + backward in training mode with each listed tile config
    forced, each precision and pool on/off: all four kernels."""
    c_in, c_out, side, stride = shape
    out = []
    for precision in precisions:
        dtype, tf32 = PRECISIONS[precision]
        for name in configs:
            for pool in pools:
                with _allow_tf32(tf32), cbr.record_launches() as launches:
                    x = torch.empty(batch, c_in, side, side, device="meta", dtype=dtype, requires_grad=True)
                    w = torch.empty(c_out, c_in, 3, 3, device="meta", requires_grad=True)
                    g = torch.empty(c_out, device="meta", requires_grad=True)
                    b = torch.empty(c_out, device="meta", requires_grad=True)
                    rm, rv = torch.empty(c_out, device="meta"), torch.empty(c_out, device="meta")
                    y = cbr._conv_bn_relu(x, w, g, b, rm, rv, stride=stride, training=True, momentum=0.1,
                                          eps=1e-5, pool=pool, config=cbr.CONFIGS[name])
                    y.backward(torch.empty_like(y))
                out += [(f"{precision} {name}", launch) for launch in launches]
    return out


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return GPUTarget("cuda", arch, 32), make_backend(GPUTarget("cuda", arch, 32))


def variants(launches, arch: int) -> list[Variant]:
    """The distinct compilations for ``launches`` on ``arch``, in first-launch order.

    Signature (``*bf16``, ``i32``, ``constexpr`` ...), constexprs (including integers the JIT
    specialises to constants, e.g. a unit stride) and divisibility attributes come from the JIT's
    own binder and argument packing for that target, so they are what ``kernel[grid](...)`` would
    compile. Meta tensors report a null data pointer, i.e. a 16-byte aligned one, as the CUDA caching
    allocator's tensors are.
    """
    import triton

    try:
        # the JIT's binder and argument packing: not public API, present alike in triton 3.6 and 3.8
        from triton.runtime.jit import JITFunction, create_function_from_signature

        JITFunction._pack_args  # noqa: B018
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"triton {triton.__version__} lacks the JIT internals this lowering mirrors "
            f"(create_function_from_signature, JITFunction._pack_args; known to work on 3.6 and 3.8): {exc}"
        ) from exc

    _, backend = _backend(arch)
    seen, out = set(), []
    for tag, launch in launches:
        kernel = launch.kernel
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(
                f"{kernel.__name__} is a {type(kernel).__name__}, not a JITFunction: run lowering without "
                "TRITON_INTERPRET=1 (python -m pgl_fast.kernels.lowering)"
            )
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = dict(launch.meta)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = (kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())), repr(options))
        if key in seen:
            continue
        seen.add(key)
        label = f"{tag}: {kernel.__name__}[{','.join(f'{k}={v}' for k, v in sorted(launch.meta.items()))}]"
        out.append(Variant(label, tag.split()[0], kernel, dict(launch.meta), signature, constexprs, attrs,
                           dict(options.__dict__)))
    return out


def covering(vs: list[Variant], turn: int = 0) -> list[Variant]:
    """One variant of each kernel x POOL x TRAINING among ``vs``: every kernel body and epilogue the
    launches use, at a fraction of the compile time.

    The precision of each pick rotates through the precisions present (starting ``turn`` places
    along), so two calls with ``turn`` 0 and 1 (e.g. one per arch) cover every kernel x pool x
    precision between them; and each pick takes the tile shape (BLOCK_M/N/K, STRIDE) picked least
    often so far (the earliest on ties), so the tile configs the launchers choose are spread over
    the picks instead of all coming from the first head.
    """
    precisions = list(dict.fromkeys(v.precision for v in vs))
    groups: dict = {}
    for v in vs:
        groups.setdefault((v.kernel.__name__, v.meta.get("POOL"), v.meta.get("TRAINING")), []).append(v)

    def tile(v):
        return tuple(v.meta.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STRIDE"))

    used: dict = {}
    out = []
    for i, candidates in enumerate(groups.values()):
        want = precisions[(i + turn) % len(precisions)]
        candidates = [v for v in candidates if v.precision == want] or candidates
        best = min(candidates, key=lambda v: used.get(tile(v), 0))  # min keeps the earliest on ties
        used[tile(best)] = used.get(tile(best), 0) + 1
        out.append(best)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as a child)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_variant(variant: Variant, arch: int) -> dict:
    """Lower one variant to PTX and a cubin for sm_``arch``; returns what was produced and how long it took."""
    import triton
    from triton.compiler import ASTSource

    target, _ = _backend(arch)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    compiled = triton.compile(
        ASTSource(variant.kernel, variant.signature, variant.constexprs, variant.attrs),
        target=target, options=variant.options,
    )
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    ptx = compiled.asm.get("ptx", "")
    cubin = compiled.asm.get("cubin", b"")
    targets = [line.split()[1] for line in ptx.splitlines() if line.startswith(".target")]
    shared = int(compiled.metadata.shared)
    limit = SHARED_MEMORY_LIMIT.get(arch)
    problems = []
    if not targets or not targets[0].startswith(f"sm_{arch}"):
        problems.append(f"PTX targets {targets}, expected sm_{arch}")
    if not (isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF"):
        problems.append("no ELF cubin produced")
    if limit is not None and shared > limit:
        problems.append(f"needs {shared} B of shared memory, sm_{arch} allows {limit} B per block")
    return dict(label=variant.label, kernel=variant.kernel.__name__, precision=variant.precision,
                meta=variant.meta, arch=arch, seconds=round(seconds, 3),
                cpu_seconds=round(cpu, 3),
                ptx_target=targets[0] if targets else None, cubin_bytes=len(cubin), shared_bytes=shared,
                num_warps=variant.options.get("num_warps"), problems=problems)


_VARIANT_CACHE: dict = {}


def _compile_job(job) -> dict:
    set_name, arch, index = job
    if (set_name, arch) not in _VARIANT_CACHE:  # once per worker process
        _VARIANT_CACHE[(set_name, arch)] = _variants_of(set_name, arch)
    v = _VARIANT_CACHE[(set_name, arch)][index]
    try:
        return compile_variant(v, arch)
    except Exception as exc:  # a compiler error is a finding to report, not a crash of the run
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
        return dict(label=v.label, kernel=v.kernel.__name__, precision=v.precision, meta=v.meta, arch=arch,
                    seconds=None, problems=[msg])


# name -> (launches, selection of the variants)
_LAUNCH_SETS = {
    "engine": (engine_launches, list),
    "quick": (engine_launches, covering),
    "matrix": (matrix_launches, list),
}


def _variants_of(set_name: str, arch: int) -> list[Variant]:
    launches, select = _LAUNCH_SETS[set_name]
    vs = variants(launches(), arch)
    if select is covering:
        # sm_90 and sm_80 take opposite precisions of each kernel x pool
        return covering(vs, turn=ARCHS.index(arch) if arch in ARCHS else 0)
    return select(vs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pgl_fast.kernels.lowering",
        description="Compile the fused head kernels to PTX + cubin for CUDA targets (no GPU needed).",
    )
    p.add_argument("--set", choices=sorted(_LAUNCH_SETS), default="engine",
                   help="engine: what the aux heads launch at the engine defaults (bf16 and fp32/tf32, "
                        "heads 1c2f/2c2f/adapt, batch 1024); quick: of those, one per kernel x pool per arch, "
                        "sm_90 and sm_80 taking opposite precisions; matrix: every precision x listed "
                        "tile config x pool")
    p.add_argument("--arch", type=int, action="append", help="compute capability x10, repeatable (default: 90 80)")
    p.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    p.add_argument("--list", action="store_true", help="list the variants without compiling")
    p.add_argument("--json", help="write the per-variant results to this file")
    args = p.parse_args(argv)
    archs = args.arch or list(ARCHS)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    for a in archs:
        if a < 70:
            p.error(f"--arch must be a CUDA compute capability x10 of at least 70, got {a}")
    if cbr._interpreting():
        p.error("TRITON_INTERPRET=1 is set: unset it, the interpreter has no compiler to lower with")
    why = lowering_unavailable()
    if why is not None:
        print(f"lowering unavailable: {why}", file=sys.stderr)
        return 3
    jobs = []
    for arch in archs:
        vs = _variants_of(args.set, arch)
        if args.list:
            for v in vs:
                print(f"sm_{arch} {v.label}")
        jobs += [(args.set, arch, i) for i in range(len(vs))]
    if args.list:
        return 0
    t0 = time.perf_counter()
    results = []

    def report(r):
        results.append(r)
        status = "FAIL " + "; ".join(r["problems"]) if r["problems"] else "ok"
        print(f"[{len(results)}/{len(jobs)}] sm_{r['arch']} {r['seconds']}s (cpu {r.get('cpu_seconds')}s) "
              f"shared={r.get('shared_bytes')} {r['label']}: {status}", flush=True)

    if args.jobs == 1:
        for j in jobs:
            report(_compile_job(j))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child would inherit the parent's triton/CUDA state
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for r in pool.map(_compile_job, jobs):
                report(r)
    wall = time.perf_counter() - t0
    bad = [r for r in results if r["problems"]]
    import triton

    summary = dict(set=args.set, archs=archs, triton=triton.__version__, variants=len(results), failed=len(bad),
                   wall_seconds=round(wall, 1), compile_seconds=round(sum(r["seconds"] or 0 for r in results), 1),
                   cpu_seconds=round(sum(r.get("cpu_seconds") or 0 for r in results), 1),
                   jobs=args.jobs)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, results=results), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
