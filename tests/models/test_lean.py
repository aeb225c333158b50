"""The lean BasicBlock against the eager one (the reference), in float64: forward, running
statistics, every gradient; and its memory against the eager block's."""
import copy

import pytest
import torch

from pgl_fast.models.cifar_resnet import BasicBlock


@pytest.fixture(autouse=True)
def _f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("cin,cout,stride,batch,size", [(16, 16, 1, 5, 8), (16, 32, 2, 3, 9), (32, 64, 2, 7, 6),
                                                        (8, 8, 1, 1, 4)])
@pytest.mark.parametrize("input_grad", [False, True])
def test_lean_block_matches_eager(cin, cout, stride, batch, size, input_grad):
    torch.manual_seed(batch + cin)
    ref = BasicBlock(cin, cout, stride)
    for m in ref.modules():  # non-trivial BN affine parameters and running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-1, 1)
    lean = copy.deepcopy(ref)
    lean.lean = True
    x = torch.randn(batch, cin, size, size)
    xr, xl = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    out_r, out_l = ref(xr), lean(xl)
    torch.testing.assert_close(out_l, out_r, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(out_r)
    out_r.backward(gy.clone())
    out_l.backward(gy.clone())
    for (n, p), (_, q) in zip(ref.named_parameters(), lean.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=n)
    for (n, b), (_, c) in zip(ref.named_buffers(), lean.named_buffers()):
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=n)
    if input_grad:
        torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-9, atol=1e-11)


def test_lean_block_is_not_used_in_eval_or_no_grad(monkeypatch):
    import pgl_fast.models.lean as lean_mod

    calls = []
    real = lean_mod.lean_block_forward
    monkeypatch.setattr(lean_mod, "lean_block_forward", lambda *a: calls.append(1) or real(*a))
    blk = BasicBlock(16, 16)
    blk.lean = True
    x = torch.randn(2, 16, 4, 4)
    # positive control: training with autograd on takes the lean path
    blk.train()
    assert type(blk(x).grad_fn).__name__ == "_LeanBlockFnBackward" and calls == [1]
    # eval mode with autograd on: the plain block
    blk.eval()
    assert type(blk(x).grad_fn).__name__ != "_LeanBlockFnBackward" and calls == [1]
    # training mode under no_grad: the plain block, and nothing recorded for a backward
    blk.train()
    with torch.no_grad():
        out = blk(x)
    assert out.grad_fn is None and calls == [1]
    torch.testing.assert_close(out, _plain(blk)(x))


def _plain(blk):
    plain = copy.deepcopy(blk)
    plain.lean = False
    return plain


def test_lean_local_step_meets_the_memory_target():
    """The issue's target: a local step at J=16 (resnet32, batch 256, fp32, 1c2f) holds at most 15%
    of a bp step's peak tracked memory (parameters, gradients, optimizer state, activations)."""
    torch.set_default_dtype(torch.float32)
    from pgl_fast.memory.profile import build_step, measure_step

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peaks = {}
        for kind in ("bp", "local"):
            setup = build_step(kind, arch="resnet32", J=16, aux="1c2f", batch=256, head_kernels="eager")
            setup.net.set_lean_blocks(kind == "local")
            setup.warm_up(4)
            peaks[kind] = measure_step(setup, steps=1, measure="tracker")["peak_bytes"]
    finally:
        torch.set_num_threads(n)
    ratio = peaks["local"] / peaks["bp"]
    assert ratio <= 0.15, f"local {peaks['local'] / 2**20:.1f} MiB = {ratio:.3f} of bp {peaks['bp'] / 2**20:.1f} MiB"


def test_training_with_lean_blocks_matches_eager(cli, one_thread):
    torch.set_default_dtype(torch.float32)
    args = ["--method", "pgl", "-P", "1", "-Q", "1", "--epochs", "2", "--deterministic"]
    rows = {name: cli(*args, *extra, name=name, progress=None).rows
            for name, extra in (("eager", []), ("lean", ["--lean-blocks"]))}
    for e, le in zip(rows["eager"], rows["lean"]):
        assert le["module_losses"] == pytest.approx(e["module_losses"], rel=1e-4)  # fp32 rounding only
        assert le["test_acc"] == pytest.approx(e["test_acc"], abs=1 / 16 + 1e-9)
