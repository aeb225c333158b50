"""gpu_check on the CPU: the row functions at tiny sizes, the timer, the JSONL-per-row results with
the markdown regenerated after every row, the budget, and which tests it would run on a GPU. The
GPU test subset itself is never run here."""
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

from pgl_fast import gpu_check as gc
from pgl_fast.gpu_check import Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
TINY = dict(batch=8, device=CPU, dtype=None, channels_last=False, warmup=1, steps=2, max_timed_s=5.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bad_flags_and_no_cuda_are_one_line_errors(tmp_path, capsys):
    assert gc.main(["--budget-s", "0", "--out", str(tmp_path)]) == 2
    assert "--budget-s must be > 0" in capsys.readouterr().err
    assert gc.main(["--batch", "1", "--out", str(tmp_path)]) == 2
    assert "--batch must be >= 2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gc.main(["--skip-tests", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs a CUDA GPU" in err
        assert os.listdir(tmp_path) == []  # nothing written, no tests run


def test_plan_covers_the_table_and_compiles_last():
    rows = gc.plan_rows()
    names = {r.name for r in rows}
    for arch in ("resnet32", "resnet110"):
        assert f"plain bp {arch} J=1 eager" in names and f"plain bp {arch} J=1 compile" in names
        for J in (4, 16):
            for mode in ("eager", "graphs", "graphs+fused"):
                assert f"ours dgl {arch} J={J} {mode}" in names
            assert f"plain dgl {arch} J={J} eager" in names
            assert f"ours pgl-global {arch} J={J} eager" in names
        assert f"ours dgl {arch} J=4 compile" in names and f"plain dgl {arch} J=4 compile" in names
    first_compile = min(i for i, r in enumerate(rows) if r.mode == "compile")
    assert all(r.mode == "compile" for r in rows[first_compile:])  # the costly rows come last
    assert {r.arch for r in gc.plan_rows(archs=("resnet32",))} == {"resnet32"}


def test_gpu_test_selection_exercises_the_device_only():
    for quick in (False, True):
        cmd = gc.test_command(quick)
        paths = [a for a in cmd[3:] if a.startswith("tests/")]
        assert "tests/test_gpu.py" in paths and "tests/kernels" in paths
        assert "tests/core/test_methods.py" not in paths  # CPU float64 tensors: nothing for a GPU to check
        assert all(os.path.exists(os.path.join(REPO, p)) for p in paths)
    assert "tests/runtime/test_head_kernels_train.py" in gc.test_command(False)
    spec = importlib.util.spec_from_file_location("_gpu_tests", os.path.join(REPO, "tests", "test_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "cuda" in [m.name for m in mod.pytestmark]


def test_timer_matches_a_known_step_time():
    times = gc.time_steps(lambda: time.sleep(0.02), CPU, steps=3, max_s=10.0)
    assert len(times) == 3 and all(0.019 <= t < 0.2 for t in times)
    capped = gc.time_steps(lambda: time.sleep(0.02), CPU, steps=100, max_s=0.05)
    assert 2 <= len(capped) <= 5


def test_rows_run_on_cpu_and_every_row_is_on_disk_at_once(tmp_path):
    rows = gc.plan_rows(archs=("resnet8",), Js=(2,), compile_Js=(2,))
    results = gc.Results(str(tmp_path / "check"))
    results.append({"event": "header", "versions": {"device": "cpu"}, "date": "today", "command": "test",
                    "budget_s": 1, "batch": 8, "dtype": "float32", "warmup": 1, "steps": 2,
                    "compile_mode": "reduce-overhead"})
    seen = []

    def log(line):  # called right after each row: the row must already be in both files
        rec = results.read()
        seen.append(sum(r.get("event") == "row" for r in rec))
        assert rec[-1]["name"] == line.split(":")[0]
        assert rec[-1]["name"].split()[0] in open(results.md).read()

    out = gc.run_rows(rows, results, deadline=time.monotonic() + 3600, log=log, **TINY)
    assert seen == list(range(1, len(rows) + 1))
    status = {r["name"]: r for r in out}
    for name in ("plain bp resnet8 J=1 eager", "ours dgl resnet8 J=2 eager", "plain dgl resnet8 J=2 eager",
                 "ours pgl-global resnet8 J=2 eager"):
        r = status[name]
        assert r["status"] == "ok", r
        assert r["steps"] == 2 and r["images_per_s"] == pytest.approx(8 / (r["step_ms"] / 1e3))
        assert r["mem_kind"] == "not_measured_on_cpu"
    assert "CUDA graphs need a CUDA GPU" in status["ours dgl resnet8 J=2 graphs"]["reason"]
    assert "CPU" in status["ours pgl-global resnet8 J=2 eager+fused"]["reason"]
    for r in out:
        if r["mode"] == "compile":
            assert r["status"] == "skipped" and r["reason"]
    md = open(results.md).read()
    assert "| plain | bp | resnet8 | 1 | eager |" in md and "| 1.00 |" in md  # the ratio's own base
    assert "skipped: CUDA graphs need a CUDA GPU" in md
    assert "`not_measured_on_cpu`" in md and "How the memory numbers were taken" in md


def test_budget_overrun_records_the_remaining_rows_as_skipped(tmp_path):
    now = [0.0]
    rows = [Row("plain", "bp", "resnet8", 1, "eager", 5.0) for _ in range(4)]
    results = gc.Results(str(tmp_path / "check"))

    def log(_):
        now[0] += 6.0  # every measured or skipped row "takes" 6 s

    out = gc.run_rows(rows, results, deadline=12.0, clock=lambda: now[0], log=log, **TINY)
    assert [r["status"] for r in out] == ["ok", "ok", "skipped", "skipped"]
    assert "budget: 0 s left, the row needs ~5 s" in out[2]["reason"]
    lines = [json.loads(x) for x in open(results.jsonl)]
    assert [x["status"] for x in lines] == ["ok", "ok", "skipped", "skipped"]
    assert open(results.md).read().count("skipped: budget") == 2


def test_markdown_ratio_and_memory_legend():
    recs = [
        {"event": "row", "impl": "plain", "kind": "bp", "arch": "resnet32", "J": 1, "mode": "eager", "status": "ok",
         "step_ms": 10.0, "images_per_s": 1000.0, "first_call_s": 1.0, "peak_alloc_mib": 100.0,
         "peak_reserved_mib": 120.0, "graph_pool_mib": None, "mem_kind": "cuda_allocated"},
        {"event": "row", "impl": "ours", "kind": "dgl", "arch": "resnet32", "J": 16, "mode": "graphs", "status": "ok",
         "step_ms": 5.0, "images_per_s": 2000.0, "first_call_s": 3.0, "peak_alloc_mib": 50.0,
         "peak_reserved_mib": 60.0, "graph_pool_mib": 40.0, "mem_kind": "cuda_allocated+graph_capture_peak"},
        {"event": "row", "impl": "ours", "kind": "dgl", "arch": "resnet32", "J": 16, "mode": "graphs+fused",
         "status": "error", "error": "RuntimeError: boom"},
    ]
    md = gc.markdown(recs)
    assert "| ours | dgl | resnet32 | 16 | graphs | 5.00 | 2000 | 2.00 | 3.0 | 50 | 60 | 40 |" in md
    assert "error: RuntimeError: boom" in md
    assert "`cuda_allocated+graph_capture_peak`: " + gc.MEM_KINDS["cuda_allocated+graph_capture_peak"] in md
    assert "`cuda_allocated`: " in md


def test_results_stem_never_overwrites(tmp_path):
    stem = gc.results_stem(str(tmp_path), "NVIDIA H100 80GB HBM3", quick=True, today="2026-12-01")
    assert os.path.basename(stem) == "gpu-check-nvidia-h100-80gb-hbm3-2026-12-01-quick"
    open(stem + ".jsonl", "w").close()
    assert gc.results_stem(str(tmp_path), "NVIDIA H100 80GB HBM3", quick=True, today="2026-12-01") == stem + "-2"


def test_main_flow_prints_the_path_first_and_writes_every_record(tmp_path, monkeypatch, capsys):
    """main() end to end with the device parts replaced: CUDA "available", fake versions, tests and
    measurements (the real ones are exercised above on the CPU and by gpu_check on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(gc, "_versions", lambda: {"device": "Fake GPU 80GB", "torch": torch.__version__})
    calls = []

    def fake_tests(quick, timeout_s):
        calls.append(("tests", quick, timeout_s))
        return {"event": "tests", "command": "pytest", "returncode": 0, "outcome": "passed", "seconds": 1.0,
                "summary": "3 passed", "tail": ["3 passed"]}

    def fake_measure(row, **kw):
        calls.append(row.name)
        if row.mode == "graphs+fused":
            raise RuntimeError("boom\nsecond line")
        return dict(vars(row), name=row.name, status="ok", step_ms=1.0, images_per_s=1024e3 / (1 + len(calls)),
                    first_call_s=0.1, peak_alloc_mib=1.0, peak_reserved_mib=2.0, graph_pool_mib=None,
                    mem_kind="cuda_allocated", steps=5)

    monkeypatch.setattr(gc, "run_tests", fake_tests)
    monkeypatch.setattr(gc, "measure_row", fake_measure)
    assert gc.main(["--quick", "--out", str(tmp_path)]) == 1  # a failed row fails the check
    out = capsys.readouterr().out
    stem = str(tmp_path / f"gpu-check-fake-gpu-80gb-{__import__('datetime').date.today().isoformat()}-quick")
    assert out.splitlines()[0].startswith(f"results: {stem}.jsonl")
    assert calls[0][0] == "tests" and calls[0][1] is True and calls[0][2] <= 0.45 * 165 + 1e-9
    recs = [json.loads(x) for x in open(stem + ".jsonl")]
    assert [r["event"] for r in recs][:2] == ["header", "tests"] and recs[-1]["event"] == "end"
    rows = [r for r in recs if r["event"] == "row"]
    assert len(rows) == len(gc.plan_rows(archs=("resnet32",))) and {r["arch"] for r in rows} == {"resnet32"}
    assert {r["status"] for r in rows if r["mode"] == "graphs+fused"} == {"error"}
    assert rows[[r["mode"] for r in rows].index("graphs+fused")]["error"] == "RuntimeError: boom"
    md = open(stem + ".md").read()
    assert "# GPU check: Fake GPU 80GB" in md and "3 passed" in md and "exit code 1" in md


def test_tests_past_their_time_limit_keep_their_output(monkeypatch):
    script = "import time; print('tests/x.py ..'); print('2 passed so far'); time.sleep(30)"
    monkeypatch.setattr(gc, "test_command", lambda quick: [sys.executable, "-c", script])
    t0 = time.monotonic()
    r = gc.run_tests(True, timeout_s=2.0)
    assert time.monotonic() - t0 < 20
    assert r["outcome"] == "timed out after 2 s" and r["returncode"] is None
    assert "2 passed so far" in r["tail"] and r["summary"] == "2 passed so far"
