"""Command-line flags generated from a typed config dataclass, so the --help text is the fields' docstrings.

A field becomes `--field-name` (typed, with its choices and default), a positional argument with
`metadata={"positional": True}`, or another flag name with `metadata={"flag": "--x"}`. A field without a default
is a required flag. The dataclass validates itself (`__post_init__`) once the namespace is turned into it.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from pipeline.config import field_docs


def _base_type(hint: Any) -> type:
    """`int | None` -> int; tuples and other containers are not supported as flags."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        assert len(args) == 1, hint
        return args[0]
    return hint


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of `cls`, its help text from the docstring under the field."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base = _base_type(hints[f.name])
        doc = " ".join(docs.get(f.name, "").split())
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=base, help=doc)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": doc}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default not in (None, ""):
                kwargs["help"] = f"{doc} (default: %(default)s)"
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag_name(f), **kwargs)


def from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """The validated config built from parsed arguments."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
