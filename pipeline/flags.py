"""Command-line flags generated from typed option dataclasses (pipeline/options.py): one flag per field, its
docstring as help. Shared by `plait prep` (data_prep/cli.py), the stages with their own flag sets (score,
filter) and `plait finetune`."""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from pipeline.options import field_docs, flag_of, parse_size


def _csv_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _rgb(value: str) -> tuple[int, int, int]:
    parts = _csv_list(value)
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: expected R,G,B with values 0..255")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _finite(value: str) -> float:
    """float() that keeps 'inf' (a documented 'no limit') but leaves nan and the range to `options.validate`."""
    return float(value)


def _default_text(f: dataclasses.Field, default: Any) -> str:
    if default is None or default is False or default == () or f.metadata.get("cli_default", 0) is None:
        return ""
    if isinstance(default, bool):
        return " (default: on)"
    if isinstance(default, tuple):
        return f" (default: {','.join(map(str, default))})"
    if f.metadata.get("parse") == "size":
        return f" (default: {default // 2**20}MiB)" if default % 2**20 == 0 else f" (default: {default} bytes)"
    if isinstance(default, float) and math.isinf(default):
        return " (default: inf, no limit)"
    return f" (default: {default})"


def _metavar(name: str, base: type) -> str:
    if name.endswith("_col"):
        return "COL"
    if name.endswith("_s"):
        return "SECONDS"
    return {int: "N", float: "X"}.get(base, "TEXT")


def add_options(group: argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of `cls`: `--field-name`, typed, its docstring as help, choices and bounds from
    `options.option`, older spellings as aliases; `option(positional=True)` makes an operand instead. The dataclass
    is the only place that states a default."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m, hint = f.metadata, hints[f.name]
        if m.get("no_flag") or dataclasses.is_dataclass(hint):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [flag_of(f.name), *m.get("aliases", ())]
        text = " ".join(docs.get(f.name, "").split()) + _default_text(f, default)
        kw: dict[str, Any] = {"dest": f.name, "help": text}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
            base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
            parse = m.get("parse")
            if parse == "size":
                kw["type"] = str  # parsed in `from_args`, so that a bad size is a one-line ValueError
            elif parse == "rgb":
                kw["type"] = _rgb
            elif m.get("repeat"):
                kw["action"] = "append"
            elif typing.get_origin(base) is tuple:
                kw["type"] = _csv_list
            elif base in (int, float):
                kw["type"] = _finite if base is float else int
            kw["choices"] = m.get("choices")
            kw["metavar"] = m.get("metavar") or (None if kw["choices"] else _metavar(f.name, base))
            kw["required"] = required
        kw["default"] = m["cli_default"] if "cli_default" in m else None if m.get("repeat") else default
        if m.get("positional"):  # an operand rather than a flag: the dataset or model a command works on
            kw["metavar"] = m.get("metavar")
            group.add_argument(f.name, **{k: v for k, v in kw.items() if k in ("help", "type", "metavar")})
            continue
        group.add_argument(*flags, **kw)
        for neg in m.get("negative", ()):
            group.add_argument(neg, dest=f.name, action="store_false", help=f"same as --no-{flag_of(f.name)[2:]}")


def from_args(cls: type, a: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass `cls` from the parsed flags (its fields that have one) and `overrides`."""
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if hasattr(a, f.name)}
    for f in dataclasses.fields(cls):
        if f.metadata.get("parse") == "size" and isinstance(kw.get(f.name), str):
            kw[f.name] = parse_size(kw[f.name], flag_of(f.name))
    kw.update(overrides)
    return cls(**kw)


def add_member_key_flags(parser) -> None:
    """--image-keys / --caption-keys: the member keys a stage reads, as data.image_keys / data.caption_keys do
    for training (data_prep/shards/members.py), so every stage reads a sample the same way."""
    from data_prep.shards.members import CAPTION_KEYS, IMAGE_KEYS
    parser.add_argument("--image-keys", default=IMAGE_KEYS, metavar="KEYS",
                        help="image members, tried in order (';'-separated extensions; as data.image_keys)")
    parser.add_argument("--caption-keys", default=CAPTION_KEYS, metavar="KEYS",
                        help="caption members, tried in order: extensions or json:FIELD (as data.caption_keys)")
