"""CPU choices by measurement (``--cpu-tune auto``): the intra-op thread count, channels-last or
not, and the optimizer's kernel (torch's fused or foreach SGD), each picked by timing this run's
own step on this machine.

The step measured is the run's main step kind (the local step; the global step for ``bp``) on a
copy of the network, at the run's batch size capped at ``MAX_BATCH`` (a few seconds in all), on
random data, with the random streams saved and restored, so the run itself starts exactly where it
would have. Candidates are timed in interleaved rounds (``ROUNDS``), the median kept. The optimizer
kernels are timed on their own, on copies of the parameters with random gradients (a step of the
network hides a fraction of a millisecond in its noise). Each factor is decided in turn -- threads,
then the memory format at the chosen threads -- rather than over the full grid.

``torch.compile`` is not among the choices: compiling a J=16 network takes minutes on a CPU, far
beyond a start-up measurement.

The result is cached in a JSON file (``$PGL_FAST_CACHE_DIR``, else ``~/.cache/pgl_fast``) under a
key of the machine (CPU model, core count, torch's CPU capability and version) and the step's shape
(network, J, aux head, split, batch, image size, dtype, step kind); a forced flag (``--threads``,
``--channels-last``, ``--optimizer-kernel``) is never measured and always wins. What was chosen and
every timing go into ``header.json``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time

import torch

MAX_BATCH = 128
ROUNDS = 3
OPT_ROUNDS = 20


def machine_key() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": str(torch.__version__)}


def cache_path() -> str:
    root = os.environ.get("PGL_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pgl_fast")
    return os.path.join(root, "cpu_tune.json")


def _load_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(path: str, key: str, entry: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load_cache(path)
        data[key] = entry
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice is measured again next time, nothing else changes


def thread_candidates() -> list[int]:
    n = max(1, torch.get_num_threads())
    return sorted({1, n} | ({n // 2} if n >= 4 else set()))


def _median_times(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def time_optimizer_kernels(params: list[torch.Tensor], make_opt, rounds: int = OPT_ROUNDS) -> dict:
    """Seconds per step of ``make_opt(params, kernel)`` for each kernel, on copies of ``params``."""
    fns = {}
    for kernel in ("fused", "foreach"):
        ps = [p.detach().clone().requires_grad_() for p in params]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make_opt(ps, kernel)
        opt.step()  # first call: one-time checks
        fns[kernel] = opt.step
    return _median_times(fns, rounds)


def time_steps(make_learner, variants: dict, x: torch.Tensor, y: torch.Tensor, rounds: int = ROUNDS) -> dict:
    """Seconds per step for each ``variants[name] = (threads, channels_last)``, interleaved."""
    learners = {}
    for name, (threads, cl) in variants.items():
        learners[name] = (threads, make_learner(cl))
    saved_threads = torch.get_num_threads()

    def runner(threads, learner):
        def run():
            torch.set_num_threads(threads)
            learner.step(x, y)
        return run

    fns = {name: runner(t, lr) for name, (t, lr) in learners.items()}
    try:
        for fn in fns.values():  # warm-up: allocations, oneDNN's primitive caches
            fn()
        return _median_times(fns, rounds)
    finally:
        torch.set_num_threads(saved_threads)


def tune(*, net, build, make_optimizer, shape: dict, batch: int, image_size: int, forced: dict,
         use_cache: bool = True) -> dict:
    """Decide threads, channels-last and the optimizer kernel for a CPU run.

    ``build(net_copy, channels_last)`` returns a learner started on its first epoch;
    ``make_optimizer(params, kernel)`` the run's optimizer with that kernel; ``shape``
    names the step for the cache key; ``forced``: {"threads", "channels_last", "optimizer_kernel"} ->
    the value a flag forces (absent: measured). Returns {"choice", "timings_s", "forced", "cached",
    "key"}."""
    key_src = {"machine": machine_key(), "shape": shape}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_path()
    entry = _load_cache(path).get(key) if use_cache else None
    cached = entry is not None
    if entry is None:
        entry = measure(net=net, build=build, make_optimizer=make_optimizer, batch=batch, image_size=image_size,
                        forced=forced)
        entry["key_source"] = key_src
        if use_cache:
            _store(path, key, entry)
    choice = dict(entry["choice"])
    choice.update(forced)  # a flag always wins, also over a cached measurement
    return {"choice": choice, "timings_s": entry["timings_s"], "forced": sorted(forced), "cached": cached,
            "key": key}


def measure(*, net, build, make_optimizer, batch: int, image_size: int, forced: dict) -> dict:
    b = max(2, min(batch, MAX_BATCH))
    timings: dict = {}
    choice: dict = {}
    with torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, 3, image_size, image_size, generator=gen)
        y = torch.randint(0, 10, (b,), generator=gen)

        def make_learner(cl):
            return build(copy.deepcopy(net), cl)

        if "optimizer_kernel" in forced:
            choice["optimizer_kernel"] = forced["optimizer_kernel"]
        else:
            params = [p for p in net.parameters() if p.requires_grad]
            opt_t = time_optimizer_kernels(params, make_optimizer)
            timings["optimizer_kernel"] = opt_t
            choice["optimizer_kernel"] = min(opt_t, key=opt_t.get)
        cl0 = bool(forced.get("channels_last", False))
        if "threads" in forced:
            choice["threads"] = forced["threads"]
        else:
            cands = thread_candidates()
            if len(cands) > 1:
                t = time_steps(make_learner, {str(n): (n, cl0) for n in cands}, x, y)
                timings["threads"] = t
                choice["threads"] = int(min(t, key=t.get))
            else:
                choice["threads"] = cands[0]
        if "channels_last" in forced:
            choice["channels_last"] = forced["channels_last"]
        else:
            t = time_steps(make_learner, {"contiguous": (choice["threads"], False),
                                          "channels_last": (choice["threads"], True)}, x, y)
            timings["channels_last"] = t
            choice["channels_last"] = t["channels_last"] < t["contiguous"]
    return {"choice": choice, "timings_s": timings, "measured_batch": b}

