"""The paper's experiments: its tables as named grids of separate, resumable training runs, and their report.

    python -m pgl_fast.experiments table1 --protocol cpu --out runs/exp          # run (or continue)
    python -m pgl_fast.experiments table1 --protocol cpu --out runs/exp --dry-run
    python -m pgl_fast.experiments table1 --protocol cpu --out runs/exp \
        --only J=16 --only variant=bp --only "variant=dgl|pgl-adapt,J=4"          # a subset now, the rest later
    python -m pgl_fast.report runs/exp/table1                                     # the report (also written at the end of a run)

The package has three parts, each depending only on the ones before it: ``grids`` (the variants,
protocols and grids: which runs a table needs), ``report`` (reads finished runs and writes the tables
and plots) and ``runner`` (plans and runs the training subprocesses, then writes the report).
``python -m pgl_fast.experiments`` is the runner's command, ``python -m pgl_fast.report`` the report's.

Every run is its own subprocess (``python -m pgl_fast.train ...``; a crash of one run never kills the
runner) writing into ``<out>/<grid>/<arch>-<variant>-J<J>[-P<P>Q<Q>]-s<seed>`` (P and Q only for PGL,
the only method they affect). A run is *finished* when its ``summary.json`` exists and is then skipped;
a run with a checkpoint is continued with ``--resume auto``; anything else starts fresh. The runner
can be stopped at any time (Ctrl-C or SIGTERM: the running child is terminated and keeps its last
checkpoint, written atomically at every epoch end and every ``--save-every`` steps) and simply
started again.
A run directory is locked (``flock``) while its child runs, so two runners on the same grid never
train the same run twice. The exact command of every invocation is appended to the run's
``command.txt`` and to the grid's ``commands.txt``; ``grid.json`` is the manifest (protocol, data,
every planned run with its directory, command and status). A run directory whose ``config.json``
disagrees with the plan (another protocol, epochs, batch, lr, ...) is refused with a one-line error:
results of different protocols never mix in one directory.

Data: ``--dataset imagefolder`` (the default) reads ``--data-dir`` (default ``.cache/cifar10-jpeg``,
the offline JPEG copy of CIFAR-10, unpacked from ``--archive``, by default
``<repo>/../shared/data/cifar10-jpeg.tar.gz``, when it is missing). ``--dataset cifar10`` loads
CIFAR-10 through torchvision and downloads it into ``--data-dir`` (default ``./data``).
"""
from .grids import (FILTER_KEYS, GRIDS, LOCAL_VARIANTS, OFFLINE_COPY_NAME, PROTOCOLS, VARIANTS, Entry, Protocol,
                    Run, Variant, parse_filter, parse_seeds, plan_runs)
from .runner import (DEFAULT_ARCHIVE, RunnerResult, Settings, build_parser, check_manifest, check_run_dir, command,
                     ensure_data, execute, execute_plan, main, run_status, settings_from_args, train_args)

__all__ = ["FILTER_KEYS", "GRIDS", "LOCAL_VARIANTS", "OFFLINE_COPY_NAME", "PROTOCOLS", "VARIANTS", "Entry",
           "Protocol", "Run", "Variant", "parse_filter", "parse_seeds", "plan_runs", "DEFAULT_ARCHIVE",
           "RunnerResult", "Settings", "build_parser", "check_manifest", "check_run_dir", "command", "ensure_data",
           "execute", "execute_plan", "main", "run_status", "settings_from_args", "train_args"]
