"""docs/cli.md lists every flag ``--help`` prints, and ``--help`` states each default once."""
import os
import re
import subprocess
import sys

import pytest

from pgl_fast.tools import cli_doc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI_PAGE = os.path.join(REPO, "docs", "cli.md")


@pytest.fixture(scope="module")
def help_text() -> str:
    """What a user sees: ``python -m pgl_fast.train --help`` at a fixed width, this checkout first."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "pgl_fast.train", "--help"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _entries(help_text: str) -> dict[str, str]:
    """{first option string: its help entry on one line}, read from the help text alone."""
    body = help_text.split("\n\n", 2)[-1]
    entries, current = {}, None
    for line in body.splitlines():
        m = re.match(r"^  (-{1,2}[A-Za-z][\w-]*)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_states_each_default_once(help_text):
    entries = _entries(help_text)
    assert len(entries) > 50
    for flag, entry in entries.items():
        assert len(re.findall(r"\(default\b", entry)) <= 1, entry
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    # the default the help text explains itself is not repeated ...
    assert entries["-b"].endswith("batch size (default 1024; 128 for stl10)"), entries["-b"]
    assert entries["--cache-dir"].endswith("(default <data-dir>/.pgl_cache)"), entries["--cache-dir"]
    # ... and a plain default is still given once
    assert entries["--epochs"].endswith("(default: 160)"), entries["--epochs"]
    assert entries["--momentum"].endswith("(default: 0.9)"), entries["--momentum"]


def test_profile_help_states_its_own_batch_default_once():
    from pgl_fast.memory import profile  # the memory profiler's command shares the training flags' help texts

    entries = _entries(profile.build_parser().format_help())
    assert entries["-b"].endswith("batch size (default: 256)"), entries["-b"]
    assert entries["--warmup-batch"].endswith("it only creates optimizer state"), entries["--warmup-batch"]


def test_every_flag_of_help_is_in_docs_cli_md(help_text):
    page = open(CLI_PAGE).read()
    flags = set()
    for line in help_text.split("\n\n", 2)[-1].splitlines():
        if not re.match(r"^  -", line):
            continue
        head = re.split(r"\s{2,}", line.strip())[0]  # "-J J, --modules J": option strings and metavars
        flags.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", head))
    flags.discard("-h")
    flags.discard("--help")
    missing = sorted(f for f in flags if f"`{f}`" not in page)
    assert not missing, f"docs/cli.md lacks {missing}: run python -m pgl_fast.tools.cli_doc --write docs/cli.md"
    for flag in ("--model", "--cuts", "--cifar-stem", "--resume", "--pipeline"):  # ones the old README missed
        assert flag in flags


def test_docs_cli_md_table_is_the_generated_one():
    page = open(CLI_PAGE).read()
    assert cli_doc.page_table(page) == cli_doc.flag_table(), \
        "docs/cli.md's flag table is stale: run python -m pgl_fast.tools.cli_doc --write docs/cli.md"


def test_cli_doc_write_replaces_only_the_block(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n\n{cli_doc.BEGIN}\nold table\n{cli_doc.END}\n\nafter\n")
    assert cli_doc.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{cli_doc.END}\n\nafter\n")
    assert "old table" not in text and "| `--dataset` | `cifar10`, `svhn`, `stl10`, `imagefolder`, `synthetic` |" in text
    page.write_text("no markers\n")
    assert cli_doc.main(["--write", str(page)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the page needs exactly one line") and err.count("\n") == 1
