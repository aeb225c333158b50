"""Adding an entry to one of the engine's name -> entry tables (aux heads, data sets): the checks
and one-line refusals every registry makes alike, so each ``register_*`` states only what differs."""
from __future__ import annotations

from .errors import UserError


def add_entry(table: dict, name, entry, *, fn: str, kind: str, cls: type, field: str, lower: bool,
              replace: bool, subclass: bool = False) -> None:
    """``table[name] = entry`` after checking the name (non-empty, no surrounding spaces, lower case
    where ``lower``), the entry's type (an instance of ``cls``, or with ``subclass`` a class deriving
    from it) and that ``name`` is new unless ``replace``. ``fn`` names the caller in the messages,
    ``kind`` what an entry is, ``field`` the argument the entry came in."""
    if not isinstance(name, str) or not name or name != name.strip() or (lower and name != name.lower()):
        rule = "a non-empty lower-case string" if lower else "a non-empty string without surrounding spaces"
        raise UserError(f"{fn}: the name must be {rule}, got {name!r}")
    if subclass and not (isinstance(entry, type) and issubclass(entry, cls)):
        raise UserError(f"{fn}({name!r}): the {field} must be a subclass of {cls.__name__}, got {entry!r}")
    if not subclass and not isinstance(entry, cls):
        raise UserError(f"{fn}({name!r}): the {field} must be a {cls.__name__}, got {type(entry).__name__}")
    if name in table and not replace:
        raise UserError(f"{fn}: {kind} {name!r} is registered already; pass replace=True to redefine it")
    table[name] = entry
