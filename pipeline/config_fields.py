"""The two helpers every config section uses: `require` (a validation error naming the key) and `choice` (a field
restricted to listed values). Their own module so that sections defined outside pipeline/config.py (each objective
unit's, in pipeline/objectives/) use them without importing the root config."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def require(ok: bool, key: str, message: str) -> None:
    """Raises the user-facing error for a bad value; `key` is the dotted config key."""
    if not ok:
        raise ValueError(f"config key {key!r}: {message}")


def choice(default: Any, *choices: Any) -> Any:
    """A field restricted to `choices`; the allowed values appear in errors and in --help."""
    return field(default=default, metadata={"choices": choices})
