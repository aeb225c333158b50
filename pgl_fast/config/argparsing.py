"""The command lines' shared parser pieces.

``OneLineParser`` is argparse with prefix matching off (``--epoch`` is an error, never a silent
``--epochs``) and its errors reduced to one line (no usage dump). ``add_field`` / ``add_fields``
turn the fields of a config dataclass into flags, so a flag that several commands share is
defined once, by its field, with one help text and one set of choices.

A field is described by its ``metadata`` (as ``TrainConfig`` does through its ``_f`` helper):

- ``help``: the help text;
- ``flags``: the option strings, e.g. ``("-J", "--modules")``; empty: ``--`` + the name with ``-``
  for ``_``;
- ``group``: a key of the ``groups`` given to ``add_fields`` (an argument group per key);
- ``choices``, ``metavar``: as argparse's.

The type comes from the annotation: ``bool`` is a ``store_true`` switch, ``int`` / ``float`` (or
``int | None``, ...) parse as such, anything else is a string.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Iterable

from ..errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line.

    ``on_error="exit"`` (argparse's own behaviour, minus the usage dump): print ``<prog>: error:
    <message>`` to stderr and exit with status 2. ``on_error="raise"``: raise
    :class:`~pgl_fast.errors.UserError` with the message, for commands that print their errors
    themselves and return the exit code from a ``main()`` that tests call directly."""

    def __init__(self, *args, on_error: str = "exit", allow_abbrev: bool = False, **kwargs):
        if on_error not in ("exit", "raise"):
            raise ValueError(f"on_error must be 'exit' or 'raise', got {on_error!r}")
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self.on_error = on_error

    def error(self, message: str):
        message = " ".join(str(message).split())  # argparse's messages may wrap; keep one line
        if self.on_error == "raise":
            raise UserError(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default stated once.

    argparse's ``ArgumentDefaultsHelpFormatter`` appends ``(default: ...)`` to every help text,
    which repeats a default the text already explains (``batch size (default 1024; 128 for
    stl10) (default: None)``) and shows ``None`` where the real default is resolved later. This
    one appends it only where it adds something: not when the help already says ``(default``,
    not for a ``None`` default (the help must say what happens then), and not for an on/off
    switch (off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or "(default" in text
                or action.nargs == 0):
            return text
        return super()._get_help_string(action)


def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _field_type(cls, f: dataclasses.Field):
    """The field's type with ``| None`` / ``Optional`` removed: bool, int, float or str."""
    try:
        hint = typing.get_type_hints(cls)[f.name]
    except Exception:  # an annotation that does not evaluate here: read its text instead
        hint = str(f.type)
    if isinstance(hint, str):
        text = hint.replace(" ", "").replace("|None", "").replace("None|", "")
        text = text.removeprefix("Optional[").removesuffix("]")
        return {"bool": bool, "int": int, "float": float}.get(text, str)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not None:
        hint = args[0] if len(args) == 1 else str
    return hint if hint in (bool, int, float) else str


def flag_strings(cls, name: str) -> tuple[str, ...]:
    """The option strings of field ``name`` of dataclass ``cls``."""
    md = _field(cls, name).metadata
    return tuple(md.get("flags") or ()) or ("--" + name.replace("_", "-"),)


def flag_of(cls, name: str) -> str:
    """How error and warning messages name field ``name``: its option strings joined by ``/``."""
    return "/".join(flag_strings(cls, name))


def add_field(target, cls, name: str, *, explicit_only: bool = False, note: str | None = None, **overrides):
    """Add field ``name`` of dataclass ``cls`` to ``target`` (a parser or an argument group) as a flag.

    The flag, help, choices, metavar, type and default come from the field; ``overrides`` replaces
    any ``add_argument`` keyword (e.g. ``default=None`` where a command resolves the default
    itself, or ``dest``), and ``note`` is appended to the help in parentheses (what the flag does
    differently in this command). ``explicit_only`` leaves the default out of the parsed namespace
    (``argparse.SUPPRESS``), so the namespace holds exactly the flags given. Returns the action."""
    f = _field(cls, name)
    md = f.metadata
    typ = _field_type(cls, f)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    kw: dict = {"dest": f.name, "help": md.get("help"),
                "default": argparse.SUPPRESS if explicit_only else default}
    if typ is bool:
        kw["action"] = "store_true"
    else:
        kw["type"] = typ
        if md.get("choices"):
            kw["choices"] = md["choices"]
        if md.get("metavar"):
            kw["metavar"] = md["metavar"]
    kw.update(overrides)
    if note:
        kw["help"] = f"{kw['help']} ({note})" if kw.get("help") else note
    return target.add_argument(*flag_strings(cls, name), **kw)


def add_fields(parser: argparse.ArgumentParser, cls, names: Iterable[str] | None = None, *,
               groups: dict[str, str] | None = None, explicit_only: bool = False) -> dict[str, argparse.Action]:
    """Add the fields ``names`` of dataclass ``cls`` (default: all, in declaration order) as flags.

    With ``groups`` ({metadata group key: title}) every flag goes into the argument group of its
    field's ``group``; the groups are created in the order of ``groups``, so ``--help`` lists them
    in that order whichever field comes first. Returns {field name: action}."""
    names = [f.name for f in dataclasses.fields(cls)] if names is None else list(names)
    targets = {k: parser.add_argument_group(title) for k, title in groups.items()} if groups else {}
    actions = {}
    for name in names:
        group = _field(cls, name).metadata.get("group")
        if groups and group not in targets:
            raise KeyError(f"{cls.__name__}.{name}: group {group!r} is not one of {', '.join(targets)}")
        actions[name] = add_field(targets[group] if groups else parser, cls, name, explicit_only=explicit_only)
    return actions
