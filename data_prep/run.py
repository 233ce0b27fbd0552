"""Run a sharding job locally (worker processes, each owning whole shards) or as one task of a job array.

The main process streams the input once, cuts it into this task's work units (`plan.work_units`), skips shards
that already have a stats file (resume), and keeps at most 2 units per process in flight so memory stays flat.
A local run (one task) merges at the end; array tasks leave a marker and `plait prep merge` runs once after.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator

from data_prep import merge as merge_mod
from data_prep.options import JobOptions
from data_prep.plan import num_shards, work_units
from data_prep.sources import Row, read_rows
from data_prep.worker import build_shard, init_worker
from data_prep.writer import OutputDir, shard_name


def ensure_plan(out: OutputDir, opts: JobOptions) -> None:
    """Writes `_plan.json`, or checks that a resumed job uses the same settings."""
    wanted = json.loads(json.dumps(opts.to_dict()))
    if not out.exists("_plan.json"):
        out.write_json("_plan.json", wanted)
        return
    have = out.read_json("_plan.json")
    for section, values in wanted.items():
        if not isinstance(values, dict):
            if section != "output" and have.get(section) != values:
                raise ValueError(f"{opts.output!r} was started with {section}={have.get(section)!r}, now "
                                 f"{values!r}: use a new output folder or the same settings")
            continue
        for k, v in values.items():
            old = (have.get(section) or {}).get(k)
            if old != v and k not in _RUNTIME:
                raise ValueError(f"{opts.output!r} was started with {section}.{k}={old!r}, now {v!r}: "
                                 "use a new output folder or the same settings")


# settings that change how fast a job runs, not what it writes: a resume may change them
_RUNTIME = {"threads", "max_per_host", "timeout_s", "retries", "backoff_s", "max_retry_after_s", "input"}


def run_task(opts: JobOptions, processes: int = 1, task_index: int = 0, num_tasks: int = 1,
             progress: bool = True, log: Callable[[str], None] = print,
             rows: Iterator[Row] | None = None, marker: str | None = None) -> dict[str, Any]:
    """Builds this task's unfinished shards; returns {'shards': [...stats], 'num_input_rows': n}."""
    out = OutputDir(opts.output)
    ensure_plan(out, opts)
    done = {int(n[:5]) for n in out.glob("*_stats.json")}
    counter = {"rows": 0}

    def counted(stream: Iterator[Row]) -> Iterator[Row]:
        for row in stream:
            counter["rows"] += 1
            yield row

    stream = counted(rows if rows is not None else read_rows(opts.source))
    units = ((s, r) for s, r in work_units(stream, opts.samples_per_shard, task_index, num_tasks) if s not in done)
    started = time.monotonic()
    finished = build_units(opts, units, processes, progress)
    total_shards = num_shards(counter["rows"], opts.samples_per_shard)
    marker = marker or f"_tasks/task-{task_index:05d}-of-{num_tasks:05d}.json"
    out.write_json(marker, {"task_index": task_index, "num_tasks": num_tasks, "num_input_rows": counter["rows"],
                            "num_shards": total_shards, "seconds": round(time.monotonic() - started, 3)})
    built = sorted(st["shard"] for st in finished)
    log(f"task {task_index}/{num_tasks}: built {len(built)} shard(s), {len(done)} already done, "
        f"{sum(st['num_samples'] for st in finished)} samples in {time.monotonic() - started:.1f}s")
    return {"shards": finished, "num_input_rows": counter["rows"], "num_shards": total_shards}


def build_units(opts: JobOptions, units: Iterator[tuple[int, list[Row]]], processes: int = 1,
                progress: bool = True) -> list[dict[str, Any]]:
    """Builds each (shard id, rows) unit into a shard, in worker processes when processes > 1."""
    started = time.monotonic()
    bar = _progress_bar(progress)
    finished: list[dict[str, Any]] = []
    if processes <= 1:
        for shard_id, unit in units:
            finished.append(build_shard(opts, shard_id, unit))
            _update(bar, finished, started)
    else:
        # forkserver: no fork of a parent holding pyarrow/tqdm threads, yet workers start as forks of a server
        # that imported the worker code once (spawn re-imported it in every worker: ~1 s each)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_prep.worker", "data_prep.video"])
        counter_value = ctx.Value("q", 0)
        with ProcessPoolExecutor(processes, mp_context=ctx, initializer=init_worker,
                                 initargs=(counter_value,)) as pool:
            pending: set = set()
            for shard_id, unit in units:
                pending.add(pool.submit(build_shard, opts, shard_id, unit))
                while len(pending) >= 2 * processes:
                    pending = _collect(pending, finished, bar, started, counter_value)
            while pending:
                pending = _collect(pending, finished, bar, started, counter_value)
    if bar is not None:
        bar.close()
    return finished


def run_local(opts: JobOptions, processes: int = 1, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything for a single machine: all shards, then merge, then a summary."""
    run_task(opts, processes, 0, 1, progress, log)
    summary = merge_mod.merge(opts.output)
    log(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any], top: int = 8) -> str:
    n = summary["num_input_rows"]
    rate = summary["num_ok"] / n if n else 0.0
    lines = [f"{summary['num_samples']} samples in {summary['num_shards']} shard(s) from {n} input rows "
             f"({summary['num_ok']} ok = {rate:.1%}, {summary['num_rejected']} rejected)"]
    for reason, count in Counter(summary["reasons"]).most_common(top):
        lines.append(f"  {count:>8}  {reason}")
    return "\n".join(lines)


def _collect(pending, finished, bar, started, counter_value):
    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
    for fut in done:
        finished.append(fut.result())
    _update(bar, finished, started, counter_value.value)
    return pending


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
