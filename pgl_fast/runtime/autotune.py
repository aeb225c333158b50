"""CPU choices by measurement (``--cpu-tune auto``, the default): the intra-op thread count,
channels-last or not, the optimizer's kernel (torch's fused or foreach SGD) and ``--compile``, each
picked by timing this run's own step on this machine -- when the run is long enough for the
measurement to pay for itself.

When it tunes. The measurement costs a known number of steps (each timed variant: one warm-up and
``ROUNDS`` timed steps, at min(batch, ``MAX_BATCH``); each optimizer step timed counted as a whole
training step), so before anything is measured the run's step count decides: a run is tuned only when that cost is at most ``FRACTION`` of the run (counted
in steps of the run's batch, assuming a step's time grows with its batch). A shorter run -- every
test's run -- trains with the untuned defaults and pays nothing; the decision does not depend on
what earlier runs left in the cache, so whether a run is tuned follows from the run alone.
``torch.compile`` costs seconds that do not scale with steps: it is measured only when its
expected compile time (the last one measured for this machine and shape, else ``COMPILE_PRIOR_S``)
is at most ``FRACTION`` of the run's estimated time (steps x the measured step time), and chosen
only when the time it saves over the run exceeds its measured compile time.

What is measured. The run's main step kind (the local step; the global step for ``bp``) on a copy
of the network, on random data, with the random streams saved and restored, so the run itself
starts exactly where it would have. Candidates are timed in interleaved rounds, the median kept.
The optimizer kernels are timed on their own, on copies of the parameters with random gradients (a
step of the network hides a fraction of a millisecond in its noise). Each factor is decided in turn
-- threads, then the memory format at the chosen threads, then compiled or eager at both -- rather
than over the full grid.

The timings are cached in a JSON file (``$PGL_FAST_CACHE_DIR``, else ``~/.cache/pgl_fast``) under a
key of the machine (CPU model, core count, torch's CPU capability and version) and the step's shape
(network, J, aux head, split, batch, image size, dtype, step kind); the choice is made from them for
each run (compile's depends on the run's length). A forced flag (``--threads``, ``--channels-last``,
``--optimizer-kernel``, ``--compile``) is never measured and always wins. The decision, its reason,
the estimate it was made from, the choice and every timing go into ``header.json``.
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
# the share of a run's time the measurement may cost: a choice that saves more than this pays
FRACTION = 0.05
# seconds one --compile of a network is expected to take before any was measured on this machine
# (resnet8 J=4 on a 2-core EPYC: ~60 s; networks whose modules share a structure share graphs)
COMPILE_PRIOR_S = 60.0


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


def run_steps(n_train: int, batch: int, epochs: int, drop_last: bool) -> int:
    """Training steps of a run: ``epochs`` epochs of ``n_train`` images at ``batch``."""
    per_epoch = n_train // batch if drop_last else -(-n_train // batch)
    return max(0, epochs) * max(per_epoch, 0)


def timed_step_count(forced: dict, n_thread_candidates: int) -> int:
    """Steps of the network the measurement of the free step factors runs (compile aside)."""
    variants = (n_thread_candidates if "threads" not in forced and n_thread_candidates > 1 else 0)
    variants += 2 if "channels_last" not in forced else 0
    return variants * (1 + ROUNDS)


def optimizer_step_count(forced: dict) -> int:
    """Optimizer steps the measurement of the optimizer kernel runs (one warm-up and OPT_ROUNDS per
    kernel). Counted as whole training steps: a training step holds one optimizer step, so this
    bounds their cost from above whatever the batch."""
    return 0 if "optimizer_kernel" in forced else 2 * (1 + OPT_ROUNDS)


def _key(shape: dict, forced: dict) -> tuple[str, dict]:
    # what was forced is part of the key: a measurement made around a forced value (say one thread)
    # says nothing about the best choice of a run that leaves that value free
    key_src = {"machine": machine_key(), "shape": shape, "forced": {k: v for k, v in forced.items() if k != "compile"}}
    return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16], key_src


def tune(*, net, build, make_optimizer, shape: dict, batch: int, image_size: int, forced: dict,
         steps: int | None = None, compile_blocker: str | None = "not offered", step_kinds: int = 1,
         use_cache: bool = True) -> dict:
    """Decide threads, channels-last, the optimizer kernel and ``--compile`` for a CPU run.

    ``build(net_copy, channels_last, compile)`` returns a learner started on its first epoch;
    ``make_optimizer(params, kernel)`` the run's optimizer with that kernel; ``shape`` names the
    step for the cache key; ``forced``: {"threads", "channels_last", "optimizer_kernel", "compile"}
    -> the value a flag forces (absent: measured); ``steps``: the run's training steps at ``batch``
    (None: tune whatever the length); ``compile_blocker``: why ``--compile`` cannot be a choice for
    this run (None: it can); ``step_kinds``: how many kinds of step the run compiles (PGL: its
    local and its global step), each counted at the measured step's compile time. Returns {"tuned", "reason", "choice", "timings_s", "forced", "cached",
    "key", "estimate"}; "choice" holds only what was forced or measured."""
    forced = dict(forced)
    key, key_src = _key(shape, forced)
    n_threads = len(thread_candidates()) if "threads" not in forced else 1
    free = [f for f in ("threads", "channels_last", "optimizer_kernel") if f not in forced]
    if "threads" in free and n_threads < 2:
        free.remove("threads")
    b = max(2, min(batch, MAX_BATCH))
    # in steps of the run's batch, a step's time taken as proportional to its batch
    cost_steps = timed_step_count(forced, n_threads) * b / batch + optimizer_step_count(forced)
    estimate = {"run_steps": steps, "tuning_steps": round(cost_steps, 2), "fraction": FRACTION}
    out = {"tuned": False, "choice": dict(forced), "timings_s": {}, "forced": sorted(forced), "cached": False,
           "key": key, "estimate": estimate}
    if not free and ("compile" in forced or compile_blocker is not None):
        return {**out, "reason": "every choice is forced by a flag"}
    if steps is not None and cost_steps > FRACTION * steps:
        return {**out, "reason": f"run too short: {steps} steps; measuring would cost about {cost_steps:.0f} steps, "
                                 f"more than {FRACTION:g} of the run"}
    path = cache_path()
    entry = _load_cache(path).get(key) if use_cache else None
    cached = entry is not None
    if entry is None:
        entry = measure(net=net, build=build, make_optimizer=make_optimizer, batch=batch, image_size=image_size,
                        forced=forced)
        entry["key_source"] = key_src
    choice = dict(entry["choice"])
    choice.update({k: v for k, v in forced.items() if k != "compile"})  # a flag wins over a cached measurement
    timings = dict(entry["timings_s"])
    step_s = entry.get("step_s")
    if step_s is None and (compile_blocker is None and "compile" not in forced):
        step_s = eager_step_s(build, net, choice, b, image_size)
        entry["step_s"] = step_s
    if step_s is not None:  # the step at the tuner's batch, scaled to the run's
        estimate["step_s"] = step_s * batch / b
        if steps is not None:
            estimate["run_s"] = estimate["step_s"] * steps
    if "compile" in forced:
        choice["compile"] = forced["compile"]
    elif compile_blocker is not None:
        estimate["compile"] = f"not a choice: {compile_blocker}"
    else:
        comp = entry.get("compile")
        expected = (comp["compile_s"] if comp else COMPILE_PRIOR_S) * step_kinds
        run_s = estimate.get("run_s")
        if comp is None and (run_s is None or expected > FRACTION * run_s):
            choice["compile"] = False
            estimate["compile"] = (f"not measured: a compile is expected to take {expected:.0f} s, more than "
                                   f"{FRACTION:g} of the run's estimated {run_s or 0:.0f} s")
        else:
            if comp is None:
                comp = measure_compile(build, net, choice, b, image_size)
                entry["compile"] = comp
            timings["compile"] = comp
            if "error" in comp:
                choice["compile"] = False
                estimate["compile"] = f"not chosen: compiling failed ({comp['error']})"
            else:
                saved = (comp["eager_s"] - comp["compiled_s"]) * batch / b * (steps if steps is not None else 0)
                cost = comp["compile_s"] * step_kinds
                choice["compile"] = steps is not None and saved > cost
                estimate["compile"] = f"saves about {saved:.0f} s over the run against compiles of {cost:.0f} s"
    if use_cache:
        _store(path, key, entry)
    return {**out, "tuned": True, "choice": choice, "timings_s": timings, "cached": cached,
            "reason": f"run long enough: {steps} steps" if steps is not None else "tuned on request"}


def _learner(build, net, choice: dict, compile: bool):
    return build(copy.deepcopy(net), bool(choice.get("channels_last", False)), compile)


def _data(b: int, image_size: int):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, 3, image_size, image_size, generator=gen), torch.randint(0, 10, (b,), generator=gen))


def eager_step_s(build, net, choice: dict, b: int, image_size: int) -> float:
    """Seconds of one eager step at ``choice``'s threads and memory format (after one warm-up)."""
    saved = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        x, y = _data(b, image_size)
        learner = _learner(build, net, choice, False)
        try:
            torch.set_num_threads(int(choice.get("threads", saved)))
            learner.step(x, y)
            t = time.perf_counter()
            learner.step(x, y)
            return time.perf_counter() - t
        finally:
            torch.set_num_threads(saved)


def measure_compile(build, net, choice: dict, b: int, image_size: int, rounds: int | None = None) -> dict:
    """The compiled step against the eager one at ``choice``'s threads and memory format: the
    first compiled step's time above an eager step (its compile time), then both in interleaved
    rounds. {"compile_s", "compiled_s", "eager_s"}, or {"error"} when compiling fails."""
    saved = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        x, y = _data(b, image_size)
        try:
            torch.set_num_threads(int(choice.get("threads", saved)))
            eager = _learner(build, net, choice, False)
            eager.step(x, y)
            t = time.perf_counter()
            eager.step(x, y)
            t_eager = time.perf_counter() - t
            compiled = _learner(build, net, choice, True)
            t = time.perf_counter()
            try:
                compiled.step(x, y)
            except Exception as e:  # no C++ compiler, an unsupported op: recorded, and eager is kept
                return {"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
            first = time.perf_counter() - t
            t = _median_times({"eager": lambda: eager.step(x, y), "compiled": lambda: compiled.step(x, y)},
                              ROUNDS if rounds is None else rounds)
        finally:
            torch.set_num_threads(saved)
    return {"compile_s": max(first - t_eager, 0.0), "compiled_s": t["compiled"], "eager_s": t["eager"]}


def measure(*, net, build, make_optimizer, batch: int, image_size: int, forced: dict) -> dict:
    b = max(2, min(batch, MAX_BATCH))
    timings: dict = {}
    choice: dict = {}
    step_s = None
    with torch.random.fork_rng(devices=[]):
        x, y = _data(b, image_size)

        def make_learner(cl):
            return build(copy.deepcopy(net), cl, False)

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
                step_s = t[str(choice["threads"])]
            else:
                choice["threads"] = cands[0]
        if "channels_last" in forced:
            choice["channels_last"] = forced["channels_last"]
        else:
            t = time_steps(make_learner, {"contiguous": (choice["threads"], False),
                                          "channels_last": (choice["threads"], True)}, x, y)
            timings["channels_last"] = t
            choice["channels_last"] = t["channels_last"] < t["contiguous"]
            step_s = min(t.values())
    return {"choice": choice, "timings_s": timings, "measured_batch": b, "step_s": step_s}
