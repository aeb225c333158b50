"""Whether this checkout of the engine is installed, at its own version, with what it needs.

The quick start is one command that is run again, unchanged, to resume a stopped run. Its set-up
part is guarded by this check, so a restart with everything in place goes straight to training
instead of spending seconds in pip:

    python -m pgl_fast.tools.check_install || pip install -e ".[test]"

Exit status 0: the ``pgl_fast`` distribution is installed at this checkout's ``__version__`` and
every distribution it requires (with the extras asked for, ``test`` by default) is installed.
Exit status 1: one line per thing missing, on stderr. Only presence is checked, not version
ranges: pip checks those when it installs, and on a machine whose own torch is older than the
one the CPU machines pin, the installed torch is the right one. Nothing heavy is imported, so the
check takes a fraction of a second.
"""
from __future__ import annotations

import importlib.metadata
import re
import sys

from .. import __version__
from ..config.argparsing import OneLineParser

# A requirement line of the installed metadata: ``torch>=2.4`` or ``pytest>=7; extra == "test"``.
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def missing(extras: tuple[str, ...] = ("test",)) -> list[str]:
    """What is not installed (empty when everything is), each as a short sentence."""
    try:
        installed = importlib.metadata.version("pgl_fast")
    except importlib.metadata.PackageNotFoundError:
        return ["pgl_fast is not installed"]
    if installed != __version__:
        return [f"pgl_fast {installed} is installed, this checkout is {__version__}"]
    out = []
    for req in importlib.metadata.requires("pgl_fast") or ():
        spec, _, marker = req.partition(";")
        extra = _EXTRA.search(marker)
        if extra and extra.group(1) not in extras:
            continue
        name = _NAME.match(spec).group(1)
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} is not installed" + (f" (needed by pgl_fast[{extra.group(1)}])" if extra else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m pgl_fast.tools.check_install", description=__doc__.splitlines()[0])
    ap.add_argument("--extras", default="test",
                    help="comma-separated extras of pgl_fast whose requirements must be installed too ('' for none)")
    args = ap.parse_args(argv)
    gaps = missing(tuple(e for e in args.extras.split(",") if e))
    for line in gaps:
        print(f"check_install: {line}", file=sys.stderr)
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
