"""The shared parser pieces: one-line errors, no prefix matching, and flags generated from a config
dataclass's fields, checked against the training CLI's own parser and against hand-written flags."""
import argparse
import dataclasses
import io
from contextlib import redirect_stderr

import pytest

from pgl_fast.config.argparsing import OneLineParser, add_field, add_fields, flag_of, flag_strings
from pgl_fast.config import GROUP_TITLES, TrainConfig, build_parser
from pgl_fast.errors import UserError


def _actions(p: argparse.ArgumentParser) -> list[tuple]:
    out = []
    for g in p._action_groups:
        for a in g._group_actions:
            out.append((g.title, tuple(a.option_strings), a.dest, repr(a.default), a.type, a.choices, a.metavar,
                        a.help, a.nargs, a.const, type(a).__name__))
    return out


@pytest.mark.parametrize("explicit_only", [False, True])
def test_fields_give_the_training_clis_flags_exactly(explicit_only):
    p = OneLineParser(prog="python -m pgl_fast.train")
    add_fields(p, TrainConfig, groups=GROUP_TITLES, explicit_only=explicit_only)
    assert _actions(p) == _actions(build_parser(explicit_only=explicit_only))
    argv = ["--dataset", "synthetic", "-J", "4", "--method", "dgl", "--amp", "-b", "32", "--lr", "0.1",
            "--memory-budget", "512", "-o", "/tmp/x"]
    assert vars(p.parse_args(argv)) == vars(build_parser(explicit_only=explicit_only).parse_args(argv))


@dataclasses.dataclass
class _Cfg:
    count: int = dataclasses.field(default=3, metadata={"help": "how many", "flags": ("-n", "--count"),
                                                        "group": "a", "metavar": "N"})
    rate: float | None = dataclasses.field(default=None, metadata={"help": "a rate", "group": "b"})
    mode: str = dataclasses.field(default="x", metadata={"help": "which", "group": "a", "choices": ("x", "y")})
    fast: bool = dataclasses.field(default=False, metadata={"help": "go fast", "group": "b"})
    names: list = dataclasses.field(default_factory=list, metadata={"help": "names", "group": "b"})


def test_fields_become_the_flags_a_hand_written_parser_has():
    ours = OneLineParser(prog="t")
    add_fields(ours, _Cfg, groups={"b": "second", "a": "first"})
    ref = argparse.ArgumentParser(prog="t", allow_abbrev=False)
    b, a = ref.add_argument_group("second"), ref.add_argument_group("first")
    a.add_argument("-n", "--count", dest="count", type=int, default=3, metavar="N", help="how many")
    b.add_argument("--rate", dest="rate", type=float, default=None, help="a rate")
    a.add_argument("--mode", dest="mode", type=str, default="x", choices=("x", "y"), help="which")
    b.add_argument("--fast", dest="fast", action="store_true", default=False, help="go fast")
    b.add_argument("--names", dest="names", type=str, default=[], help="names")
    # the groups keep the order given, not the order the fields come in
    assert [g.title for g in ours._action_groups][2:] == ["second", "first"]
    assert sorted(_actions(ours)) == sorted(_actions(ref))
    ns = ours.parse_args(["-n", "5", "--rate", "0.5", "--fast"])
    assert (ns.count, ns.rate, ns.mode, ns.fast) == (5, 0.5, "x", True)
    assert flag_strings(_Cfg, "count") == ("-n", "--count") and flag_of(_Cfg, "count") == "-n/--count"
    assert flag_strings(_Cfg, "rate") == ("--rate",)


def test_add_field_overrides_and_notes():
    p = OneLineParser(prog="t")
    act = add_field(p, TrainConfig, "arch", default=None, note="default: the protocol's")
    assert act.default is None and act.option_strings == ["--arch"]
    assert act.help.startswith("CIFAR ResNet-(6n+2)") and act.help.endswith("(default: the protocol's)")
    j = add_field(p, TrainConfig, "modules", dest="J")
    assert j.option_strings == ["-J", "--modules"] and p.parse_args(["-J", "4"]).J == 4
    with pytest.raises(KeyError, match="no field"):
        add_field(p, TrainConfig, "no_such_field")


def test_errors_are_one_line_and_exit_2(capsys):
    p = OneLineParser(prog="prog")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--mode", choices=("a", "b"))
    for argv, words in ((["--epoch", "2"], "unrecognized arguments: --epoch 2"),  # no prefix matching
                        (["--epochs", "x"], "invalid int value"),
                        (["--mode", "c"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("prog: error: ") and words in err, err
        assert "usage" not in err


def test_raise_mode_raises_user_error_and_prints_nothing():
    p = OneLineParser(prog="prog", on_error="raise")
    p.add_argument("grid")
    buf = io.StringIO()
    with redirect_stderr(buf), pytest.raises(UserError, match="the following arguments are required: grid"):
        p.parse_args([])
    with redirect_stderr(buf), pytest.raises(UserError, match="unrecognized arguments: --x"):
        p.parse_args(["g", "--x"])
    assert buf.getvalue() == ""
    with pytest.raises(ValueError, match="on_error"):
        OneLineParser(on_error="print")
