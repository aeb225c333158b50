"""The command line of MAN and of PGL over any local objective: tiny synthetic runs end to end, the
flags' refusals, and what header.json records."""
import json

import pytest

from pgl_fast.config import TrainConfig
from pgl_fast.errors import UserError
from pgl_fast.train import main

from helpers import tiny_cli_args

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_cli_args(train=64, test=32, batch=32, progress=None) + ["--epochs", "2", "-P", "1", "-Q", "1"]
LAMBDAS = ["--ixx-1", "1", "--ixy-1", "0.5", "--ixx-2", "0", "--ixy-2", "1"]


@pytest.mark.parametrize("args, spec", [
    (["--method", "man", "--man-momentum", "0.9"],
     {"method": "man", "momentum": 0.9, "base": {"method": "dgl"}}),
    (["--method", "pgl", "--pgl-local", "man"],
     {"method": "pgl", "period": 1, "duration": 1, "local": {"method": "man", "momentum": 0.995,
                                                             "base": {"method": "dgl"}}}),
    (["--method", "pgl", "--pgl-local", "infopro", "--infopro-loss", "softmax"] + LAMBDAS,
     {"method": "pgl", "period": 1, "duration": 1, "local": {"method": "infopro", "contrast": False,
                                                             "lambdas": [[1.0, 0.5], [0.5, 0.75], [0.0, 1.0]]}}),
], ids=["man", "pgl-man", "pgl-infopro"])
def test_trains_end_to_end(tmp_path, args, spec):
    out = tmp_path / "run"
    assert main(TINY + args + ["-o", str(out)]) == 0
    header = json.loads((out / "header.json").read_text())
    assert header["method_spec"] == spec
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["phase"] for r in rows] == (["local", "local"] if args[1] == "man" else ["local", "global"])
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite, not NaN
    if "man" in args:
        assert header["parameters"]["ema"] > 0 and len(rows[0]["head_acc"]) == 3


def test_describe_shows_man_copies(capsys):
    assert main(TINY + ["--method", "man", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "ema_params" in out and "ema " in out.splitlines()[-1]


@pytest.mark.parametrize("kw, message", [
    (dict(method="pgl", pgl_local="bp"), "--pgl-local: 'bp' is not one of dgl, infopro, man"),
    (dict(method="man", man_momentum=1.5), "--man-momentum: must be in [0, 1], got 1.5"),
    (dict(method="man", man_base="pgl"), "--man-base: 'pgl' is not one of dgl, infopro"),
    (dict(method="man", pipeline=2, modules=4, split="even"),
     "--pipeline: is not supported with MAN: module j's EMA copy follows module j+1"),
    (dict(method="pgl", pgl_local="man", pipeline=2, modules=4, split="even"), "--pipeline: is not supported with MAN"),
    (dict(method="man", man_base="infopro", aux="adapt"), "--aux: InfoPro uses InfoPro's AuxClassifier heads"),
])
def test_config_refusals(kw, message):
    with pytest.raises(UserError) as e:
        TrainConfig(**kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unknown_pgl_local_one_line(capsys):
    with pytest.raises(SystemExit):
        main(TINY + ["--method", "pgl", "--pgl-local", "hebbian", "--describe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pgl-local" in err[0] and "'dgl', 'infopro', 'man'" in err[0]


def test_irrelevant_flags_warn():
    warn = TrainConfig(method="dgl", man_momentum=0.9, pgl_local="man").no_effect_warnings({"man_momentum", "pgl_local"})
    assert any("--man-momentum has no effect with --method dgl" in w for w in warn)
    assert any("--pgl-local has no effect with --method dgl" in w for w in warn)
    assert TrainConfig(method="pgl", pgl_local="man", man_momentum=0.9).no_effect_warnings({"man_momentum"}) == []
    assert TrainConfig(method="man", man_base="infopro").uses_infopro  # InfoPro's lambdas resolved for it


def test_head_kernels_triton_refused_for_man():
    from pgl_fast.config.build import resolve_head_kernels
    import torch

    with pytest.raises(UserError, match="--head-kernels triton: is not supported with MAN: the fused kernels are for heads on the module"):
        resolve_head_kernels(TrainConfig(method="man", head_kernels="triton"), torch.device("cpu"))
    assert resolve_head_kernels(TrainConfig(method="pgl", pgl_local="man"), torch.device("cuda")) is False
