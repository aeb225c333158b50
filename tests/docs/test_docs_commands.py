"""Every shell command of the README and of the docs/ pages runs, or at least parses.

A ```bash block is preceded by a marker line that says how it is tested:

- ``<!-- doc-test: run -->``: the block runs as written, in a fresh folder (so it must be tiny);
- ``<!-- doc-test: check -->`` (also the default for a block without a marker): every
  ``python -m pgl_fast...`` command in it (also after ``torchrun ... -m``, or inside ``a && b``)
  is parsed by the command it calls without doing the work: ``pgl_fast.train`` with
  ``--describe`` (flags validated, network built and printed, no data read, nothing written),
  ``pgl_fast.experiments`` with ``--dry-run``, any other module through its ``--help``, which must
  list every flag the command uses; ``python script.py`` and ``pytest PATH`` need their files;
  ``pip``, ``mkdir`` and other programs are left alone;
- ``<!-- doc-test: skip (reason) -->``: not run (the whole test suite, say).

```python blocks of the docs/ pages are executed too (the README's are run by test_readme.py);
```py blocks are shown only (a torchrun script, say).
"""
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pgl_fast import train
from pgl_fast.experiments import main as experiments_main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<mode>\w+)[^\n]*-->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)


def pages() -> list[Path]:
    docs = [p for p in sorted((REPO / "docs").rglob("*.md")) if "experiments" not in p.relative_to(REPO / "docs").parts]
    return [REPO / "README.md", *docs]


def blocks(lang: str) -> list[tuple[str, str, str]]:
    """(id, mode, body) of every ``lang`` block of every page."""
    out = []
    for page in pages():
        for i, m in enumerate(m for m in _BLOCK.finditer(page.read_text()) if m.group("lang") == lang):
            out.append((f"{page.relative_to(REPO)}#{i}", m.group("mode") or "check", m.group("body")))
    return out


def commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, and
    ``a && b``, ``a || { b; }``, ``a; b`` split into their parts."""
    out, variables = [], {}
    for line in body.replace("\\\n", " ").splitlines():
        line = re.split(r"(?:^|\s)#\s", line.strip())[0].strip()
        for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
            part = part.strip().strip("{}").strip()
            for name, value in variables.items():  # a block may name a common prefix: B="..."; $B --x
                part = part.replace(f"${name}", value)  # unquoted: the shell splits it into words
            words = shlex.split(part) if part else []
            if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
            elif words:
                out.append(words)
    return out


def _module_and_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        return argv[i + 1], argv[i + 2:]
    if argv[0] == "python" and argv[1:2] == ["-m"]:
        return argv[2], argv[3:]
    return None, argv


def _exit_code(main, args: list[str]) -> int:
    """A CLI's ``main(args)``: its return value, or the status it exits with (argparse errors)."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def check_command(argv: list[str]) -> str:
    """Parse one command as the module docstring says; returns what was done (for the test's id)."""
    module, args = _module_and_args(argv)
    if module is None:
        if argv[0] == "python" and argv[1].endswith(".py"):
            assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
            return "file"
        return "not checked"
    if module == "pytest":
        for path in (a for a in args if not a.startswith("-")):
            assert (REPO / path.split("::")[0]).exists(), f"pytest path {path} does not exist"
        return "paths"
    if module == "pgl_fast.train":
        extra = [] if {"--describe", "--plan"} & set(args) else ["--describe"]
        assert _exit_code(train.main, args + extra) == 0, f"{shlex.join(argv)} does not parse"
        return "describe"
    if module == "pgl_fast.experiments":
        assert _exit_code(experiments_main, args + ["--dry-run"]) == 0, f"{shlex.join(argv)} does not parse"
        return "dry-run"
    help_text = io.StringIO()
    old_argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as e, warnings.catch_warnings():
            # runpy warns that the module is imported already (pgl_fast's other tests import it): harmless
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = old_argv
    assert e.value.code in (0, None), f"python -m {module} --help failed"
    for flag in (a.split("=")[0] for a in args if a.startswith("-")):
        assert flag in help_text.getvalue(), f"python -m {module} has no flag {flag}"
    return "help"


def _checkout_status() -> str:
    """``git status`` of the checkout ('' where git or the .git folder is absent, as in an sdist)."""
    if shutil.which("git") is None:
        return ""
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


BASH = blocks("bash")


def test_every_page_is_found_and_every_marker_is_known():
    names = {p.relative_to(REPO).as_posix() for p in pages()}
    assert {"README.md", "docs/cli.md", "docs/memory.md", "docs/gpu.md", "docs/scaling-out.md", "docs/checkpoints.md",
            "docs/reproducing.md", "docs/architecture.md"} <= names
    assert {mode for _, mode, _ in BASH} <= {"run", "check", "skip"}
    assert sum(mode == "run" for _, mode, _ in BASH) >= 2


def test_commands_are_split_as_the_shell_splits_them():
    body = ('python -m a --x 1 || { pip install "b==1" && pip install -e ".[test]"; } && python -m c \\\n'
            '    --d "e|f"  # a comment\n# a whole comment line\nB="python -m g --h 2"\n$B --i 3\n')
    assert commands(body) == [["python", "-m", "a", "--x", "1"], ["pip", "install", "b==1"],
                              ["pip", "install", "-e", ".[test]"], ["python", "-m", "c", "--d", "e|f"],
                              ["python", "-m", "g", "--h", "2", "--i", "3"]]


def test_a_bad_flag_fails_the_check(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(AssertionError):
        check_command(["python", "-m", "pgl_fast.train", "--arch", "resnet8", "-J", "2", "--no-such-flag"])
    with pytest.raises(AssertionError, match="has no flag --no-such-flag"):
        check_command(["python", "-m", "pgl_fast.tools.cli_doc", "--no-such-flag"])


@pytest.mark.parametrize("page_id,mode,body", [b for b in BASH if b[1] == "check"], ids=[b[0] for b in BASH if b[1] == "check"])
def test_check_block_parses(page_id, mode, body, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the pages' relative paths are relative to the repository root
    before = _checkout_status()
    done = [check_command(argv) for argv in commands(body)]
    assert {"describe", "dry-run", "help", "file", "paths"} & set(done), f"{page_id}: nothing in it was checked"
    assert _checkout_status() == before, f"{page_id}: checking it changed the checkout"


@pytest.mark.parametrize("page_id,mode,body", [b for b in BASH if b[1] == "run"], ids=[b[0] for b in BASH if b[1] == "run"])
def test_run_block_runs(page_id, mode, body, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"{page_id} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"


# architecture.md's worked examples register heads and data sets: test_architecture_examples.py runs
# them, checks what they build and removes what they registered
DOC_PYTHON = [b for b in blocks("python") if not b[0].startswith(("README.md", "docs/architecture.md"))]


@pytest.mark.parametrize("page_id,mode,body", DOC_PYTHON, ids=[b[0] for b in DOC_PYTHON])
def test_docs_python_block_runs(page_id, mode, body, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(body, page_id, "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip()


def test_every_relative_link_resolves():
    """Every ``[text](path)`` link of the pages that is not a web address names a file or folder."""
    broken = []
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"\w+://", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
