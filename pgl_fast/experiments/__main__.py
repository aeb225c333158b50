"""``python -m pgl_fast.experiments``: the experiment runner's command (see ``pgl_fast.experiments``)."""
import sys

from .runner import main

sys.exit(main())
