"""``python -m pgl_fast.report OUT/GRID``: the report of a grid of finished runs.

The report itself is ``pgl_fast.experiments.report``; this module is its command and keeps the
names a script uses (``main``, ``write_report``, ``collect_runs``) importable as
``pgl_fast.report``."""
import sys

from .experiments.report import LAYOUTS, collect_runs, main, unfinished_runs, write_report

__all__ = ["LAYOUTS", "collect_runs", "main", "unfinished_runs", "write_report"]

if __name__ == "__main__":
    sys.exit(main())
