"""The README's Python examples run as written."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks() -> list[str]:
    text = open(os.path.join(REPO, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


def test_ci_runs_exactly_the_readme_test_command():
    """The README's test command (the block under "## Tests") is the command .ci/run ends with."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    ci = [line.strip() for line in open(os.path.join(REPO, ".ci", "run")) if line.strip() and not line.startswith("#")]
    assert ci[-1] == command, (ci[-1], command)


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_python_example_runs(i, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()


def test_examples_import_only_the_top_level_package():
    """Users need only ``pgl_fast``: no README or docs example (Python or shell ``python -c``) and no
    script in examples/ imports one of its internal modules, and every name they take from it exists."""
    import pgl_fast

    texts = ["\n".join(python_blocks())]
    docs = os.path.join(REPO, "docs")
    texts += ["\n".join(re.findall(r"```python\n(.*?)```", open(os.path.join(docs, f)).read(), flags=re.S))
              for f in os.listdir(docs) if f.endswith(".md")]
    ex = os.path.join(REPO, "examples")
    texts += [open(os.path.join(ex, f)).read() for f in os.listdir(ex) if f.endswith(".py")]
    code = "\n".join(texts)
    internal = re.findall(r"(?:from|import)\s+(pgl_fast\.[\w.]+)", code)
    assert internal == [], internal
    # a parenthesised import may span lines; a plain one ends with its line
    for paren, plain in re.findall(r"from pgl_fast import (?:\(([\w\s,]+)\)|([\w ,]+))", code):
        for name in (n.strip() for n in (paren or plain).split(",") if n.strip()):
            assert getattr(pgl_fast, name) is not None, name
