"""Build work units (shard id, rows) into shards: in this process, or in worker processes that each stream the
rows of their units through one fetch pool.

Over the web a row's fetch can take seconds (a retry after `Retry-After: 1`, a slow body) while decoding it takes
milliseconds. Fetching a shard's rows in input order and then waiting for its slowest one left the CPU idle at
every retry and at the end of every shard. Here each process keeps up to `window` rows fetching ahead, across
shard boundaries (a worker holds its next unit before finishing the current one), processes rows as their
fetches complete, and writes a shard once all its rows are done. The shards are identical to an in-order run:
`ShardBuild` writes samples in row order and settles duplicates by row index.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
import queue
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator

from data_prep.job import lifeline
from data_prep.fetch.fetcher import Fetcher, is_remote
from data_prep.options import JobOptions
from data_prep.input.sources import Row
from data_prep.job.worker import ShardBuild, init_worker

Unit = tuple[int, list[Row]]
NOT_YET = object()
"""`next_unit(block=False)` when no unit is waiting yet (a worker's queue is momentarily empty)."""
UNITS_PER_WORKER = 2
"""Units queued per worker process: the one it builds and the next, whose rows it starts fetching early."""


def fetch_window(opts: JobOptions) -> int:
    """Rows a process keeps fetched or fetching ahead of its processing: enough to cover a Retry-After of a
    second or so at the rate one core processes images (~50-100 rows/s), at least 4 per download thread."""
    return max(128, 4 * opts.fetch.threads)


def stream_shards(opts: JobOptions, next_unit: Callable[[bool], Unit | None | object]) -> Iterator[dict[str, Any]]:
    """Builds the units `next_unit(block)` hands out (None: no more) and yields each shard's stats once written.

    `next_unit` is called with block=False while there is other work, so a worker never sits on an empty queue
    with fetched rows waiting; local files and inline media are read in this thread, in row order."""
    window = fetch_window(opts)
    fetcher = Fetcher(opts.fetch)
    builds: dict[int, ShardBuild] = {}
    left: dict[int, int] = {}  # shard -> rows not yet added
    backlog: collections.deque = collections.deque()  # (shard, row, url) not yet handed to the fetch pool
    pending: dict[Future, tuple[int, Row]] = {}
    exhausted = False

    def add(shard_id: int, row: Row, data) -> None:
        builds[shard_id].add(row, data)
        left[shard_id] -= 1

    with ThreadPoolExecutor(opts.fetch.threads, thread_name_prefix="plait-fetch") as pool:
        while True:
            # the next unit once every admitted row is fetching or done: fetches run ahead across the shard
            # boundary, while a unit of local files is read and built before more input is taken
            while not exhausted and not backlog and len(pending) < window:
                unit = next_unit(not backlog and not pending and not any(n == 0 for n in left.values()))
                if unit is NOT_YET:
                    break
                if unit is None:
                    exhausted = True
                    break
                shard_id, rows = unit  # type: ignore[misc]
                build = builds[shard_id] = ShardBuild(opts, shard_id, rows)
                left[shard_id] = len(build.to_fetch)
                backlog.extend((shard_id, row, url) for row, url in build.to_fetch)
            while backlog and len(pending) < window:
                shard_id, row, url = backlog.popleft()
                if is_remote(url):
                    pending[pool.submit(fetcher.fetch_or_reject, url)] = (shard_id, row)
                else:  # local files and inline media, in row order; local videos are read by seeking
                    add(shard_id, row, builds[shard_id].read_local(fetcher, url))
            if pending and not any(n == 0 for n in left.values()):
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    add(*pending.pop(fut), fut.result())
            for shard_id in [s for s, n in left.items() if n == 0]:
                del left[shard_id]
                yield builds.pop(shard_id).finish()
            if exhausted and not pending and not backlog and not builds:
                return


def build_in_process(opts: JobOptions, units: Iterator[Unit]) -> Iterator[dict[str, Any]]:
    return stream_shards(opts, lambda block: next(units, None))


def build_in_workers(opts: JobOptions, units: Iterator[Unit], processes: int,
                     on_progress: Callable[[int], None]) -> Iterator[dict[str, Any]]:
    """Yields each shard's stats as worker processes finish them; a worker that fails or dies fails the job."""
    # forkserver: no fork of a parent holding pyarrow/tqdm threads, yet workers start as forks of a server that
    # imported the worker code once (spawn re-imported it in every worker: ~1 s each)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.job.pool", "data_prep.media.video"])
    counter = ctx.Value("q", 0)
    results = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(processes)]
    workers = [ctx.Process(target=_worker_main, args=(os.getpid(), i, opts, inboxes[i], results, counter),
                           daemon=True, name=f"plait-prep-{i}") for i in range(processes)]
    for w in workers:
        w.start()
    load = [0] * processes  # units handed to each worker and not finished
    failure: Exception | None = None
    try:
        try:
            for unit in units:
                while min(load) >= UNITS_PER_WORKER:
                    yield from _collect(results, workers, load, counter, on_progress)
                i = load.index(min(load))
                inboxes[i].put(unit)
                load[i] += 1
        except Exception as e:  # the input failed: finish the shards already handed out (resume skips them)
            failure = e
        for inbox in inboxes:
            inbox.put(None)
        while sum(load):
            yield from _collect(results, workers, load, counter, on_progress)
        if failure is not None:
            raise failure
        for w in workers:
            w.join(10)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        for q in (*inboxes, results):
            q.cancel_join_thread()
            q.close()


def _collect(results, workers, load, counter, on_progress) -> Iterator[dict[str, Any]]:
    try:
        kind, i, value = results.get(timeout=0.5)
    except queue.Empty:
        on_progress(counter.value)
        for i, w in enumerate(workers):
            if not w.is_alive() and load[i]:
                raise RuntimeError(f"prep worker {i} died (exit code {w.exitcode}) with {load[i]} unit(s) to build")
        return
    if kind == "error":
        raise RuntimeError(f"prep worker {i} failed:\n{value}")
    load[i] -= 1
    on_progress(counter.value)
    yield value


def _worker_main(main_pid: int, index: int, opts: JobOptions, inbox, results, counter) -> None:
    lifeline.tie_to(main_pid)  # a kill -9 of the job must not leave its workers fetching for nobody
    init_worker(counter)

    def next_unit(block: bool):
        try:
            return inbox.get(block=block)
        except queue.Empty:
            return NOT_YET

    try:
        for stats in stream_shards(opts, next_unit):
            results.put(("done", index, stats))
    except BaseException:  # the job fails with the worker's traceback rather than a silent hang
        results.put(("error", index, traceback.format_exc()))
