"""Pure planning: input rows -> shards -> tasks. No I/O, so every rule is testable at any simulated scale.

Shard S holds input rows [S * samples_per_shard, (S + 1) * samples_per_shard); task T of N owns the shards with
S % N == T. Both rules depend only on the row index, so the output is the same for any number of tasks or
processes, and any task can stream the input and pick its own rows without coordination.

Shards sized by bytes keep these rules: a pilot over the first input rows (`run.resolve_sizing`) turns the byte
target into a row count once (`rows_for_bytes`), `_plan.json` records it, and every task and resume reads it
from there instead of measuring again.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping, TypeVar

R = TypeVar("R")


def shard_of_row(index: int, samples_per_shard: int) -> int:
    return index // samples_per_shard


def rows_for_bytes(shard_bytes: int, mean_row_bytes: float, fixed_bytes: int, max_rows: int | None) -> int:
    """Rows per shard for a byte target: a shard of n rows is about fixed_bytes + n * mean_row_bytes (the tar's
    end-of-archive padding plus each row's members with their headers, rejects counting 0). At least 1 row, at
    most max_rows (--samples-per-shard, None = no limit). A pilot that kept nothing (mean 0) says nothing about
    sizes: then max_rows, or one shard per 10,000 rows without a limit."""
    if mean_row_bytes <= 0:
        return max_rows or 10_000
    rows = max(1, math.floor((shard_bytes - fixed_bytes) / mean_row_bytes))
    return rows if max_rows is None else min(rows, max_rows)


def task_of_shard(shard_id: int, num_tasks: int) -> int:
    return shard_id % num_tasks


def num_shards(num_rows: int, samples_per_shard: int) -> int:
    return math.ceil(num_rows / samples_per_shard)


def shards_of_task(total_shards: int, task_index: int, num_tasks: int) -> list[int]:
    return list(range(task_index, total_shards, num_tasks))


def sample_key(index: int) -> str:
    """Keys sort like input positions; 9 digits cover a billion rows, wider indices keep sorting by length."""
    return f"{index:09d}"


def resolve_task(task_index: int | None, num_tasks: int | None, env: Mapping[str, str]) -> tuple[int, int]:
    """(task index, task count) from the flags, else from a SLURM job array, else a single local task."""
    if task_index is None and num_tasks is None and "SLURM_ARRAY_TASK_ID" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - first
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", "0")) or None
        if num_tasks is None:
            raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --num-tasks")
    if (task_index is None) != (num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together")
    if task_index is None:
        return 0, 1
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index}: must be in [0, --num-tasks={num_tasks})")
    return task_index, num_tasks


def task_row_ranges(start: int, stop: int, samples_per_shard: int, task_index: int,
                    num_tasks: int) -> list[tuple[int, int]]:
    """The parts of input rows [start, stop) that belong to this task's shards, as [a, b) ranges in order.

    A reader that knows where its rows lie before decoding them (parquet, by its row groups' metadata) reads only
    these, so a task's start-up and streaming cost follow its own share, not the whole input. Jumps from one of
    the task's shards to the next: O(ranges returned), whatever the number of tasks."""
    out = []
    shard = start // samples_per_shard
    shard += (task_index - shard) % num_tasks  # the task's first shard at or after `start`
    while shard * samples_per_shard < stop:
        out.append((max(start, shard * samples_per_shard), min(stop, (shard + 1) * samples_per_shard)))
        shard += num_tasks
    return out


def work_units(rows: Iterable[R], samples_per_shard: int, task_index: int = 0, num_tasks: int = 1,
               index_of=lambda r: r.index) -> Iterator[tuple[int, list[R]]]:
    """Groups a stream of rows (in index order) into (shard id, rows) of this task; other tasks' rows are
    dropped as they stream by, so memory holds one shard's rows at a time."""
    current, buf = None, []
    for row in rows:
        shard = shard_of_row(index_of(row), samples_per_shard)
        if shard != current:
            if buf:
                yield current, buf
            current, buf = shard, []
        if task_of_shard(shard, num_tasks) == task_index:
            buf.append(row)
    if buf:
        yield current, buf
