"""What every component config shares: how a field is declared (its flag's help, option strings,
``--help`` group, choices and metavar ride in the field's metadata, so argparse is generated from
the fields) and how a bad value is reported (one line naming the flag and what is allowed)."""
from __future__ import annotations

from dataclasses import field

from ..errors import UserError


def _f(default, help: str, *, flags: tuple[str, ...] = (), group: str = "training", choices=None, metavar=None):
    return field(default=default, metadata={"help": help, "flags": flags, "group": group,
                                            "choices": choices, "metavar": metavar})


def bad(flag: str, msg: str) -> None:
    """Refuse a value: ``UserError("<flag>: <what is allowed>")``."""
    raise UserError(f"{flag}: {msg}")
