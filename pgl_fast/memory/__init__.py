"""Memory: the tensor-memory tracker and step profiler (``profile``), the planner that picks the
global step's checkpointing from measured peaks (``planner``) and the host-memory release at phase
switches (``host``)."""
