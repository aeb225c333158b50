"""The engine's optimizer: ``torch.optim.SGD`` with its learning rate in a 0-d tensor.

The update is torch's own (momentum, dampening 0, optional Nesterov, L2 weight decay added to the
gradient), run by its ``fused`` kernel (one pass over every parameter of the group, on the CPU too)
or its ``foreach`` kernel. What this subclass adds:

- the lr is one 0-d tensor shared by every group, updated in place by ``set_lr``. With the fused
  kernel it lives on the parameters' device and the kernel's tensor-lr overload reads it there, so
  a step captured in a CUDA graph reads the new value on its next replay. (The CUDA kernel reads it
  as float32; the CPU kernel as float64. The foreach kernel turns a tensor lr into a Python number,
  which on a GPU is a host sync per step, so for it the tensor stays on the CPU.)
- momentum buffers are allocated as zeros up front. Torch's SGD decides on the host whether a
  buffer exists: on the first step it allocates the buffers and tells the fused kernel
  ``is_first_step`` (``buf = d``). A CUDA graph captured around that first step would replay
  ``buf = d`` forever; with zero buffers from the start no step is special, and
  ``buf = m * 0 + d`` equals the first step's ``buf = d`` exactly.
- ``load_state_dict`` keeps the very lr tensor (a captured graph holds its address) and this
  optimizer's kernel choice, and accepts the state of earlier versions of the engine (the same
  state: ``momentum_buffer`` per parameter, lr as a float in the groups).
"""
from __future__ import annotations

import torch

from ..errors import UserError

KERNELS = ("fused", "foreach")


class SGD(torch.optim.SGD):
    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 kernel: str = "fused"):
        if kernel not in KERNELS:
            raise UserError(f"optimizer kernel {kernel!r}: use one of {', '.join(KERNELS)}")
        params = list(params)
        first = params[0]["params"][0] if params and isinstance(params[0], dict) else (params[0] if params else None)
        device = first.device if first is not None else torch.device("cpu")
        if kernel == "foreach" or device.type == "cpu":
            lr_t = torch.tensor(float(lr), dtype=torch.float64)
        else:
            lr_t = torch.tensor(float(lr), dtype=torch.float32, device=device)
        super().__init__(params, lr=lr_t, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         foreach=kernel == "foreach" or None, fused=kernel == "fused" or None)
        self.lr_tensor = lr_t
        self.kernel = kernel
        self._zero_momentum_buffers()

    @property
    def graph_safe(self) -> bool:
        """Whether a step can be captured in a CUDA graph: the fused kernel reading a device lr."""
        return self.kernel == "fused" and self.lr_tensor.device.type != "cpu"

    def _zero_momentum_buffers(self) -> None:
        for group in self.param_groups:
            if group["momentum"] > 0:
                for p in group["params"]:
                    if "momentum_buffer" not in self.state[p] or self.state[p]["momentum_buffer"] is None:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def set_lr(self, lr: float) -> None:
        """In place: a captured graph reads the new value on its next replay."""
        self.lr_tensor.fill_(float(lr))

    def state_dict(self) -> dict:
        """Torch's state dict with the lr as a Python float (a snapshot, not the live tensor)."""
        sd = super().state_dict()
        sd["param_groups"] = [dict(g, lr=float(self.lr_tensor.item())) for g in sd["param_groups"]]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        groups = []
        for g, cur in zip(state_dict["param_groups"], self.param_groups):
            g = dict(g, lr=self.lr_tensor)
            for k in ("dampening", "maximize", "differentiable"):
                g.setdefault(k, cur[k])
            # the kernel is this run's choice, not the saved run's
            g["foreach"], g["fused"] = cur["foreach"], cur["fused"]
            groups.append(g)
        lr = state_dict["param_groups"][0]["lr"] if state_dict["param_groups"] else self.lr_tensor
        lr = float(lr.item() if torch.is_tensor(lr) else lr)
        super().load_state_dict(dict(state_dict, param_groups=groups + list(state_dict["param_groups"][len(groups):])))
        for group in self.param_groups:
            group["lr"] = self.lr_tensor
        self.lr_tensor.fill_(lr)
        self._zero_momentum_buffers()

def sgd(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4,
        kernel: str = "fused"):
    """The default optimizer factory of ``LocalLearner``: ``params -> SGD`` with the paper's
    settings (momentum 0.9, Nesterov, weight decay 1e-4 on every parameter; lr 0.1, the paper's
    0.8 at batch 1024 scaled to batch 128), torch's ``kernel`` ("fused" or "foreach")."""
    if kernel not in KERNELS:
        raise UserError(f"optimizer kernel {kernel!r}: use one of {', '.join(KERNELS)}")

    def make(params):
        return SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, kernel=kernel)

    return make
