"""InfoPro publishes lambda defaults for its contrastive loss only; a softmax run reuses that
table, and the run's header says which lambdas were used and where they came from."""
from pgl_fast.config import TrainConfig


def test_softmax_run_records_the_reused_contrastive_table():
    cfg = TrainConfig(method="infopro", arch="resnet32", modules=16, infopro_loss="softmax", aux="1c2f")
    rec = cfg.infopro_lambda_record()
    # the table's resnet32 J=16 CIFAR-10 entry, written out by hand
    assert rec["endpoints"] == {"ixx_1": 5.0, "ixy_1": 0.05, "ixx_2": 0.2, "ixy_2": 0.5}
    assert "contrastive" in rec["source"] and "softmax" in rec["source"]
    assert len(rec["per_module"]) == 15
    assert rec["per_module"][0] == [5.0, 0.05] and rec["per_module"][-1] == [0.2, 0.5]
    assert rec["per_module"][7] == [5.0 * 0.5 + 0.2 * 0.5, 0.05 * 0.5 + 0.5 * 0.5]


def test_contrast_and_given_lambdas_are_named_as_such():
    assert TrainConfig(method="infopro", arch="resnet32", modules=16).infopro_lambda_record()["source"] == \
        "InfoPro's published per-run table"
    given = TrainConfig(method="infopro", arch="resnet32", modules=4, ixx_1=1, ixy_1=1, ixx_2=0, ixy_2=1)
    assert given.infopro_lambda_record()["source"] == "given on the command line"


def test_help_says_the_table_is_for_the_contrastive_loss():
    from pgl_fast.config import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "published lambda defaults only for contrast" in text


def test_header_records_the_lambdas_used(tmp_path):
    import json

    from pgl_fast import train

    out = tmp_path / "run"
    rc = train.main(["--dataset", "synthetic", "--synthetic-train", "16", "--synthetic-test", "8", "--arch", "resnet8",
                     "--method", "infopro", "--infopro-loss", "softmax", "-J", "3", "--ixx-1", "2", "--ixy-1", "0.5",
                     "--ixx-2", "0", "--ixy-2", "1", "--epochs", "1", "-b", "8", "--progress", "off", "-o", str(out)])
    assert rc == 0
    rec = json.loads((out / "header.json").read_text())["infopro_lambdas"]
    assert rec["per_module"] == [[2.0, 0.5], [0.0, 1.0]] and rec["source"] == "given on the command line"


def test_report_names_the_lambdas_of_the_infopro_row():
    from pgl_fast.experiments.report import _infopro_lambda_lines

    runs = [{"method": "infopro", "J": 16, "infopro_loss": "softmax", "infopro_lambdas": (5.0, 0.05, 0.2, 0.5)},
            {"method": "dgl", "J": 16, "infopro_loss": None, "infopro_lambdas": None}]
    (line, blank) = _infopro_lambda_lines(runs)
    assert "lambda_1 (reconstruction) 5 -> 0.2, lambda_2 (task) 0.05 -> 0.5" in line
    assert "contrastive loss only" in line and blank == ""
    assert _infopro_lambda_lines(runs[1:]) == []
