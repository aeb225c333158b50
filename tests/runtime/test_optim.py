"""DeviceLRSGD against torch.optim.SGD (the independent reference), step by step."""
import pytest
import torch

from pgl_fast.runtime.optim import DeviceLRSGD


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, dtype=dtype).requires_grad_(), torch.randn(7, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(2, 2, generator=g, dtype=dtype).requires_grad_()]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])  # fp32: fused vs split multiply-add rounding
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 1e-4), (0.9, False, 5e-2), (0.0, False, 1e-3), (0.5, True, 0.0)])
def test_matches_torch_sgd(dtype, tol, momentum, nesterov, wd):
    ours, ref = _params(dtype), _params(dtype)
    opt = DeviceLRSGD(ours, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        lr = [0.1, 0.1, 0.05, 0.8, 0.0, 0.3][step]
        opt.set_lr(lr)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        for i, (p, q) in enumerate(zip(ours, ref)):
            if step == 2 and i == 1:  # a parameter without gradient this step is skipped, as in torch
                p.grad, q.grad = None, None
                continue
            grad = torch.randn(p.shape, generator=g, dtype=dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    if momentum > 0:
        for p, q in zip(ours, ref):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], rtol=tol, atol=tol)


def test_state_dict_roundtrip_keeps_lr_tensor():
    ps = _params(torch.float32)
    opt = DeviceLRSGD(ps, lr=0.1, momentum=0.9, nesterov=True)
    opt.set_lr(0.37)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    opt2 = DeviceLRSGD(_params(torch.float32), lr=0.1, momentum=0.9, nesterov=True)
    opt2.load_state_dict(sd)
    assert opt2.lr_tensor.item() == pytest.approx(0.37)
    for i, p in enumerate(opt2.param_groups[0]["params"]):
        assert torch.equal(opt2.state[p]["momentum_buffer"], sd["state"][i]["momentum_buffer"])
