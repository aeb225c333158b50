"""Training: the epoch loop (``trainer``) and what it leans on -- checkpoints and resume
(``checkpoint``), run directories and their claims (``rundir``), signal and non-finite guards
(``guards``), progress lines (``progress``) and ``metrics.jsonl`` (``metrics``)."""
