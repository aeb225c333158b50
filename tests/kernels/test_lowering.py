"""The fused head kernels lower to PTX and a cubin (Triton's real compiler and ptxas) for sm_90 and
sm_80 without a GPU, for the variants training launches; and the launch recording that lists those
variants follows the real launch path.

The CPU suite runs the kernels under the Triton interpreter (TRITON_INTERPRET=1), where
``@triton.jit`` builds no compilable kernel, so the compiles run in a subprocess with that variable
removed (``python -m pgl_fast.kernels.lowering``), each with a fresh Triton cache so every run
really compiles.

* ``quick`` (default run): for each of sm_90 and sm_80 one engine variant per kernel x pool (7),
  the two archs taking opposite precisions (bf16, fp32/tf32) and each spreading its picks over all
  four tile configs the launchers choose for the real heads: 14 compiles, every kernel x pool x
  precision and every kernel x pool x arch once.
* every engine variant (100 compiles) and the full matrix (84 per arch: four precisions x the three
  listed configs x pool on/off x the four kernels): ``slow`` and, since they take many CPU minutes,
  only with PGL_FAST_FULL_LOWERING=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pgl_fast.kernels import lowering  # noqa: E402
from pgl_fast.kernels.conv_bn_relu import (  # noqa: E402
    CONFIGS,
    KernelLaunch,
    _conv_bn_relu,
    record_launches,
    triton_available,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_UNAVAILABLE = lowering.lowering_unavailable()
needs_lowering = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"cannot lower to cubins: {_UNAVAILABLE}")
full_lowering = pytest.mark.skipif(
    os.environ.get("PGL_FAST_FULL_LOWERING") != "1",
    reason="many CPU minutes of compiles: set PGL_FAST_FULL_LOWERING=1 to run",
)
KERNELS = {"_conv_bn_relu_fwd_stats_kernel", "_conv_bn_relu_fwd_kernel", "_conv_bn_relu_bwd_reduce_kernel",
           "_conv_bn_relu_bwd_kernel"}


def _lower(tmp_path, *args, timeout=3600):
    """Run the lowering CLI in a clean subprocess; return its JSON report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # fresh: every variant really compiles
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's pgl_fast
    out = tmp_path / "lowering.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pgl_fast.kernels.lowering", *args, "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert out.exists(), f"lowering wrote no report (exit {proc.returncode}):\n{tail}"
    report = json.loads(out.read_text())
    failed = [f"sm_{r['arch']} {r['label']}: {'; '.join(r['problems'])}" for r in report["results"] if r["problems"]]
    assert not failed, "variants that did not lower:\n" + "\n".join(failed)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail}"
    return report


def _check_report(report, archs, precisions):
    results = report["results"]
    assert sorted({r["arch"] for r in results}) == sorted(archs)
    for r in results:
        # an sm_90 kernel is built for sm_90a (the wgmma instructions)
        assert r["ptx_target"] in (f"sm_{r['arch']}", f"sm_{r['arch']}a"), r
        assert r["cubin_bytes"] > 0 and r["shared_bytes"] <= lowering.SHARED_MEMORY_LIMIT[r["arch"]], r
    for arch in archs:
        mine = [r for r in results if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == KERNELS
        assert {r["precision"] for r in mine} == set(precisions)
        # pool on and off, in the three kernels that have the flag
        assert {r["meta"]["POOL"] for r in mine if "POOL" in r["meta"]} == {True, False}


@needs_lowering
def test_quick_engine_variants_lower_for_sm90_and_sm80(tmp_path):
    report = _lower(tmp_path, "--set", "quick", "--arch", "90", "--arch", "80", "-j", "2")
    assert report["summary"]["variants"] == 14  # (stats + 3 kernels x pool on/off) x 2 archs
    _check_report(report, (90, 80), lowering.ENGINE_PRECISIONS)
    covered = {(r["kernel"], r["meta"].get("POOL"), r["precision"]) for r in report["results"]}
    assert len(covered) == 14, covered  # each kernel x pool x precision on one of the two archs
    # every tile the launchers pick for the real heads is compiled for each arch. Worked out from
    # the rule (m64 when H_out*W_out <= 64 else m128; block_n / block_k = C_out / C_in capped at 64):
    # 16->32 s2 at 32 px, 32->64 s2 at 16 px, 64->64 s1 at 8 px, and 2c2f's 32->32 s1 at 16 px
    expected = {(128, 32, 16, 2), (64, 64, 32, 2), (64, 64, 64, 1), (128, 32, 32, 1)}
    for arch in (90, 80):
        tiles = {tuple(r["meta"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STRIDE"))
                 for r in report["results"] if r["arch"] == arch}
        assert tiles == expected, tiles


@needs_lowering
@full_lowering
@pytest.mark.slow
def test_every_engine_variant_lowers(tmp_path):
    report = _lower(tmp_path, "--set", "engine", "--arch", "90", "--arch", "80")
    assert report["summary"]["variants"] == 100
    _check_report(report, (90, 80), lowering.ENGINE_PRECISIONS)


@needs_lowering
@full_lowering
@pytest.mark.slow
def test_full_matrix_lowers(tmp_path):
    report = _lower(tmp_path, "--set", "matrix", "--arch", "90", "--arch", "80")
    # 4 precisions x 3 configs x (stats + fwd, reduce, bwd with pool on/off), for each of the 2 archs
    assert report["summary"]["variants"] == 2 * 84
    _check_report(report, (90, 80), tuple(lowering.PRECISIONS))


# ----------------------------------------------------------------------------------------------
# The recording that lists the variants (no compiles: fast)
# ----------------------------------------------------------------------------------------------


def test_engine_launches_follow_the_heads():
    # per head config, one training step launches stats + fwd + bwd-reduce + bwd per conv, and one
    # evaluation launches fwd per conv: 1c2f has one conv, 2c2f two, adapt = 2c2f/1c3f/1c2f at 16/32/64
    launches = lowering.engine_launches(precisions=("bf16",))
    per_conv = 5
    expected_convs = 3 * 1 + 3 * 2 + (2 + 1 + 1)
    assert len(launches) == per_conv * expected_convs
    names = [launch.kernel.__name__ for _, launch in launches]
    assert names[:5] == ["_conv_bn_relu_fwd_stats_kernel", "_conv_bn_relu_fwd_kernel",
                         "_conv_bn_relu_bwd_reduce_kernel", "_conv_bn_relu_bwd_kernel", "_conv_bn_relu_fwd_kernel"]
    # the 2c2f head's first conv keeps its full output (feeds the second conv), the last one pools
    two_conv = [launch for tag, launch in launches if tag == "bf16 2c2f C_in=16"]
    pools = [launch.meta["POOL"] for launch in two_conv if "POOL" in launch.meta]
    assert False in pools and True in pools
    # heads at the engine's batch, in bf16, with the stage-1 input at 32 px
    x = launches[0][1].args[0]
    assert x.device.type == "meta" and tuple(x.shape) == (1024, 16, 32, 32) and x.dtype == torch.bfloat16
    # the compiled-kernel settings, not the interpreter's: bf16 dots stay bf16, tiles from CONFIGS
    assert launches[0][1].meta["DOT_FP32"] is False
    assert launches[0][1].meta["BLOCK_M"] in {c.block_m for c in CONFIGS.values()}


def test_full_matrix_has_every_variant():
    # 4 precisions x 3 configs x 2 pools, each training fwd+bwd = 4 launches -> 96; the stats kernel
    # ignores pool, so 84 distinct (kernel, constexprs) remain
    launches = lowering.matrix_launches()
    assert len(launches) == 4 * 3 * 2 * 4
    distinct = {(launch.kernel.__name__, tag, tuple(sorted(launch.meta.items()))) for tag, launch in launches}
    assert len(distinct) == 84


@pytest.mark.skipif(not triton_available("cpu")[0], reason=triton_available("cpu")[1])
def test_recorded_launches_are_the_real_ones(monkeypatch):
    """What record_launches() collects on meta tensors is what a real launch gets: same kernels in
    the same order, grids, constexprs and argument shapes/strides/dtypes (here on the CPU with the
    interpreter, forcing a config and IEEE fp32 so no setting depends on the device)."""
    import importlib

    cbr = importlib.import_module("pgl_fast.kernels.conv_bn_relu")
    real: list[KernelLaunch] = []
    launch = cbr._launch

    def spy(kernel, grid, *args, **meta):
        real.append(KernelLaunch(kernel, tuple(grid), args, dict(meta)))
        return launch(kernel, grid, *args, **meta)

    def run(device):
        torch.manual_seed(0)
        x = torch.randn(2, 16, 8, 8, device=device, requires_grad=True)
        w = torch.randn(24, 16, 3, 3, device=device, requires_grad=True)
        g = torch.ones(24, device=device, requires_grad=True)
        b = torch.zeros(24, device=device, requires_grad=True)
        rm, rv = torch.zeros(24, device=device), torch.ones(24, device=device)
        y = _conv_bn_relu(x, w, g, b, rm, rv, stride=2, training=True, momentum=0.1, eps=1e-5, pool=False,
                          config=CONFIGS["m16"])
        y.backward(torch.ones_like(y))

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with record_launches() as recorded:
            run("meta")
        monkeypatch.setattr(cbr, "_launch", spy)
        run("cpu")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32

    def describe(launch):
        args = tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args)
        return launch.kernel.__name__, launch.grid, args, launch.meta

    assert len(real) == 4
    assert [describe(r) for r in recorded] == [describe(r) for r in real]


def test_recording_takes_meta_tensors_only():
    x = torch.randn(2, 16, 8, 8)
    w = torch.randn(32, 16, 3, 3)
    with record_launches():
        with pytest.raises(RuntimeError, match="meta tensors only"):
            _conv_bn_relu(x, w, torch.ones(32), torch.zeros(32), None, None, stride=1, training=True,
                          momentum=0.1, eps=1e-5, pool=True, config=None)
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with record_launches():
                pass


def test_cli_refuses_the_interpreter(capsys):
    # this process imported the kernels under TRITON_INTERPRET=1: no compiler to lower with
    if not lowering.cbr._interpreting():
        pytest.skip("kernels are compiled here, not interpreted")
    with pytest.raises(SystemExit) as exc:
        lowering.main(["--list"])
    assert exc.value.code == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
