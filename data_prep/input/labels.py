"""Class labels: the values of `--label-col` (integer ids or class names) as the ids written to `{key}.cls`.

Names map to ids in one order for the whole job: the lines of `--classnames FILE`, else the sorted unique names
of the column, computed once when the plan is written (one pass over the input) and recorded in `_plan.json`, so
every array task and every resume maps a name to the same id. `classnames.txt` beside the shards holds the same
list in id order; `plait eval` and `plait finetune` read it from the shards' folder on their own.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Iterable

from data_prep.media.images import Reject
from data_prep.shards import remote
from data_prep.shards.layout import classname_problem, parse_classnames

if TYPE_CHECKING:
    from data_prep.options import SourceOptions

LABEL_LIKE = ("cls", "label", "labels", "class", "category", "target")
"""Column names that usually hold a class: kept only in `{key}.json` without --label-col, which is warned about."""
_ID = re.compile(r"\d+")


def as_text(value: Any) -> str | None:
    """A label value as text ('3' for 3 or 3.0, names stripped); None when missing or empty."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() or None


def is_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def read_classnames(path: str) -> list[str]:
    """One class name per line, in id order (blank lines ignored; layout.parse_classnames, as eval reads it);
    duplicates and undecodable files are errors naming the file."""
    import fsspec

    remote.trust(path)  # typed with --classnames
    try:
        with fsspec.open(path, "rb") as f:
            names = parse_classnames(f.read().decode("utf-8"))
    except UnicodeDecodeError as exn:
        raise ValueError(f"--classnames {path!r}: not UTF-8 text ({exn.reason} at byte {exn.start})") from None
    if not names:
        raise ValueError(f"--classnames {path!r}: no class names in this file")
    seen: set[str] = set()
    for name in names:
        problem = classname_problem(name)
        if problem:
            raise ValueError(f"--classnames {path!r}: {problem}")
        if name in seen:
            raise ValueError(f"--classnames {path!r}: {name!r} appears twice")
        seen.add(name)
    return names


def plan_classnames(values: Iterable[Any], given: list[str] | None) -> list[str] | None:
    """The class names in id order: `given` (a --classnames file), else the sorted unique names of `values`;
    None when every value is already an integer id (then no name mapping is needed or written)."""
    if given is not None:
        return given
    names = {t for t in map(as_text, values) if t is not None and classname_problem(t) is None}
    if all(is_id(t) for t in names):
        return None
    return sorted(names)


def label_id(value: Any, classnames: tuple[str, ...] | None, index: dict[str, int] | None) -> tuple[int, str | None]:
    """(id, class name or None) of one row's label; a missing or unknown label is a Reject."""
    text = as_text(value)
    if text is None:
        raise Reject("missing label")
    problem = classname_problem(text)
    if problem:  # it would split into two lines of classnames.txt and shift every later class
        raise Reject(problem)
    if index is not None and text in index:
        return index[text], text
    if is_id(text):
        i = int(text)
        if classnames is not None and i >= len(classnames):
            raise Reject(f"label {i} out of range ({len(classnames)} class names)")
        return i, classnames[i] if classnames else None
    raise Reject(f"label {text[:60]!r} not among the class names")


def plan_labels(source: "SourceOptions", first: list[Any], log: Callable[[str], None]) -> tuple[str, ...] | None:
    """When a job's plan is written: the class names in id order (None: ids only, or no --label-col), and a
    warning for kept label-like columns of names that --label-col would turn into {key}.cls."""
    for col, example in name_columns_without_mapping((r.extra for r in first), source.extra_cols).items():
        if col != source.label_col:
            log(f"warning: column {col!r} holds class names (e.g. {example!r}) that only reach {{key}}.json; "
                f"pass --label-col {col} to write {{key}}.cls and classnames.txt")
    if not source.label_col:
        return None
    from data_prep.input.sources import read_rows
    given = read_classnames(source.classnames) if source.classnames else None
    names = plan_classnames((row.label for row in read_rows(source)), given)
    return tuple(names) if names else None


def name_columns_without_mapping(extras: Iterable[dict[str, Any]], extra_cols: tuple[str, ...]) -> dict[str, str]:
    """{column: an example value} for kept columns named like a label whose values are names, not ids: such a
    column reaches only `{key}.json`, and the mistake would show only at evaluation time."""
    found: dict[str, str] = {}
    for extra in extras:
        for col in extra_cols:
            text = as_text(extra.get(col))
            if col.lower() in LABEL_LIKE and col not in found and text is not None and not is_id(text):
                found[col] = text
    return found
