"""The helpers every config section uses: `require` (a validation error naming the key), `choice` (a field
restricted to listed values) and `field_docs` (the docstring under each field, for --help).

Their own module so that sections defined outside pipeline/config.py (each objective unit's, in
pipeline/objectives/) use them without importing the root config, and so that `plait prep` builds its flags
without importing torch: the root config imports every objective unit, and torch with them (5 s of every prep
run's start-up on a 2-core machine)."""
from __future__ import annotations

import ast
import inspect
from dataclasses import field
from typing import Any


def require(ok: bool, key: str, message: str) -> None:
    """Raises the user-facing error for a bad value; `key` is the dotted config key."""
    if not ok:
        raise ValueError(f"config key {key!r}: {message}")


def choice(default: Any, *choices: Any) -> Any:
    """A field restricted to `choices`; the allowed values appear in errors and in --help."""
    return field(default=default, metadata={"choices": choices})


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
