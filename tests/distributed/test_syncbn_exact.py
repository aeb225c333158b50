"""``--sync-bn`` is exact in every combination: 2 gloo ranks against one process, float64.

One ``torchrun --standalone --nproc_per_node=2 dp_worker.py OUT syncbn`` launch runs one global
step (BP, and PGL's global phase) of models cut by ``split()`` in which a batch norm is followed by
an in-place ReLU inside a cut-out piece (a small VGG-like network, torchvision's resnet18), on a
global batch of 5 that splits 3 + 2. The reference is written here: the uncut torch model on the
whole batch with plain autograd, the aux heads on the detached cut features, one plain SGD step.

The batch norm every device runs under ``--sync-bn`` is :class:`AllReduceBatchNorm` (CUDA
included: ``torch.nn.SyncBatchNorm``'s backward is inexact for unequal shards), so the 3 + 2 runs
here are the arithmetic a GPU run does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_worker as W
from pgl_fast.distributed.sync_bn import AllReduceBatchNorm, convert_sync_bn
from pgl_fast.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TOL = dict(rtol=0, atol=1e-10)


def launch(out, mode: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dp_worker.py"), str(out), mode]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("syncbn"), "syncbn")


@pytest.fixture(scope="module")
def ranks_resnet18(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("syncbn_slow"), "syncbn-slow")


def reference(arch: str, method: str):
    """One process, the whole batch: the uncut model's own forward; the backbone learns from the
    final loss, every aux head (PGL) from its loss on the detached features at its cut."""
    model, local, after, image = W.syncbn_net(arch, aux=method == "pgl")
    x, y = W.syncbn_batch(image)
    feats = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o)) for m in after]
    model.train()
    local.heads.train()
    loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    params = list(model.parameters())
    grads = dict(zip(params, torch.autograd.grad(loss, params)))
    for j, head in enumerate(local.heads):
        hp = list(head.parameters())
        grads.update(zip(hp, torch.autograd.grad(F.cross_entropy(head(feats[j].detach()), y), hp)))
    with torch.no_grad():
        for p, g in grads.items():
            p.sub_(W.SB_LR * g)
    return model.state_dict(), local.heads.state_dict()


def assert_states_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        if want[k].dtype == torch.int64:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}", **TOL)


def check_against_reference(ranks, arch, method):
    want_model, want_heads = reference(arch, method)
    r0, r1 = (r[f"{arch}/{method}"] for r in ranks)
    for got in (r0, r1):
        assert_states_close(got["model"], want_model)
        assert_states_close(got["heads"], want_heads)
    # the step moved the weights: an untrained replica would not pass for a trained one
    untouched, _, _, _ = W.syncbn_net(arch, aux=method == "pgl")
    assert max((untouched.state_dict()[k].double() - v.double()).abs().max().item()
               for k, v in want_model.items() if v.is_floating_point()) > 1e-3


@pytest.mark.parametrize("arch, method", W.SB_CASES)
def test_sync_bn_global_step_of_split_model_equals_single_process(ranks, arch, method, one_thread):
    check_against_reference(ranks, arch, method)


@pytest.mark.slow
@pytest.mark.parametrize("arch, method", W.SB_SLOW_CASES)
def test_sync_bn_global_step_of_split_resnet18_equals_single_process(ranks_resnet18, arch, method, one_thread):
    """resnet18's top-level bn1 sits in the first module's Sequential, before an in-place ReLU."""
    check_against_reference(ranks_resnet18, arch, method)


def test_every_device_gets_the_exact_batch_norm():
    """On CUDA too the model gets AllReduceBatchNorm (a model's own SyncBatchNorm included), whose
    backward weights every rank's statistics gradient by its share of the global batch."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.SyncBatchNorm(4)), nn.BatchNorm1d(2))
    ctx = SimpleNamespace(world_size=3, device=torch.device("cuda"))  # nothing touches the device
    convert_sync_bn(net, ctx)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is AllReduceBatchNorm for m in bns), [type(m).__name__ for m in bns]


def test_unknown_sync_bn_impl_is_a_user_error():
    ctx = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    with pytest.raises(UserError, match="sync_bn_impl must be auto or allreduce"):
        convert_sync_bn(nn.BatchNorm2d(2), ctx, impl="torch")
