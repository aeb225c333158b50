"""The memory planner and the profiler measure MAN's aux path (its copies of the next module's first
block), not only the plain heads."""
import pytest

from pgl_fast.memory import planner
from pgl_fast.memory.profile import build_step

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(method="pgl", arch="resnet8", J=4, aux="0c1f", batch=16, split="layerwise", candidates=(),
          measure_batch=4)


def test_local_prediction_counts_man_copies():
    plain = planner.predict(**KW)["local"]
    man = planner.predict(**KW, pgl_local="man")["local"]
    # the copies' parameters alone (LB + EMA of the 16/32/64-channel blocks, fp32) and LB's
    # gradients and momentum buffers come on top; activations of the copies too
    setup = build_step("local", arch="resnet8", J=4, aux="0c1f", batch=4, split="layerwise", pgl_local="man")
    copies = sum(p.numel() * p.element_size() for m in (setup.net.lb_blocks, setup.net.ema_blocks)
                 for p in m.parameters())
    assert len(setup.net.ema_blocks) == 3 and copies > 0
    assert man >= plain + copies
