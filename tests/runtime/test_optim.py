"""The engine's optimizer (torch's SGD with a tensor lr, fused or foreach kernel) against SGD written
out here in float64, step by step; its state dict; and what makes its step capturable."""
import inspect

import pytest
import torch

from pgl_fast.errors import UserError
from pgl_fast.runtime.optim import SGD, sgd

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture)")
LRS = [0.1, 0.1, 0.05, 0.8, 0.0, 0.3]


def _params(dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in ((5, 3), (7,), (2, 2), (4, 3, 3, 3))]


def reference_step(ps, bufs, grads, lr, momentum, nesterov, wd):
    """SGD in float64: d = g + wd p; buf = m buf + d (buf = d at the first step); p -= lr (d + m buf
    if Nesterov else buf). A parameter whose gradient is None is skipped."""
    for i, (p, g) in enumerate(zip(ps, grads)):
        if g is None:
            continue
        d = g + wd * p
        if momentum > 0:
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + d
            d = d + momentum * bufs[i] if nesterov else bufs[i]
        ps[i] = p - lr * d


@pytest.mark.parametrize("kernel", ["fused", "foreach"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])  # fp32: the kernels' rounding
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 1e-4), (0.9, False, 5e-2), (0.0, False, 1e-3), (0.5, True, 0.0)])
def test_matches_float64_reference(kernel, dtype, tol, momentum, nesterov, wd):
    ours = _params(dtype)
    ref = [p.detach().double() for p in _params(dtype)]  # the same starting values, in float64
    bufs = [None] * len(ref)
    opt = sgd(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd, kernel=kernel)(ours)
    g = torch.Generator().manual_seed(1)
    for step, lr in enumerate(LRS):
        opt.set_lr(lr)
        grads = []
        for i, p in enumerate(ours):
            if step == 2 and i == 1:  # a parameter without gradient this step is skipped, as in torch
                p.grad = None
                grads.append(None)
                continue
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            p.grad = grad
            grads.append(grad.double().clone())  # torch may update a gradient in place
        opt.step()
        reference_step(ref, bufs, grads, lr, momentum, nesterov, wd)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach().double(), q, rtol=tol, atol=tol)
    if momentum > 0:
        for p, b in zip(ours, bufs):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), b, rtol=tol, atol=tol)


def test_default_is_torch_fused_sgd():
    """The default factory gives torch's own SGD (its fused kernel), not a hand-written update."""
    opt = sgd()(_params(torch.float32))
    assert isinstance(opt, torch.optim.SGD)
    assert inspect.getsourcefile(inspect.unwrap(type(opt).step)) == inspect.getsourcefile(torch.optim.SGD)
    assert opt.param_groups[0]["fused"] is True
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"] is opt.lr_tensor


def test_no_step_is_a_first_step(monkeypatch):
    """Momentum buffers exist before the first step, so torch never takes its host-side first-step
    branch (which a CUDA graph could not replay): every call of the fused kernel says
    is_first_step=False, and the buffers are the same tensors before and after."""
    ps = _params(torch.float32)
    opt = sgd(lr=0.1)(ps)
    before = [opt.state[p]["momentum_buffer"] for p in ps]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in before)
    seen, real = [], torch._fused_sgd_

    def spy(*a, **k):
        seen.append(k["is_first_step"])
        return real(*a, **k)

    monkeypatch.setattr(torch, "_fused_sgd_", spy)
    for _ in range(2):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert seen == [False, False]
    assert all(opt.state[p]["momentum_buffer"] is b for p, b in zip(ps, before))


def test_state_dict_roundtrip_keeps_lr_tensor():
    ps = _params(torch.float32)
    opt = sgd(lr=0.1)(ps)
    opt.set_lr(0.37)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == pytest.approx(0.37)  # a float snapshot, not the live tensor
    opt2 = sgd(lr=0.1, kernel="foreach")(_params(torch.float32))
    lr_t = opt2.lr_tensor
    opt2.load_state_dict(sd)
    assert opt2.lr_tensor is lr_t and opt2.param_groups[0]["lr"] is lr_t and lr_t.item() == pytest.approx(0.37)
    assert opt2.param_groups[0]["foreach"] is True and not opt2.param_groups[0]["fused"]  # this run's kernel
    for i, p in enumerate(opt2.param_groups[0]["params"]):
        assert torch.equal(opt2.state[p]["momentum_buffer"], sd["state"][i]["momentum_buffer"])


def test_loads_earlier_engine_state():
    """The state of the engine's earlier hand-written SGD (lr a float, no dampening/maximize/fused
    keys in the groups) loads, and the next step equals the reference's."""
    ps = _params(torch.float64)
    bufs = [torch.full_like(p, 0.5).detach() for p in ps]
    old = {"state": {i: {"momentum_buffer": b.clone()} for i, b in enumerate(bufs)},
           "param_groups": [{"lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
                             "params": list(range(len(ps)))}]}
    opt = sgd(lr=0.1)(ps)
    opt.load_state_dict(old)
    assert opt.lr_tensor.item() == 0.2
    ref = [p.detach().clone() for p in ps]
    grads = [torch.ones_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    reference_step(ref, bufs, grads, 0.2, 0.9, True, 1e-4)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12)


def test_bad_kernel_is_a_user_error():
    with pytest.raises(UserError, match="optimizer kernel 'adam'"):
        sgd(kernel="adam")


@cuda
@pytest.mark.cuda
def test_fresh_optimizer_step_captured_in_cuda_graph():
    """A step of a fresh optimizer (no eager step before) captured in a CUDA graph and replayed with
    a new lr each time equals the float64 reference: the lr is read from the device tensor and the
    first replay is not a special step."""
    ps = _params(torch.float32, device="cuda")
    ref = [p.detach().double() for p in ps]
    bufs = [None] * len(ps)
    opt = SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert opt.graph_safe and opt.lr_tensor.device.type == "cuda"
    grads = [torch.zeros_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.synchronize()
    gen = torch.Generator().manual_seed(3)
    for lr in LRS:
        new = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        for g, n in zip(grads, new):
            g.copy_(n)
        opt.set_lr(lr)
        graph.replay()
        reference_step(ref, bufs, [n.float().double().cuda() for n in new], float(torch.tensor(lr, dtype=torch.float32)),
                       0.9, True, 1e-4)
    torch.cuda.synchronize()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach().double(), q, rtol=2e-6, atol=2e-6)
