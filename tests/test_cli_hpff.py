"""``--method hpff`` from the command line: a tiny synthetic run end to end, --describe counting the
second head set and the patch decoders, and the one-line refusals of its flags."""

import pytest

from pgl_fast.config import TrainConfig
from pgl_fast.errors import UserError
from pgl_fast.train import main

from helpers import tiny_cli_args

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(train=64, test=32, batch=32, progress=None)
TINY = tiny_cli_args(**SIZES) + ["--aux", "0c1f"]


def test_hpff_trains_end_to_end(cli):
    run = cli("--aux", "0c1f", "--method", "hpff", "--epochs", "1", **SIZES)
    rows = run.rows
    assert [r["phase"] for r in rows] == ["local"]
    assert rows[0]["train_loss"] == rows[0]["train_loss"]  # finite, not NaN
    cfg = run.config
    assert cfg["method"] == "hpff" and cfg["hpff_wx"] == 0.001 and cfg["hpff_wy"] == 0.999
    # the published lambdas of the cascade's InfoPro loss
    assert [cfg[k] for k in ("ixx_1", "ixy_1", "ixx_2", "ixy_2")] == [5.0, 0.5, 0.0, 0.0]


def _aux_total(out: str) -> int:
    line = [s for s in out.splitlines() if s.startswith("parameters:")][0]
    return int(line.split("aux ")[1].split()[0].replace(",", ""))


def test_describe_counts_the_second_heads_and_patch_decoders(capsys):
    args = ["--arch", "resnet8", "-J", "4", "--split", "layerwise", "--aux", "0c1f", "--describe"]
    assert main(args + ["--method", "dgl"]) == 0
    dgl = _aux_total(capsys.readouterr().out)
    assert main(args + ["--method", "hpff", "--hpff-base", "dgl"]) == 0
    second = _aux_total(capsys.readouterr().out)
    assert main(args + ["--method", "hpff"]) == 0
    full = _aux_total(capsys.readouterr().out)
    # resnet8 layerwise J=4: cuts 1 and 2 carry 16 and 32 channels (cut 0 has no loss, so no second
    # head). A 0c1f head is C*10 + 10; a patch decoder tile conv3x3(C->12)+bias, BN(12),
    # conv3x3(12->3)+bias, four tiles per cut
    def decoder(c):
        return (c * 12 * 9 + 12) + 2 * 12 + (12 * 3 * 9 + 3)

    assert second - dgl == (16 * 10 + 10) + (32 * 10 + 10)
    assert full - second == 4 * (decoder(16) + decoder(32))


@pytest.mark.parametrize("extra,flag", [
    (["--hpff-wx", "-1"], "--hpff-wx/--hpff-wy"),
    (["--hpff-patches", "0"], "--hpff-patches"),
    (["--compile"], "--compile"),
    (["--cuda-graphs"], "--cuda-graphs"),
])
def test_bad_hpff_flags_are_one_line(extra, flag, capsys):
    rc = main(TINY + ["--method", "hpff", "--epochs", "1", "--describe"] + extra)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and flag in err and "\n" not in err


def test_hpff_flags_warn_with_other_methods():
    cfg = TrainConfig(method="dgl", hpff_wx=0.5)
    assert any("--hpff-wx has no effect" in w for w in cfg.no_effect_warnings({"hpff_wx"}))


def test_header_records_the_lambdas_of_every_infopro_objective(cli):
    # PGL over MAN with InfoPro's loss, and HPFF on its published InfoPro base, both train with
    # InfoPro's lambdas: header.json says which, as it does for --method infopro
    for name, extra, source in (
            ("hpff", ["--method", "hpff"], "HPFF's published runs"),
            ("pgl-man", ["--method", "pgl", "--pgl-local", "man", "--man-base", "infopro", "--ixx-1", "1",
                         "--ixy-1", "0.5", "--ixx-2", "0", "--ixy-2", "1"], "given on the command line")):
        rec = cli(*extra, "--epochs", "1", "--device", "cpu", name=name, train=16, test=8, J=3, split="even",
                  batch=8).header["infopro_lambdas"]
        assert rec["source"] == source, name
        assert len(rec["per_module"]) == 2
