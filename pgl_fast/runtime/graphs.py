"""CUDA-graph capture of the local step (``--cuda-graphs``).

The captured function is ``LocalLearner.local_step`` itself -- the same code the eager path runs, for
every module: forward, local loss, backward, the device-lr SGD update, and the device-side
statistics. What makes it capturable is in the pieces it calls: the lr lives in a device tensor
read by torch's fused SGD kernel (``optim.SGD``), momentum buffers exist from the start (torch's
SGD otherwise decides on the host, at the first step, that the buffers are new, and a graph
captured around that step would replay the first step's ``buf = d``), statistics and the non-finite
flags are device tensors updated in place (the learner's ``StepStats``), and nothing in the step reads
a value back to the host.

One graph per batch size (the last partial batch gets its own graph), all sharing one memory pool
and replayed strictly in order, so only one module's activations are alive inside the pool, as in
the eager path. Global steps (PGL's global epochs, ``bp``) stay eager: they are rare, and run with
checkpointing when asked.

Before capturing, the step is warmed up on a side stream with the real batch (this allocates
lazily-created state, runs cuDNN's and Triton's autotuning, and compiles kernels); the warm-up
updates are then undone *in place* -- parameters, buffers, momentum buffers and statistics are
copied back into the same tensors -- so the training trajectory is exactly that of the eager run and
graphs captured earlier keep pointing at valid memory. The warm-up's random draws (dropout) are
undone too: the CPU generator and the device generator's seed and Philox offset are put back, so
the first replay draws the masks the eager step would have drawn, and a capture in the middle of a
run (the last partial batch, or the first batch after a resume) does not shift the stream.

Everything runs with the model's device current (``torch.cuda.device``): the side stream, the
capture stream and the graph's kernels are created on that device, also for ``cuda:N`` with N > 0
in a process whose current device is another one.

Memory. A replay never calls the allocator: the activations of a graphed step live in the graph
pool, which ``max_memory_allocated`` counts only while the capture is allocating them. So every
capture records its own peak (the peak statistics are reset right before ``torch.cuda.graph`` and
read right after it; the epoch's peak up to that point is kept alongside, since the reset erases
it), and ``memory_reading`` hands the largest capture peak of the graphs replayed since
``begin_epoch`` to ``metrics.PeakMemory``. The warm-up's cached blocks are released before the
capture, so they do not inflate the reserved figure, and the pool's own reserved bytes come from the
allocator's segment snapshot.
"""
from __future__ import annotations

import torch

from .device import device_context
from .rng import preserved_rng


def training_state_tensors(exe, stats) -> list[torch.Tensor]:
    """Every tensor a training step of the learner ``exe`` mutates in place, in a fixed order."""
    tensors: list[torch.Tensor] = list(exe.model.parameters()) + list(exe.model.buffers())
    for opt in exe.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                tensors.extend(v for v in opt.state[p].values() if torch.is_tensor(v))
        if hasattr(opt, "lr_tensor"):
            tensors.append(opt.lr_tensor)
    tensors.extend(stats.tensors())
    return tensors


class InPlaceSnapshot:
    """Copies of the training state, restored with ``copy_`` into the very same tensors."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        with torch.no_grad():
            self.saved = [t.detach().clone() for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for t, s in zip(self.tensors, self.saved):
                t.copy_(s)


def warm_up(exe, stats, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None, iters: int,
            stream=None) -> None:
    """Run ``iters`` local steps of the learner ``exe`` on one batch (on ``stream``, a CUDA stream,
    when given) and undo them: the training state is copied back into the same tensors and the CPU
    and device generators are restored, so the next step is the step the eager run takes."""
    snapshot = InPlaceSnapshot(training_state_tensors(exe, stats))
    with preserved_rng(x.device):
        if stream is None:
            for _ in range(iters):
                exe.run_local_step(x, y, image01)
        else:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(iters):
                    exe.run_local_step(x, y, image01)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()  # the warm-up's kernels were launched with the offsets being undone
    snapshot.restore()


def pool_reserved_bytes(pool) -> int:
    """Bytes the caching allocator holds in segments of the private pool ``pool`` (a
    ``graph_pool_handle``): what the graphs' activations occupy for as long as the graphs live."""
    want = tuple(pool)
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", ())) == want)


class GraphedLocalSteps:
    def __init__(self, exe, stats, warmup_iters: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("--cuda-graphs needs a CUDA GPU")
        if exe.scaler is not None:
            raise RuntimeError("--cuda-graphs does not support --amp-dtype fp16 (the grad scaler syncs with the "
                               "host); use the default bf16")
        self.exe, self.stats, self.warmup_iters = exe, stats, warmup_iters
        exe.autocast_cache = False
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}
        self.captures = 0
        # per batch size: max_memory_allocated / max_memory_reserved during its capture
        self.capture_peak_bytes: dict[int, int] = {}
        self.capture_reserved_bytes: dict[int, int] = {}
        self._replayed: set[int] = set()
        self._outside_peak = (0, 0)  # (allocated, reserved) peaks erased by a capture's reset

    def begin_epoch(self) -> None:
        """Start a new measurement window (``PeakMemory.reset`` calls this with its own reset)."""
        self._replayed.clear()
        self._outside_peak = (0, 0)

    def memory_reading(self) -> dict | None:
        """What the graphs replayed since ``begin_epoch`` held, or None if none was replayed.

        ``capture_peak_bytes``: the largest peak allocated during the capture of one of them (the
        memory a replay really holds: parameters, optimizer state, static inputs and the
        activations in the pool); ``outside_peak_*``: the allocator's peaks earlier in the window,
        which a capture's reset erased; ``pool_reserved_bytes``: the shared pool's segments now."""
        if not self._replayed:
            return None
        return {
            "capture_peak_bytes": max(self.capture_peak_bytes[k] for k in self._replayed),
            "capture_reserved_bytes": max(self.capture_reserved_bytes[k] for k in self._replayed),
            "outside_peak_bytes": self._outside_peak[0],
            "outside_reserved_bytes": self._outside_peak[1],
            "pool_reserved_bytes": pool_reserved_bytes(self.pool),
        }

    def _capture(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None) -> tuple:
        with device_context(x.device):
            return self._capture_on_device(x, y, image01)

    def _capture_on_device(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None) -> tuple:
        exe, stats = self.exe, self.stats
        static_x, static_y = x.clone(), y.clone()
        static_img = image01.clone() if image01 is not None else None
        dev = static_x.device
        torch.cuda.synchronize(dev)
        # the window's peaks so far, before the warm-up adds its own and the reset below erases them
        self._outside_peak = (max(self._outside_peak[0], torch.cuda.max_memory_allocated(dev)),
                              max(self._outside_peak[1], torch.cuda.max_memory_reserved(dev)))
        # the snapshot's copies are freed on return: they must not count in the capture's peak
        warm_up(exe, stats, static_x, static_y, static_img, self.warmup_iters, stream=torch.cuda.Stream())
        for opt in exe.optimizers:
            opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()  # the warm-up's cached blocks are not the graph's memory
        torch.cuda.reset_peak_memory_stats(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            exe.run_local_step(static_x, static_y, static_img)
        torch.cuda.synchronize(dev)
        key = static_x.shape[0]
        self.capture_peak_bytes[key] = torch.cuda.max_memory_allocated(dev)
        self.capture_reserved_bytes[key] = torch.cuda.max_memory_reserved(dev)
        self.captures += 1
        return graph, static_x, static_y, static_img

    def __call__(self, x: torch.Tensor, y: torch.Tensor, image01: torch.Tensor | None = None) -> None:
        key = x.shape[0]
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(x, y, image01)
        graph, sx, sy, simg = entry
        self._replayed.add(key)
        with device_context(sx.device):  # a replay launches on the current device's stream
            sx.copy_(x)
            sy.copy_(y)
            if simg is not None:
                simg.copy_(image01)
            graph.replay()
