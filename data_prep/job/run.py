"""Run a sharding job locally (worker processes, each owning whole shards) or as one task of a job array.

The main process streams the input once, cuts it into this task's work units (`plan.work_units`), skips shards
that already have a stats file (resume), and keeps at most 2 units per process in flight so memory stays flat.
A local run (one task) merges at the end; array tasks leave a marker and `plait prep merge` runs once after.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any, Callable, Iterator

from data_prep.shards import manifest
from data_prep.shards import layout
from data_prep.maintenance import merge as merge_mod
from data_prep.input.access import input_fingerprint
from data_prep.input.labels import plan_labels
from data_prep.options import JobOptions
from pipeline.options import flag_of, format_size
from data_prep.job.plan import num_shards, rows_for_bytes, task_row_ranges, work_units
from data_prep.job.pool import build_in_process, build_in_workers
from data_prep.input.sources import Row, count_rows, read_rows
from data_prep.job.worker import build_shard
from data_prep.shards.writer import END_OF_ARCHIVE as TAR_END_BYTES  # fixed bytes of every shard
from data_prep.shards.writer import OutputDir, shard_name


PILOT_ROWS = 64
"""Rows the --shard-bytes pilot builds (16 for video, whose decoding costs far more per row)."""
_PILOT_ROWS_VIDEO = 16
_PLAN = layout.PLAN_FILE


def ensure_plan(out: OutputDir, opts: JobOptions, first_rows: Callable[[int], list[Row]],
                log: Callable[[str], None] = print) -> JobOptions:
    """Writes `_plan.json`, or checks that a resumed job (or another array task) uses the same settings.

    Returns `opts` with the plan's sizing: with --shard-bytes, the rows per shard come from `_plan.json` when it
    exists (never measured again), else from a pilot over `first_rows(k)`, recorded by whichever task writes
    `_plan.json` first; a task that loses that race adopts the winner's value."""
    if opts.input_fingerprint is None:
        opts = dataclasses.replace(opts, input_fingerprint=input_fingerprint(opts.source.input))
    if out.exists(_PLAN):
        return _adopt(out, out.read_json(_PLAN), opts, log)
    head = first_rows(_PILOT_ROWS_VIDEO if opts.video.video else PILOT_ROWS)
    if opts.shard_bytes is not None:
        opts = dataclasses.replace(opts, sizing=resolve_sizing(opts, head))
    opts = dataclasses.replace(opts, class_names=plan_labels(opts.source, head, log))
    have = _write_once(out, _PLAN, json.loads(json.dumps(opts.to_dict())))
    return _adopt(out, have, opts, log)


def _adopt(out: OutputDir, have: dict[str, Any], opts: JobOptions, log: Callable[[str], None]) -> JobOptions:
    _check_same_settings(have, opts)
    if have.get("class_names"):
        opts = dataclasses.replace(opts, class_names=tuple(have["class_names"]))
        if not out.exists(layout.CLASSNAMES_FILE):  # beside the shards, where eval and finetune look for it
            out.write_bytes(layout.CLASSNAMES_FILE, layout.format_classnames(opts.class_names))
    if opts.shard_bytes is None:
        return opts
    if not have.get("sizing"):
        raise ValueError(f"{opts.output!r}: _plan.json has --shard-bytes but no sizing; use a new output folder")
    opts = dataclasses.replace(opts, sizing=have["sizing"])
    log(format_sizing(opts))
    return opts


def _check_same_settings(have: dict[str, Any], opts: JobOptions) -> None:
    wanted = json.loads(json.dumps(opts.to_dict()))
    old_print = have.get("input_fingerprint")
    if old_print is not None and wanted["source"]["input"] == have["source"]["input"] and \
            old_print != wanted["input_fingerprint"]:
        raise ValueError(f"--input {opts.source.input!r} changed since {opts.output!r} was started (was "
                         f"{_brief(old_print)}, now {_brief(wanted['input_fingerprint'])}): shards cut from two "
                         "versions of an input do not form one dataset; use a new output folder")
    # through JobOptions once: plans from before a field was renamed compare by today's names
    have = json.loads(json.dumps(JobOptions.from_dict(have).to_dict()))
    diffs = []
    for section, values in wanted.items():
        if section in _DERIVED:
            continue
        if not isinstance(values, dict):
            if have.get(section) != values:
                diffs.append((section, have.get(section), values))
            continue
        for k, v in values.items():
            old = (have.get(section) or {}).get(k)
            if old != v and k not in _RUNTIME:
                diffs.append((k, old, v))
    if diffs:
        raise ValueError(f"{opts.output!r} was started with {', '.join(f'{flag_of(k)}={o!r}' for k, o, _ in diffs)}"
                         f", now {', '.join(f'{flag_of(k)}={v!r}' for k, _, v in diffs)}: use a new output folder or "
                         "the same settings")


def _brief(fingerprint: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in fingerprint.items())


# settings that change how fast a job runs, not what it writes: a resume may change them. Not --input: a resume
# or an array task reading another table would mix two inputs in one dataset (the path is absolute by then)
_RUNTIME = {"threads", "max_per_host", "timeout_s", "retries", "backoff_s", "max_retry_after_s"}
# not settings: where the job writes (may be spelled differently), what the pilot derived from the settings, and
# the input's fingerprint (checked above with its own message)
_DERIVED = {"output", "sizing", "input_fingerprint", "class_names"}


def _write_once(out: OutputDir, name: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Writes `name` unless it exists and returns what it holds afterwards: the first writer wins.

    Local folders: the complete file is hard-linked into place, which fails if the name exists (a rename would
    silently replace a concurrent task's plan). Object stores have no such primitive through fsspec: a
    check before the upload leaves a window of one upload, and the pilot is deterministic for a given input
    (transient failures excluded), so tasks racing there write the same value."""
    if not out.local:
        if not out.exists(name):
            out.write_json(name, obj)
        return out.read_json(name)
    candidate = f"{name}.candidate-{uuid.uuid4().hex}"
    out.write_json(candidate, obj)
    try:
        os.link(out.path(candidate), out.path(name))
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: a rename after a check, like object stores
        if not out.exists(name):
            os.replace(out.path(candidate), out.path(name))
    finally:
        out.remove(candidate)
    return out.read_json(name)


def resolve_sizing(opts: JobOptions, rows: list[Row]) -> dict[str, Any]:
    """Rows per shard for --shard-bytes, from a pilot: `rows` (the first input rows) go through the real worker
    into a throwaway shard in a temporary folder, so every byte the job would write is counted (resized and
    encoded media, txt/json/cls members, 512-byte headers and padding; rejects add 0). Transient failures
    (timeouts, 5xx) are left out of the mean: they depend on the moment, and the plan must not."""
    assert opts.shard_bytes is not None
    with tempfile.TemporaryDirectory(prefix="plait-pilot-") as tmp:
        stats = build_shard(dataclasses.replace(opts, output=tmp), 0, rows)
        transient = manifest.read_records(OutputDir(tmp), layout.records_name(0), ["transient"])
        num_transient = sum(bool(t) for t in transient.column("transient").to_pylist())
    counted = len(rows) - num_transient
    mean = (stats["bytes"] - TAR_END_BYTES) / counted if counted else 0.0
    per = rows_for_bytes(opts.shard_bytes, mean, TAR_END_BYTES, opts.samples_per_shard)
    return {"samples_per_shard": per, "pilot_rows": len(rows), "pilot_transient": num_transient,
            "pilot_ok": stats["num_ok"], "mean_row_bytes": round(mean, 1),
            "estimated_shard_bytes": round(TAR_END_BYTES + per * mean)}


def format_sizing(opts: JobOptions) -> str:
    sz = opts.sizing or {}
    cap = "" if opts.samples_per_shard is None else f", at most {opts.samples_per_shard}"
    return (f"shard size: target {format_size(opts.shard_bytes)} -> {sz['samples_per_shard']} rows per shard"
            f"{cap} (pilot of {sz['pilot_rows']} rows, {sz['pilot_ok']} ok: {format_size(sz['mean_row_bytes'])} "
            f"per row; estimated {format_size(sz['estimated_shard_bytes'])} per shard)")


def run_task(opts: JobOptions, processes: int = 1, task_index: int = 0, num_tasks: int = 1,
             progress: bool = True, log: Callable[[str], None] = print,
             rows: Iterator[Row] | None = None, marker: str | None = None) -> dict[str, Any]:
    """Builds this task's unfinished shards; returns {'shards': [...stats], 'num_input_rows': n}."""
    out = OutputDir(opts.output)
    # an input whose row count its metadata gives (parquet) is read by ranges: only this task's rows
    known_rows = count_rows(opts.source) if rows is None else None
    source = iter(rows if rows is not None else () if known_rows is not None else read_rows(opts.source))
    head: list[Row] = []  # rows a pilot looked at, put back in front of the stream

    def first_rows(k: int) -> list[Row]:
        if known_rows is not None:  # the pilot reads the input's first rows, whichever task runs it
            return list(itertools.islice(read_rows(opts.source), k))
        head.extend(itertools.islice(source, k))
        return head

    opts = ensure_plan(out, opts, first_rows, log)
    done = {int(n[: -len(layout.STATS_SUFFIX)]) for n in out.glob("*" + layout.STATS_SUFFIX)}
    per = opts.rows_per_shard
    if known_rows is not None:
        source = read_rows(opts.source, lambda a, b: task_row_ranges(a, b, per, task_index, num_tasks))
    counter = {"rows": 0, "end": 0}

    def counted(stream: Iterator[Row]) -> Iterator[Row]:
        for row in stream:
            counter["rows"] += 1
            counter["end"] = max(counter["end"], row.index + 1)
            yield row

    stream = counted(itertools.chain(head, source))
    units = ((s, r) for s, r in work_units(stream, per, task_index, num_tasks) if s not in done)
    started = time.monotonic()
    finished = build_units(opts, units, processes, progress)
    if known_rows is not None:
        counter["rows"] = known_rows
    # rows handed in by a caller may skip indices (a subset of a table): shards go by index, so the last index,
    # not the count, says how many shards the merge must find
    total_shards = num_shards(max(counter["rows"], counter["end"]), per)
    marker = marker or f"_tasks/task-{task_index:05d}-of-{num_tasks:05d}.json"
    out.write_json(marker, {"task_index": task_index, "num_tasks": num_tasks, "num_input_rows": counter["rows"],
                            "num_shards": total_shards, "seconds": round(time.monotonic() - started, 3)})
    built = sorted(st["shard"] for st in finished)
    log(f"task {task_index}/{num_tasks}: built {len(built)} shard(s), {len(done)} already done, "
        f"{sum(st['num_samples'] for st in finished)} samples in {time.monotonic() - started:.1f}s")
    if not done and 0 < len(built) < processes:  # a process works on whole shards: the others had nothing to do
        log(f"note: {len(built)} shard(s) for {processes} processes, so {processes - len(built)} sat idle; "
            f"--samples-per-shard {math.ceil(counter['rows'] / num_tasks / (2 * processes))} or less would keep "
            f"them all busy")
    return {"shards": finished, "num_input_rows": counter["rows"], "num_shards": total_shards}


def build_units(opts: JobOptions, units: Iterator[tuple[int, list[Row]]], processes: int = 1,
                progress: bool = True) -> list[dict[str, Any]]:
    """Builds each (shard id, rows) unit into a shard, in worker processes when processes > 1 (`data_prep.job.pool`:
    each process fetches ahead across its shards and writes every shard as an in-order run would)."""
    started = time.monotonic()
    bar = _progress_bar(progress)
    finished: list[dict[str, Any]] = []
    if processes <= 1:
        stream = build_in_process(opts, units)
    else:
        stream = build_in_workers(opts, units, processes, lambda rows_done: _update(bar, finished, started, rows_done))
    for stats in stream:
        finished.append(stats)
        _update(bar, finished, started)
    if bar is not None:
        bar.close()
    return finished


def run_local(opts: JobOptions, processes: int = 1, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything for a single machine: all shards, then merge, then a summary."""
    run_task(opts, processes, 0, 1, progress, log)
    summary = merge_mod.merge(opts.output, progress=progress)
    log(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any], top: int = 8) -> str:
    n = summary["num_input_rows"]
    rate = summary["num_ok"] / n if n else 0.0
    lines = [f"{summary['num_samples']} samples in {summary['num_shards']} shard(s) from {n} input rows "
             f"({summary['num_ok']} ok = {rate:.1%}, {summary['num_rejected']} rejected)"]
    sizes = [s["bytes"] for s in summary["shards"]]
    if sizes:
        full = sizes[:-1] or sizes  # the last shard holds the remainder of the input
        line = (f"shard bytes: mean {format_size(sum(full) / len(full))}"
                f"{' (all but the last)' if len(sizes) > 1 else ''}, max {format_size(max(sizes))}")
        plan = summary.get("plan") or {}
        if plan.get("shard_bytes"):
            line += (f"; target {format_size(plan['shard_bytes'])}, {plan['samples_per_shard']} rows per shard "
                     f"(estimated {format_size(plan['sizing']['estimated_shard_bytes'])})")
        lines.append(line)
    for reason, count in Counter(summary["reasons"]).most_common(top):
        lines.append(f"  {count:>8}  {reason}")
    return "\n".join(lines)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(unit=" rows", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _update(bar, finished, started, rows_done: int | None = None) -> None:
    if bar is None:
        return
    rows = sum(st["num_input_rows"] for st in finished) if rows_done is None else rows_done
    ok = sum(st["num_ok"] for st in finished)
    seen = sum(st["num_input_rows"] for st in finished)
    bar.n = rows
    bar.set_postfix_str(f"shards {len(finished)}, ok {ok / seen:.1%}" if seen else f"shards {len(finished)}")
    bar.refresh()
    del started


__all__ = ["run_task", "run_local", "ensure_plan", "format_summary", "shard_name"]
