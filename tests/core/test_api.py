"""The method objects, LocalLearner and Trainer as a user calls them."""
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pgl_fast
from pgl_fast.errors import UserError
from pgl_fast.core.methods import BP, DGL, METHODS, PGL, InfoPro, from_name

pytestmark = pytest.mark.usefixtures("one_thread")


def test_phase_tables_by_hand():
    assert PGL(3, 2).phases(10) == ["local"] * 3 + ["global"] * 2 + ["local"] * 3 + ["global"] * 2
    assert PGL(1, 0).phases(3) == ["local"] * 3  # Q = 0 is DGL
    assert DGL().phases(2) == InfoPro().phases(2) == ["local"] * 2
    assert BP().phases(2) == ["global"] * 2 and BP().epoch_label(0) == "bp"
    assert set(METHODS) == {"bp", "dgl", "infopro", "pgl", "hpff", "man"} and isinstance(from_name("pgl", period=2, duration=1), PGL)
    with pytest.raises(UserError, match="--method 'sgd'"):
        from_name("sgd")
    with pytest.raises(UserError, match="period must be >= 1"):
        PGL(0, 1)


def small(aux="1c2f", seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    return pgl_fast.split(net, [2], aux=aux, input_shape=(3, 16, 16))


def test_pgl_over_infopro_global_step_trains_heads_and_decoders_on_infopro_loss():
    model = small()
    method = PGL(1, 1, local=InfoPro(lambdas=(2.0, 0.5)))
    learner = pgl_fast.LocalLearner(model, method, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    assert len(model.decoders) == 1  # InfoPro's decoder was added for the one cut
    x, y, img = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.rand(4, 3, 16, 16)
    grads = {}
    orig = learner.step_module

    def record(j):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        orig(j)

    learner.step_module = record
    learner.global_step(x, y, img)
    # reference: the head and decoder on detached features, InfoPro's loss by hand
    feat = model.blocks[0](x).detach()
    loss = 2.0 * F.binary_cross_entropy(torch.sigmoid(model.decoders[0].logits(feat)), img) + \
        0.5 * F.cross_entropy(model.heads[0](feat), y)
    names = [n for n, _ in model.named_parameters() if n.startswith(("heads.", "decoders."))]
    ref = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
    for n, r in zip(names, ref):
        assert torch.allclose(grads[n], r, rtol=1e-4, atol=1e-6), n


def test_user_optimizer_schedule_and_state_roundtrip():
    model = small()
    learner = pgl_fast.LocalLearner(model, PGL(1, 1), optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
                                    lr_schedule=lambda e: 1e-3 * (e + 1))
    assert learner.start_epoch(1) == pytest.approx(2e-3) and learner.phase == "global"
    assert all(g["lr"] == pytest.approx(2e-3) for o in learner.optimizers for g in o.param_groups)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    learner.step(x, y)
    # through bytes, as a checkpoint does (a live state dict shares Adam's step tensors)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = pgl_fast.LocalLearner(small(seed=1), PGL(1, 1), optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3))
    other.load_state_dict(state)
    for a, b in zip(model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)
    learner.local_step(x, y)
    other.local_step(x, y)
    for a, b in zip(model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)  # the optimizer state came along too


def test_learner_input_errors():
    with pytest.raises(UserError, match="LocalModel"):
        pgl_fast.LocalLearner(nn.Linear(2, 2), DGL())
    with pytest.raises(UserError, match="aux head, but the model has 0 heads"):
        pgl_fast.LocalLearner(small(aux=None), DGL())
    with pytest.raises(UserError, match="cuda_graphs"):
        pgl_fast.LocalLearner(small(), DGL(), cuda_graphs=True)
    with pytest.raises(UserError, match="not a torch.optim.Optimizer"):
        pgl_fast.LocalLearner(small(), DGL(), optimizer=lambda ps: object())


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g)


VOLATILE = {"images_per_s", "epoch_seconds", "peak_mem_mib", "peak_reserved_mib", "mem_kind", "graph_pool_mib"}


def test_trainer_interrupted_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    from pgl_fast.training.trainer import RunInterrupted

    train, test = data(64), data(32, 1)

    def run(out, resume=None):
        torch.manual_seed(0)
        learner = pgl_fast.LocalLearner(small(), PGL(1, 1), lr_schedule=lambda e: 0.05 / (e + 1))
        return pgl_fast.Trainer(learner, train, test, epochs=3, batch_size=16, output_dir=str(out), seed=3,
                                resume=resume, progress="off", heartbeat=0).fit()

    def rows(out):
        return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE}
                for l in (out / "metrics.jsonl").read_text().splitlines()]

    run(tmp_path / "full")
    monkeypatch.setenv("PGL_FAST_SIGNAL_AT", "2:2:INT")  # SIGINT after step 2 of epoch 2 (a global epoch)
    with pytest.raises(RunInterrupted, match="epoch 2, step 2/4"):
        run(tmp_path / "cut")
    monkeypatch.delenv("PGL_FAST_SIGNAL_AT")
    run(tmp_path / "cut", resume="auto")
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    assert len(rows(tmp_path / "full")) == 3


def test_trainer_takes_a_dataloader_and_float_tensors(tmp_path):
    x, y = data(48)
    xf = x.float() / 255
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xf, y), batch_size=16, shuffle=True)
    learner = pgl_fast.LocalLearner(small(), DGL())
    s = pgl_fast.Trainer(learner, loader, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xf, y), batch_size=16),
                         epochs=1, output_dir=str(tmp_path / "loader"), progress="off", heartbeat=0).fit()
    assert s["epochs"] == 1 and 0.0 <= s["final_test_acc"] <= 1.0
    s = pgl_fast.Trainer(pgl_fast.LocalLearner(small(), DGL()), (xf, y), (xf, y), epochs=1,
                         output_dir=str(tmp_path / "float"), progress="off", heartbeat=0).fit()
    assert s["epochs"] == 1
    with pytest.raises(UserError, match="save_every"):
        pgl_fast.Trainer(learner, loader, None, epochs=1, save_every=2, output_dir=str(tmp_path / "l2"))
    with pytest.raises(UserError, match="uint8"):
        pgl_fast.Trainer(pgl_fast.LocalLearner(small(), InfoPro()), (xf, y), None, epochs=1,
                         output_dir=str(tmp_path / "ip"))
