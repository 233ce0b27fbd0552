"""plait's one option system, for the training config and for every command's typed options alike: a field is a
dataclass field with its docstring under it, its choices and bounds in its metadata (`option`, `choice`),
validated once (`validate`, `require`), its --help text read from the docstring (`field_docs`; the flags
themselves are built by pipeline/flags.py).

Its own module, importing nothing of plait and no torch, so that sections defined outside pipeline/config.py
(each objective unit's, in pipeline/objectives/) use it without importing the root config, and so that `plait
prep` builds its flags without importing torch: the root config imports every objective unit, and torch with
them (5 s of every prep run's start-up on a 2-core machine)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from dataclasses import field
from typing import Any

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def require(ok: bool, key: str, message: str) -> None:
    """Raises the user-facing error for a bad value; `key` is the dotted config key."""
    if not ok:
        raise ValueError(f"config key {key!r}: {message}")


def choice(default: Any, *choices: Any) -> Any:
    """A field restricted to `choices` (`option(default, choices=choices)`); the allowed values appear in errors
    and in --help."""
    return option(default, choices=choices)


def field_docs(cls: type) -> dict[str, str]:
    """Maps each field of a dataclass to the string literal written right under it in the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def parse_size(value: str, flag: str = "--shard-bytes") -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '1.5 GB', plain integers; units are case-insensitive
    (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not unit:
        raise ValueError(f"{flag} {value!r}: expected a size like 500MB, 1GiB or a number of bytes "
                         "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{flag} {value!r}: must be positive")
    return size


def format_size(num_bytes: float) -> str:
    """Decimal units, 3 significant digits: 1234567 -> '1.23 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(num_bytes) < 1000:
            return f"{num_bytes:.3g} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.3g} TB"


def option(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
           le: float | None = None, inf: bool = False, choices: tuple[str, ...] | None = None,
           aliases: tuple[str, ...] = (), **meta: Any) -> Any:
    """A dataclass field with what its flag needs: numeric bounds (gt/ge/le; inf=True lets infinity mean "no
    limit"), choices, older flag spellings kept working (aliases), and for the CLI: metavar, parse, repeat,
    negative (a store_false alias), no_flag (derived, never set by a flag)."""
    meta.update(gt=gt, ge=ge, le=le, inf=inf, choices=choices, aliases=aliases)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    """The flag of a field: the field name with dashes (`image_size` -> `--image-size`)."""
    return "--" + name.replace("_", "-")


def validate(obj: Any) -> None:
    """Checks every field's choices and bounds; the error names the flag and the value."""
    for f in dataclasses.fields(obj):
        m, value = f.metadata, getattr(obj, f.name)
        if m.get("choices") and value not in m["choices"]:
            raise ValueError(f"{flag_of(f.name)} {value!r}: expected one of {', '.join(m['choices'])}")
        bounds = [(op, m.get(op)) for op in ("gt", "ge", "le") if m.get(op) is not None]
        if not bounds or value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not m.get("inf"))):
            raise ValueError(f"{flag_of(f.name)} {value!r}: must be a finite number{_bounds_text(m)}")
        if math.isinf(value) and value > 0 and m.get("inf"):
            continue
        if any((op == "gt" and not value > b) or (op == "ge" and not value >= b) or (op == "le" and not value <= b)
               for op, b in bounds):
            raise ValueError(f"{flag_of(f.name)} {value!r}: must be{_bounds_text(m)}")


def _bounds_text(m: Any) -> str:
    parts = [f"{sym} {m[op]:g}" for op, sym in (("gt", ">"), ("ge", ">="), ("le", "<=")) if m.get(op) is not None]
    return (" " + " and ".join(parts) if parts else "") + (" (inf for no limit)" if m.get("inf") else "")
