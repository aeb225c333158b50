"""The worked examples of docs/architecture.md ("Adding an aux head", "Adding a method", "Adding
a data set") run as written, and what they build does what the page says: checked here against
plain autograd and hand-computed values, not against the engine's own code paths.

Each block runs in a fresh namespace; the registry entries a block adds are removed afterwards
(``restored_registries``), so no other test sees them. test_docs_commands.py leaves this page's
python blocks to this file.
"""
import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgl_fast.data import DATASETS
from pgl_fast.models.heads import HEADS

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "architecture.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def section_block(title: str) -> str:
    """The one ```python block of the page's ``## title`` section."""
    text = PAGE.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    body = next(s for s in sections if s.startswith(title + "\n"))
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert len(blocks) == 1, f"{title}: expected one python block, found {len(blocks)}"
    return blocks[0]



def run_block(title: str, capsys) -> dict:
    ns = {"__name__": "__docs__"}
    exec(compile(section_block(title), f"{PAGE.name}: {title}", "exec"), ns)
    assert capsys.readouterr().out.strip(), f"{title}: the example prints nothing"
    return ns


def test_the_three_sections_each_have_one_example():
    for title in ("Adding an aux head", "Adding a method", "Adding a data set"):
        assert "Files a newcomer touches" in PAGE.read_text().split(f"## {title}\n")[1].split("\n## ")[0]
        section_block(title)


def test_aux_head_example(restored_registries, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_block("Adding an aux head", capsys)
    assert "poollinear" in HEADS
    model, learner = ns["model"], ns["learner"]
    head = model.heads[0]
    assert type(head) is ns["PoolLinear"]
    # the head sits on module 0's output (8 channels, 8x8) and gives one logit per class
    feats = torch.randn(5, 8, 8, 8)
    assert head(feats).shape == (5, 10)
    # one more local step, against plain autograd on a copy: the head's gradient is that of the
    # cross-entropy of (mean-pooled features @ W.T + b), and SGD(lr=0.1) moves it by -0.1 * grad
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])
    h = ref.blocks[0](x).detach()
    w = ref.heads[0].fc.weight.detach().clone().requires_grad_()
    b = ref.heads[0].fc.bias.detach().clone().requires_grad_()
    F.cross_entropy(h.mean(dim=(2, 3)) @ w.t() + b, y).backward()
    assert w.grad.abs().sum() > 0
    learner.step(x, y)
    torch.testing.assert_close(head.fc.weight.detach(), (w - 0.1 * w.grad).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.fc.bias.detach(), (b - 0.1 * b.grad).detach(), rtol=1e-5, atol=1e-6)


def test_method_example(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_block("Adding a method", capsys)
    model, learner = ns["model"], ns["learner"]
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 5])
    losses = learner.step(x, y)  # epoch 0 of PGL(1, 1): a local step
    # label smoothing 0.2 over K = 10 classes, by hand: -(1 - 0.2) log p_y - 0.2 / K * sum_k log p_k
    with torch.no_grad():
        logp = torch.log_softmax(ref.heads[0](ref.blocks[0](x)), dim=1)
        eps, k = 0.2, logp.shape[1]
        want = (-(1 - eps) * logp[torch.arange(6), y] - eps / k * logp.sum(dim=1)).mean()
        plain = -logp[torch.arange(6), y].mean()
    assert float(losses[0]) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(want) - float(plain)) > 1e-3  # the smoothing is visible at this tolerance


def test_data_set_example(restored_registries, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_block("Adding a data set", capsys)
    assert "checkers" in DATASETS
    data = ns["data"]
    assert data.train_x.dtype == torch.uint8
    assert (tuple(data.train_x.shape), tuple(data.test_x.shape)) == ((64, 3, 8, 8), (32, 3, 8, 8))
    assert data.train_y.tolist() == [i % 2 for i in range(64)] and data.test_y.tolist() == [i % 2 for i in range(32)]
    assert data.class_names == ("board", "inverse")
    assert (data.spec.num_classes, data.spec.image_size) == (2, 8)
    # pixel (0, 0) is dark on a checkerboard (0 + noise < 60) and bright on its inverse (>= 180)
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        corner = x[:, :, 0, 0]
        assert torch.equal((corner >= 180).all(dim=1), y == 1) and torch.equal((corner < 60).all(dim=1), y == 0)
    # the CLI trained one epoch on it
    assert ns["rc"] == 0
    run = tmp_path / "runs" / "checkers"
    header = json.loads((run / "header.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (header["config"]["dataset"], header["train_images"], header["test_images"]) == ("checkers", 64, 32)
    assert [m["epoch"] for m in metrics] == [1]
