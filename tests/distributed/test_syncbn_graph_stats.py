"""A single-process ``DataParallelLearner(cuda_graphs=True)``: the CUDA-graph machinery holds the
learner's own step statistics (the ones the trainer reads), not the object the base constructor
made before the data-parallel learner installed its own.

On the CPU: the construction order, with the base constructor's graph machinery stood in for (a
capture needs a GPU). On a GPU (marked ``cuda``): graphed local steps count exactly what eager
steps count."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pgl_fast.core.learner import LocalLearner
from pgl_fast.core.methods import PGL
from pgl_fast.distributed import DataParallelLearner, DistContext
from pgl_fast.runtime.optim import sgd


def test_graph_machinery_holds_the_learners_stats(monkeypatch, tiny_model):
    base_init = LocalLearner.__init__

    def init(self, *args, cuda_graphs=False, **kwargs):
        base_init(self, *args, **kwargs)  # eager: there is no GPU to capture on
        if cuda_graphs:  # what the base constructor does last: GraphedLocalSteps(self, self.stats)
            self.graphed = SimpleNamespace(stats=self.stats)

    monkeypatch.setattr(LocalLearner, "__init__", init)
    learner = DataParallelLearner(tiny_model(), PGL(1, 1), ctx=DistContext(), cuda_graphs=True)
    assert learner.graphed.stats is learner.stats


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
def test_graphed_single_process_data_parallel_counts_like_eager(tiny_model):
    opt = sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    graphed = DataParallelLearner(tiny_model(device="cuda"), PGL(1, 1), ctx=DistContext(device=torch.device("cuda")), optimizer=opt,
                                  cuda_graphs=True)
    eager = LocalLearner(tiny_model(device="cuda"), PGL(1, 1), optimizer=opt)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 8, 8, generator=g).cuda(), torch.randint(0, 10, (n,), generator=g).cuda())
               for n in (6, 6, 6, 4)]
    for learner in (graphed, eager):
        learner.start_epoch(0)
        for x, y in batches:
            learner.step(x, y)
    torch.cuda.synchronize()
    got, want = graphed.stats.read(), eager.stats.read()
    assert got["samples"] == want["samples"] == 22  # the capture's warm-up steps are not counted
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-5)
    assert got["train_acc"] == want["train_acc"]
