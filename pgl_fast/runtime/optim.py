"""SGD whose learning rate lives in a device tensor, so the update can be captured in a CUDA graph.

``torch.optim.SGD`` bakes a Python-float lr into the kernels it launches (and with a tensor lr its
eager path syncs with the host), and it creates momentum buffers lazily on the first step (a Python
branch that a graph cannot replay). This optimizer keeps the same math -- PyTorch's SGD with
momentum, dampening 0, optional Nesterov, L2 weight decay added to the gradient -- but:

- the lr is a 0-d tensor on the parameters' device, updated in place (``set_lr``);
- momentum buffers are allocated as zeros up front: ``buf = m * 0 + d`` equals PyTorch's first-step
  ``buf = d`` exactly, so no step is special;
- parameters without a gradient are skipped, as in PyTorch (decided in Python: a captured step must
  see the same set of gradients every replay, which the engine guarantees).

It is a ``torch.optim.Optimizer``, so ``state_dict``/``load_state_dict`` and checkpoints work as usual.
"""
from __future__ import annotations

import torch


class DeviceLRSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("DeviceLRSGD: lr, momentum and weight_decay must be >= 0")
        if nesterov and momentum <= 0:
            raise ValueError("DeviceLRSGD: Nesterov momentum requires momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                device = p.device
                if momentum > 0:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # one lr tensor for all groups (the engine sets one lr per epoch)
        self.lr_tensor = torch.tensor(float(lr), device=device or "cpu", dtype=torch.float64)

    def set_lr(self, lr: float) -> None:
        """In place: a captured graph reads the new value on its next replay."""
        self.lr_tensor.fill_(float(lr))
        for group in self.param_groups:
            group["lr"] = float(lr)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                if group["momentum"] > 0 and "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self.lr_tensor.fill_(float(self.param_groups[0]["lr"]))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - same contract as torch.optim
        if closure is not None:
            raise ValueError("DeviceLRSGD does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, mom = group["weight_decay"], group["momentum"]
            d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else list(grads)
            if mom > 0:
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, d)
                if group["nesterov"]:
                    d = torch._foreach_add(d, bufs, alpha=mom)
                else:
                    d = bufs
            lr = self.lr_tensor.to(params[0].dtype) if self.lr_tensor.dtype != params[0].dtype else self.lr_tensor
            torch._foreach_sub_(params, torch._foreach_mul(d, lr))
        return None


def sgd(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4):
    """The default optimizer factory of ``LocalLearner``: ``params -> DeviceLRSGD`` with the paper's
    settings (momentum 0.9, Nesterov, weight decay 1e-4 on every parameter; lr 0.1, the paper's
    0.8 at batch 1024 scaled to batch 128)."""

    def make(params):
        return DeviceLRSGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    return make
