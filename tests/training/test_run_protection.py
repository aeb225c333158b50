"""No run is ever lost: a dir that holds a run is refused without --resume/--overwrite, one lock
per dir (a second run names the first; a SIGKILLed holder's lock is taken over), SIGINT/SIGTERM
save a mid-epoch checkpoint and print the command that resumes it exactly, --resume auto starts
fresh where there is nothing to resume, a schedule change on resume is refused unless asked for,
and a run that fails validation creates nothing.

The interrupt tests reuse the deterministic tiny PGL run and the bit-identical comparison of
tests/training/test_resume.py: an interrupted run resumed with the printed command must end exactly where
the uninterrupted reference ends.
"""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pgl_fast.training import rundir
from pgl_fast.config import build_parser
from pgl_fast.train import main, resume_command
from test_nonfinite import poison_output
from test_resume import (ARGS, EPOCHS, FINAL, REPO, assert_same_run, ckpt_names, load, one_error_line,  # noqa: F401
                         read_jsonl, reference)

# in-process runs: no --deterministic (it would switch the test process itself to deterministic
# algorithms); the same tiny PGL run otherwise (6 steps per epoch, epochs 1-2 local, 3 global)
FAST = [a for a in ARGS if a != "--deterministic"]


pytestmark = pytest.mark.usefixtures("one_thread")


def with_epochs(args, n):
    i = args.index("--epochs")
    return args[:i + 1] + [str(n)] + args[i + 2:]


def snapshot(d):
    """Every file under d -> its bytes (the lock file aside: it records who held the dir last)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            if f != rundir.LOCK_NAME:
                p = os.path.join(root, f)
                out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGL_FAST_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def cli(out, *extra, env=None, args=ARGS):
    return subprocess.run([sys.executable, "-m", "pgl_fast.train", *args, "-o", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env or subprocess_env(), timeout=300)


# -- a dir that holds a run -------------------------------------------------------------------------
def test_rerun_into_a_finished_run_is_refused_and_touches_nothing(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert main(FAST + ["-o", str(out)]) == 2
    line = one_error_line(capsys)
    assert line == (f"error: {out} holds a run: {EPOCHS}/{EPOCHS} epochs done, finished; use --resume auto, "
                    "another --output-dir, or --overwrite")
    assert snapshot(out) == before


def test_rerun_into_an_unfinished_run_names_its_progress(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "summary.json").unlink()
    (out / "checkpoints" / FINAL).unlink()  # left: ckpt-e0003-s000004 (4 steps into epoch 4)
    rows = read_jsonl(out / "metrics.jsonl")[:3]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(out)
    assert main(FAST + ["-o", str(out)]) == 2
    assert f"holds a run: 3/{EPOCHS} epochs done and 4 steps of epoch 4;" in one_error_line(capsys)
    assert snapshot(out) == before


def test_overwrite_removes_the_old_run_and_nothing_else(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "keep.txt").write_text("also mine")
    assert main(with_epochs(FAST, 1) + ["--save-every", "0", "-o", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert (f"--overwrite: removed the earlier run in {out} ({EPOCHS}/{EPOCHS} epochs done, finished): "
            "config.json, header.json, metrics.jsonl, summary.json, 2 checkpoints") in printed
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "keep.txt").exists()
    # only the new run's files: nothing of the old run's 4 epochs survives beside them
    assert ckpt_names(out) == ["ckpt-e0001-s000000.pt", "keep.txt"]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys):
    assert main(FAST + ["-o", str(tmp_path / "run"), "--overwrite", "--resume", "auto"]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_explicit_resume_into_a_dir_holding_another_run_is_refused(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    other = os.path.join(reference, "checkpoints", "ckpt-e0003-s000004.pt")
    assert main(FAST + ["-o", str(out), "--resume", other]) == 2
    assert f"{out} holds another run" in one_error_line(capsys)
    assert snapshot(out) == before


# -- --resume auto with nothing to resume ----------------------------------------------------------
def test_resume_auto_into_a_new_dir_starts_fresh(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(with_epochs(FAST, 1) + ["-o", str(out), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert f"--resume auto: no checkpoint in {out / 'checkpoints'}; starting a new run\n" in printed
    assert "resumed from" not in printed
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1] and (out / "summary.json").exists()


def test_resume_auto_over_a_start_without_checkpoint_replaces_its_files(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # a start killed inside epoch 1 (before any checkpoint), plus a stray summary of an older run
    for name in ("config.json", "header.json", "summary.json"):
        (out / name).write_text("{}")
    (out / "metrics.jsonl").write_text("")
    (out / "train.log").write_text("the runner's log")
    assert main(with_epochs(FAST, 1) + ["-o", str(out), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert (f"--resume auto: no checkpoint in {out / 'checkpoints'}; starting a new run (removed the files of an "
            "earlier start that has none: config.json, header.json, metrics.jsonl, summary.json)") in printed
    assert (out / "train.log").read_text() == "the runner's log"
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_explicit_missing_checkpoint_stays_an_error_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["-o", str(out), "--resume", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in one_error_line(capsys)
    assert not out.exists()


# -- schedule changes on resume --------------------------------------------------------------------
def test_resume_with_other_epochs_is_refused(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert main(with_epochs(FAST, EPOCHS + 1) + ["-o", str(out), "--resume", "auto"]) == 2
    line = one_error_line(capsys)
    assert f"epochs: checkpoint {EPOCHS} vs now {EPOCHS + 1}" in line and FINAL in line
    assert "--allow-schedule-change" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("extra,field", [(["--lr", "0.1"], "lr"), (["-Q", "2"], "duration"),
                                          (["--sched", "constant"], "sched")], ids=["lr", "Q", "sched"])
def test_resume_with_another_schedule_field_is_refused(tmp_path, reference, capsys, extra, field):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(FAST + extra + ["-o", str(out), "--resume", "auto"]) == 2
    assert f"{field}: checkpoint" in one_error_line(capsys)


def test_optimizer_settings_cannot_change_even_when_allowed(tmp_path, reference, capsys):
    # they are restored from the optimizers' state: a new value would be silently ignored
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(FAST + ["--momentum", "0.5", "--allow-schedule-change", "-o", str(out), "--resume", "auto"]) == 2
    assert "momentum: checkpoint 0.9 vs now 0.5" in one_error_line(capsys)


def test_fewer_epochs_than_done_is_refused_even_when_allowed(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert main(with_epochs(FAST, 2) + ["--allow-schedule-change", "-o", str(out), "--resume", "auto"]) == 2
    assert "--epochs 2 is fewer than the 4 epochs" in one_error_line(capsys)


def test_allowed_schedule_change_is_warned_and_recorded(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    new = EPOCHS + 1
    assert main(with_epochs(FAST, new) + ["--allow-schedule-change", "-o", str(out), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert (f"warning: --allow-schedule-change: the rest of this run follows a new schedule (epochs {EPOCHS} -> {new}) "
            f"from epoch {EPOCHS + 1} on; recorded in header.json") in printed
    header = json.loads((out / "header.json").read_text())
    assert header["schedule_changed_from"] == {"epochs": EPOCHS}
    assert header["schedule_changes"] == [{"at_epoch": EPOCHS, "at_step": 0, "from": {"epochs": EPOCHS},
                                           "to": {"epochs": new}}]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, new + 1))
    # the new epoch follows the new cosine schedule: 0.5 lr (1 + cos(pi e / E)), 0-based e
    assert rows[-1]["lr"] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * EPOCHS / new)), rel=1e-12)
    assert json.loads((out / "summary.json").read_text())["epochs"] == new
    # the history travels with the checkpoints: a later resume (same flags) keeps it in its header
    assert load(out / "checkpoints" / f"ckpt-e{new:04d}-s000000.pt")["schedule_changes"] == header["schedule_changes"]


# -- validation before anything is created ---------------------------------------------------------
@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--memory-budget", "0.01"], "--memory-budget"),
], ids=["data-dir", "memory-budget"])
def test_a_failing_run_leaves_no_folder(tmp_path, capsys, extra, needle):
    out = tmp_path / "a" / "b"
    assert main(FAST + extra + ["-o", str(out)]) == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "a").exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(FAST + ["-o", str(f)]) == 2
    assert one_error_line(capsys) == f"error: --output-dir {f}: is a file, not a directory"
    assert main(FAST + ["-o", str(f / "sub")]) == 2
    assert one_error_line(capsys) == f"error: --output-dir {f / 'sub'}: {f} is a file, not a directory"
    assert f.read_text() == "x"


# -- the lock ----------------------------------------------------------------------------------------
def _wait_stopped(p, timeout=120):
    """Until process p is stopped (SIGSTOP) or has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError(f"process {p.pid} did not stop (rc {p.poll()})")


def test_second_run_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    # a real training process that stops itself (SIGSTOP) 3 steps into epoch 1, holding the lock
    first = subprocess.Popen([sys.executable, "-m", "pgl_fast.train", *ARGS, "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                             env=subprocess_env(PGL_FAST_SIGNAL_AT="1:3:STOP"))
    try:
        _wait_stopped(first)
        before = snapshot(out)
        assert main(FAST + ["-o", str(out), "--resume", "auto"]) == 2
        line = one_error_line(capsys)
        assert line.startswith(f"error: {out} is in use by pid {first.pid} on ")
        assert f"-m pgl_fast.train {shlex.join(ARGS)} -o {out})" in line and " since 20" in line
        assert snapshot(out) == before
    finally:
        first.kill()  # SIGKILL: the lock file stays behind, the lock itself dies with the process
        first.wait()
    assert (out / rundir.LOCK_NAME).exists() and ckpt_names(out) == ["ckpt-e0000-s000002.pt"]
    assert main(FAST + ["-o", str(out), "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_lock_is_released_when_the_run_ends(tmp_path):
    out = tmp_path / "run"
    assert main(with_epochs(FAST, 1) + ["-o", str(out)]) == 0
    with rundir.DirLock.acquire(str(out), "test"):  # would raise if the finished run still held it
        pass


# -- SIGINT / SIGTERM ------------------------------------------------------------------------------
def resume_with_printed_command(out, reference, stderr, path):
    """The last stderr line is the resume command: run it; the run must end exactly as the
    uninterrupted reference did."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("resume with: ")
    cmd = shlex.split(last[len("resume with: "):])
    assert cmd[:3] == [sys.executable, "-m", "pgl_fast.train"] and cmd[-2:] == ["--resume", "auto"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {path}" in r.stdout
    assert_same_run(str(out), reference)


@pytest.mark.slow
def test_sigint_mid_epoch_saves_and_the_printed_command_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    r = cli(out, env=subprocess_env(PGL_FAST_SIGNAL_AT="2:3:INT"))  # 3 steps into local epoch 2
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "done:" not in r.stdout
    path = os.path.join(str(out), "checkpoints", "ckpt-e0001-s000003.pt")
    assert r.stderr.strip().splitlines()[-2] == f"interrupted (SIGINT) at epoch 2, step 3/6; saved {path}", r.stderr
    assert ckpt_names(out)[-1] == os.path.basename(path) and not (out / "summary.json").exists()
    state = load(path)
    # a real mid-epoch checkpoint: the epoch's batch order and its statistics so far
    assert sorted(state["mid_epoch"]["perm"].tolist()) == list(range(96))
    assert (state["mid_epoch"]["stats"]["first_bad"] < 0).all()
    resume_with_printed_command(out, reference, r.stderr, path)


@pytest.mark.slow
def test_sigterm_from_outside_saves_and_the_printed_command_resumes_exactly(tmp_path, reference):
    # a real SIGTERM from another process (as a scheduler or the experiment runner sends it), sent
    # once epoch 1's checkpoint exists: wherever in epoch 2 it lands, the resumed run is exact
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "pgl_fast.train", *ARGS, "-o", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env())
    try:
        deadline = time.time() + 240
        while "ckpt-e0001-s000000.pt" not in ckpt_names(out) and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, (p.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "done:" not in stdout
    block = stderr.strip().splitlines()[-2]
    # it may land before epoch 1's metrics line is written, inside epoch 2, or in its last step
    assert re.fullmatch(r"interrupted \(SIGTERM\) at (the end of epoch [12]|epoch 2, step [1-5]/6); saved \S+",
                        block), stderr
    path = block.rsplit("; saved ", 1)[1]
    assert ckpt_names(out)[-1] == os.path.basename(path)
    resume_with_printed_command(out, reference, stderr, path)


def test_interrupt_in_the_last_step_saves_the_epoch(tmp_path, monkeypatch, capsys):
    # in-process: the handlers are installed in the main thread, which pytest runs tests in
    out = tmp_path / "run"
    monkeypatch.setenv("PGL_FAST_SIGNAL_AT", "2:6:INT")
    assert main(with_epochs(FAST, 3) + ["-o", str(out)]) == 130
    lines = capsys.readouterr().err.strip().splitlines()
    path = os.path.join(str(out), "checkpoints", "ckpt-e0002-s000000.pt")
    assert lines[-2] == f"interrupted (SIGINT) at the end of epoch 2; saved {path}"
    assert lines[-1].startswith("resume with: ") and lines[-1].endswith(f"-o {out} --resume auto")
    assert ckpt_names(out)[-1] == "ckpt-e0002-s000000.pt"
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert not (out / "summary.json").exists()


def test_second_sigint_exits_at_once(tmp_path):
    out = tmp_path / "run"
    r = cli(out, env=subprocess_env(PGL_FAST_SIGNAL_AT="1:3:INT,1:3:INT"), args=with_epochs(ARGS, 1))
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])
    assert "SIGINT again: exiting now; the newest complete checkpoint is intact" in r.stderr
    assert "interrupted (" not in r.stderr and "Traceback" not in r.stderr
    # nothing was saved for the interrupt: the newest checkpoint is --save-every's, before step 3
    assert ckpt_names(out) == ["ckpt-e0000-s000002.pt"]
    assert read_jsonl(out / "metrics.jsonl") == []


def test_interrupt_never_saves_poisoned_weights(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    poison_output(monkeypatch, 2, epoch=2, step=2, value=math.nan)
    monkeypatch.setenv("PGL_FAST_SIGNAL_AT", "2:3:INT")
    assert main(FAST + ["--save-every", "0", "-o", str(out)]) == 3
    assert one_error_line(capsys).startswith("error: non-finite loss at epoch 2, step 2, phase local, module 2")
    assert ckpt_names(out) == ["ckpt-e0001-s000000.pt"]
    # the handlers lived only as long as the training loop
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_resume_command_drops_resume_and_overwrite():
    # "--resu": an abbreviation argparse accepts ("--res" is ambiguous since --resident-budget)
    argv = ["--dataset", "synthetic", "-o", "runs/x", "--overw", "--resume=old.pt", "-J", "4", "--resu", "a.pt",
            "--allow-schedule-change", "--epochs", "3"]
    cmd = shlex.split(resume_command(None, argv))
    assert cmd[:3] == [sys.executable, "-m", "pgl_fast.train"]
    assert cmd[3:] == ["--dataset", "synthetic", "-o", "runs/x", "-J", "4", "--epochs", "3", "--resume", "auto"]
    parsed = vars(build_parser().parse_args(cmd[3:]))
    assert (parsed["resume"], parsed["overwrite"], parsed["output_dir"], parsed["modules"]) == ("auto", False, "runs/x", 4)


def test_runner_resumes_a_start_that_left_files_but_no_checkpoint(tmp_path, capsys):
    # the experiment runner calls such a run "new"; started without --resume, the training would
    # refuse the dir, so it passes --resume auto (which replaces the partial files)
    from pgl_fast import experiments

    out = tmp_path / "exp"
    partial = out / "table1" / "resnet8-dgl-J4-s0"
    partial.mkdir(parents=True)
    (partial / "header.json").write_text("{}")
    (partial / "metrics.jsonl").write_text("")
    assert experiments.main(["table1", "--protocol", "tiny", "--device", "cpu", "--only", "J=4,variant=dgl",
                             "--out", str(out), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "pgl_fast.train" in ln]
    assert len(lines) == 2
    for ln in lines:
        assert ln.endswith("--resume auto") == (f"-o {partial} " in ln + " "), ln
