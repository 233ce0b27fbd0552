"""What grows with the job: prep planning, the loader's sample assignment and the manifest merge, simulated.

No media is fetched or decoded: the measurements are of the bookkeeping that every task or rank repeats, at
sizes this 2-core machine cannot run for real. Each figure comes from a fresh child process (time and peak
RSS above the child's start-up), at growing job sizes with a FIXED per-task share, so a line that stays flat
means "does not grow with the whole job"; the last column extrapolates to LAION-5B (5.85B rows).

1. Prep: a parquet table of N rows (row groups of 100k, written once into --work), cut into shards of 10k rows
   over N / 100k array tasks (at N = 100M: 10,000 shards, 1,000 tasks). "plan" = what every task computes
   before work (row count from the parquet footer, shard count, its shard list); "task" = one task's
   start-up (first work unit ready) and its whole stream of rows grouped into work units, reading only the row
   groups that hold its rows; "whole-input stream" = what each task paid before it read by ranges (every row of
   the table decoded and dropped), measured for 20 s and extrapolated.
2. Loader: `sizes.json` of S shards (9k-11k samples each) on 1,024 ranks x 16 workers (128 nodes x 8):
   parsing the spec, one rank's plan (its 16 workers' pieces, exact mode), its size, and the resume state.
3. Merge: the dataset manifests and the cross-shard dedup over S finished shards (100 records each).
4. Merge dedup at scale: the cross-shard exact dedup over N synthetic records (1M, 10M, 100M; 10k per shard,
   random sha256s, 1,000 copies planted in the last 10 shards), its process's peak RSS against a fixed cap
   (--dedup-cap-mb, 1 GB), beside the same code holding every sample in one in-memory run and the merge's
   previous in-memory dedup (run up to --dedup-peer-max records, or until they pass the cap).

    .venv/bin/python benchmarks/bench_scale.py [--work DIR] [--max-rows 100000000] [--smoke]
        [--parts prep,loader,merge,dedup] [--dedup-records 100000000] [--dedup-cap-mb 1024]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS_PER_SHARD, ROWS_PER_TASK, ROW_GROUP = 10_000, 100_000, 100_000
RANKS_PER_NODE, WORKERS, BATCH = 8, 16, 256
LAION_5B_ROWS = 5_850_000_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PRELOAD = ("data_prep.input.sources", "pipeline.data.loader")


def _child(fn, args, queue, preload) -> None:
    # every child imports the same modules first, so that the peak counts the work, not the imports
    import importlib
    for name in preload:
        importlib.import_module(name)
    base = _rss_mb()
    started = time.perf_counter()
    result = fn(*args)
    result.setdefault("seconds", time.perf_counter() - started)
    result["peak_mb"] = max(0.0, _rss_mb() - base)
    result["total_peak_mb"] = _rss_mb()  # the whole process: interpreter and imports included
    queue.put(result)


def in_child(fn, *args, preload: tuple[str, ...] = PRELOAD) -> dict:
    """fn(*args) -> dict, in a fresh spawned process: its own peak RSS, nothing cached from earlier runs."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue, preload))
    proc.start()
    while True:  # a child that died (an exception, the OOM killer) must not leave this waiting forever
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty
            if not proc.is_alive() and queue.empty():
                raise RuntimeError(f"{fn.__name__}{args}: the child process failed (exit code {proc.exitcode})")
    proc.join()
    return result


# ---------------------------------------------------------------------------------------------------- 1. prep
def write_table(path: Path, rows: int) -> None:
    """url + caption columns, 1M rows at a time, in row groups of ROW_GROUP rows (vectorised: ~4 s per 10M)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    tmp = path.with_suffix(".partial")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, 1_000_000):
            index = pa.array(np.arange(start, min(rows, start + 1_000_000))).cast(pa.string())
            url = pc.binary_join_element_wise("https://img.example.org/", index, ".jpg", "")
            caption = pc.binary_join_element_wise("a photo, number ", index, "")
            writer.write_table(pa.table([url, caption], schema=schema), row_group_size=ROW_GROUP)
    tmp.rename(path)


def plan_job(table: str, num_tasks: int) -> dict:
    from data_prep.options import SourceOptions
    from data_prep.job.plan import num_shards, shards_of_task
    from data_prep.input.sources import count_rows

    rows = count_rows(SourceOptions(input=table))
    shards = num_shards(rows, ROWS_PER_SHARD)
    mine = shards_of_task(shards, num_tasks // 2, num_tasks)
    return {"rows": rows, "shards": shards, "task_shards": len(mine)}


def task_stream(table: str, task: int, num_tasks: int) -> dict:
    """The rows `plait prep shard --task-index` hands its workers, grouped in work units, without building them."""
    from data_prep.options import SourceOptions
    from data_prep.job.plan import task_row_ranges, work_units
    from data_prep.input.sources import read_rows

    started = time.perf_counter()
    rows = read_rows(SourceOptions(input=table),
                     lambda a, b: task_row_ranges(a, b, ROWS_PER_SHARD, task, num_tasks))
    first = None
    units = num_rows = 0
    for _shard, unit in work_units(rows, ROWS_PER_SHARD, task, num_tasks):
        first = first if first is not None else time.perf_counter() - started
        units, num_rows = units + 1, num_rows + len(unit)
    return {"first_unit_s": first, "units": units, "rows": num_rows}


def whole_stream_rate(table: str, seconds: float) -> dict:
    """Rows/s of reading every row of the input (the pre-range path of every task), for `seconds`."""
    from data_prep.options import SourceOptions
    from data_prep.input.sources import read_rows

    started, n = time.perf_counter(), 0
    for n, _row in enumerate(read_rows(SourceOptions(input=table)), 1):
        if n % 10_000 == 0 and time.perf_counter() - started > seconds:
            break
    return {"rows_per_s": n / (time.perf_counter() - started)}


def bench_prep(work: Path, sizes: list[int], stream_s: float) -> list[dict]:
    out = []
    for rows in sizes:
        table = work / f"table-{rows}.parquet"
        if not table.exists():
            t = time.perf_counter()
            write_table(table, rows)
            print(f"  wrote {table.name} ({table.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
        tasks = max(1, rows // ROWS_PER_TASK)
        plan = in_child(plan_job, str(table), tasks)
        task = in_child(task_stream, str(table), tasks // 2, tasks)
        whole = in_child(whole_stream_rate, str(table), stream_s)
        assert task["rows"] == min(ROWS_PER_TASK, rows), task
        out.append({"rows": rows, "tasks": tasks, "shards": plan["shards"], "plan_s": plan["seconds"],
                    "plan_mb": plan["peak_mb"], "task_first_unit_s": task["first_unit_s"],
                    "task_stream_s": task["seconds"], "task_mb": task["peak_mb"],
                    "whole_stream_s": rows / whole["rows_per_s"]})
        print(f"  {json.dumps(out[-1])}", flush=True)
    return out


# -------------------------------------------------------------------------------------------------- 2. loader
def rank_plan(num_shards: int, rank: int, num_ranks: int) -> dict:
    import fsspec
    import numpy as np

    from pipeline.config import DataConfig
    from pipeline.data.loader import TrainStream
    from pipeline.train.distributed import World

    fs = fsspec.filesystem("memory")
    names = [f"{i:06d}.tar" for i in range(num_shards)]
    sizes = np.random.default_rng(0).integers(9_000, 11_001, num_shards)
    fs.pipe(f"/scale-{num_shards}/sizes.json", json.dumps(dict(zip(names, map(int, sizes)))).encode())
    spec = f"memory:///scale-{num_shards}/{{000000..{num_shards - 1:06d}}}.tar"
    started = time.perf_counter()
    world = World(rank=rank, world_size=num_ranks, num_nodes=num_ranks // RANKS_PER_NODE)
    stream = TrainStream(DataConfig(train_shards=spec, batch_size=BATCH, num_workers=WORKERS), world,
                         image_transform=lambda image: image, tokenize=lambda texts: texts)
    setup_s = time.perf_counter() - started
    started = time.perf_counter()
    pieces = [stream.slot_pieces(0, stream.topology.slot(rank, w)) for w in range(WORKERS)]
    plan_s = time.perf_counter() - started
    samples = sum(len(p) for ps in pieces for p in ps)
    assert samples == stream.batches_per_epoch * BATCH, (samples, stream.batches_per_epoch)
    return {"shards": num_shards, "setup_s": setup_s, "rank_plan_s": plan_s,
            "pieces": sum(map(len, pieces)), "plan_bytes": sum(len(ps) for ps in pieces) * 3 * 8,
            "rank_samples": samples, "resume_state_bytes": len(json.dumps(stream.state_dict()))}


def bench_loader(shard_counts: list[int], num_ranks: int) -> list[dict]:
    out = []
    for n in shard_counts:
        out.append(in_child(rank_plan, n, num_ranks - 1, num_ranks))
        print(f"  {json.dumps(out[-1])}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------- 3. merge
def fake_dataset(folder: str, num_shards: int, per_shard: int) -> None:
    """Finished shards' stats and records as prep writes them (no tars: merge reads only these)."""
    import hashlib

    from data_prep.shards import manifest
    from data_prep.shards.writer import OutputDir, shard_name

    out = OutputDir(folder)
    for s in range(num_shards):
        records = []
        for i in range(per_shard):
            row = s * per_shard + i
            rec = manifest.record(f"{row:09d}", row, s, f"https://img.example.org/{row}.jpg")
            rec.update(sha256=hashlib.sha256(str(row).encode()).hexdigest(), num_samples=1, bytes=10_000)
            records.append(rec)
        manifest.write_shard_records(out, f"{shard_name(s)}.parquet", records)
        out.write_json(f"{shard_name(s)}_stats.json", {"tar": f"{shard_name(s)}.tar", "num_samples": per_shard,
                                                         "bytes": per_shard * 10_000, "sha256": "0" * 64,
                                                         "num_input_rows": per_shard})


def merge_job(folder: str, num_shards: int) -> dict:
    from data_prep.shards import manifest
    from data_prep.maintenance.merge import dedup_across_shards
    from data_prep.shards.writer import OutputDir

    out = OutputDir(folder)
    dropped = dedup_across_shards(out, list(range(num_shards)))
    summary = manifest.write_dataset_manifests(out, range(num_shards))
    return {"duplicates": dropped, "samples": summary["num_samples"]}


def bench_merge(work: Path, shard_counts: list[int], per_shard: int) -> list[dict]:
    out = []
    for n in shard_counts:
        with tempfile.TemporaryDirectory(dir=work) as folder:
            t = time.perf_counter()
            fake_dataset(folder, n, per_shard)
            made = time.perf_counter() - t
            result = in_child(merge_job, folder, n)
        assert result["samples"] == n * per_shard and result["duplicates"] == 0, result
        out.append({"shards": n, "records": n * per_shard, "merge_s": result["seconds"], "merge_mb": result["peak_mb"],
                    "fixture_s": made})
        print(f"  {json.dumps(out[-1])}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- 4. merge dedup
DEDUP_SHARD_RECORDS = 10_000
DEDUP_DUP_SHARDS, DEDUP_PER_DUP_SHARD = 10, 100
BEFORE_COMMIT = "e3b4907^"  # the merge whose dedup sorted every sample's hash in memory


def _hex_sha256(rng, n: int):
    """n random 64-hex-digit strings as an arrow array, without a Python object per string."""
    import numpy as np
    import pyarrow as pa

    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    text = np.empty((n, 64), np.uint8)
    text[:, 0::2], text[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def dedup_dataset(folder: Path, num_records: int, seed: int = 0) -> int:
    """Finished shards of DEDUP_SHARD_RECORDS records each, as prep writes them (records parquet + stats), with
    random sha256s; the last DEDUP_DUP_SHARDS shards copy DEDUP_PER_DUP_SHARD hashes each from earlier shards
    and are written whole by the shard writer (tar with one tiny member per sample), since the dedup rewrites
    them. Records are zstd-compressed to spare the disk (the reader does not care). Returns the planted count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from data_prep.shards import layout, manifest
    from data_prep.shards.writer import OutputDir, Sample, write_shard

    out = OutputDir(str(folder))
    rng = np.random.default_rng(seed)
    num_shards = num_records // DEDUP_SHARD_RECORDS
    from tqdm import tqdm

    planted_from: list[str] = []  # sha256s of samples of the first shards, copied into the last ones
    for s in tqdm(range(num_shards), desc=f"  write {num_records:,} records", unit="shard", mininterval=5):
        first = s * DEDUP_SHARD_RECORDS
        rows = np.arange(first, first + DEDUP_SHARD_RECORDS, dtype=np.int64)
        sha = _hex_sha256(rng, DEDUP_SHARD_RECORDS)
        if s >= num_shards - DEDUP_DUP_SHARDS:
            sha_list = sha.to_pylist()
            picks = rng.choice(len(planted_from), DEDUP_PER_DUP_SHARD, replace=False)
            for i, j in enumerate(picks.tolist()):  # a copy every 100th row of the shard
                sha_list[i * (DEDUP_SHARD_RECORDS // DEDUP_PER_DUP_SHARD)] = planted_from[j]
            records = []
            for row, h in zip(rows.tolist(), sha_list):
                rec = manifest.record(f"{row:09d}", row, s, None)
                rec.update(sha256=h, num_samples=1, width=64, height=64, bytes=1)
                records.append(rec)
            write_shard(out, s, [Sample(r["key"], [("txt", b"x")]) for r in records], records,
                        DEDUP_SHARD_RECORDS)
            continue
        if s < 1_000:  # the copies' sources, spread over the first shards
            planted_from += [sha[int(p)].as_py() for p in rng.integers(0, DEDUP_SHARD_RECORDS, 20)]
        n = DEDUP_SHARD_RECORDS
        cols = {name: pa.nulls(n, f.type) for name, f in zip(manifest.RECORD_SCHEMA.names, manifest.RECORD_SCHEMA)}
        cols.update(key=pc.utf8_lpad(pa.array(rows).cast(pa.string()), 9, "0"), row=pa.array(rows),
                    shard=pa.array(np.full(n, s, np.int32)), status=pa.array(["ok"] * n),
                    transient=pa.array(np.zeros(n, bool)), sha256=sha,
                    width=pa.array(np.full(n, 256, np.int32)), height=pa.array(np.full(n, 256, np.int32)),
                    bytes=pa.array(np.full(n, 10_000, np.int64)), num_samples=pa.array(np.ones(n, np.int32)))
        pq.write_table(pa.table(cols, schema=manifest.RECORD_SCHEMA), folder / layout.records_name(s),
                       compression="zstd")
        out.write_json(layout.stats_name(s), {"format": layout.STATS_FORMAT, "shard": s, "tar": layout.tar_name(s),
                                              "num_input_rows": n, "num_samples": n, "num_ok": n,
                                              "num_rejected": 0, "reasons": {}, "bytes": n * 10_000,
                                              "sha256": "0" * 64})
    return DEDUP_DUP_SHARDS * DEDUP_PER_DUP_SHARD


def _has_git_history() -> bool:
    import subprocess
    return subprocess.run(["git", "cat-file", "-e", f"{BEFORE_COMMIT}:data_prep/maintenance/merge.py"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True).returncode == 0


def _restore_dup_shards(pristine: Path, folder: Path) -> None:
    """The dedup rewrites the shards holding copies: put them back as generated before the next run."""
    import shutil
    for p in pristine.iterdir():
        shutil.copyfile(p, folder / p.name)


def dedup_job(folder: str, num_shards: int, how: str, memory_bytes: int) -> dict:
    from data_prep.maintenance import merge
    from data_prep.shards.writer import OutputDir

    out = OutputDir(folder)
    if how == "before":  # the previous merge's in-memory dedup, loaded from git as it was
        import importlib.util
        import subprocess
        source = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:data_prep/maintenance/merge.py"],
                                cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True).stdout
        path = Path(folder) / "_merge_before.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("merge_before", path)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        path.unlink()
        return {"duplicates": before.dedup_across_shards(out, list(range(num_shards)))}
    return {"duplicates": merge.dedup_across_shards(out, list(range(num_shards)), memory_bytes)}


def bench_dedup(work: Path, sizes: list[int], cap_mb: float, memory_bytes: int, peer_max: int) -> list[dict]:
    """Per size: the partitioned dedup (the merge's, at its memory budget); the same code with a budget that
    holds every sample (one run, sorted in memory); the merge's previous in-memory dedup. The in-memory two run
    only up to `peer_max` records, or until one passes the cap."""
    import shutil

    out, over_cap = [], set()
    for num_records in sizes:
        folder = work / f"dedup-{num_records}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t = time.perf_counter()
        planted = dedup_dataset(folder, num_records)
        made = time.perf_counter() - t
        num_shards = num_records // DEDUP_SHARD_RECORDS
        pristine = folder / "_pristine"
        pristine.mkdir()
        for s in range(num_shards - DEDUP_DUP_SHARDS, num_shards):
            for p in folder.glob(f"{s:05d}*"):
                shutil.copyfile(p, pristine / p.name)
        disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        print(f"  {num_records:,} records in {num_shards:,} shards: {disk / 1e9:.2f} GB written in {made:.0f} s",
              flush=True)
        for how, budget in (("partitioned", memory_bytes), ("in-memory", 1 << 50), ("before", 0)):
            if how != "partitioned" and (num_records > peer_max or how in over_cap):
                continue
            if how == "before" and not _has_git_history():
                print(f"  (no git history here: the previous merge ({BEFORE_COMMIT}) is not measured)")
                continue
            _restore_dup_shards(pristine, folder)
            # only what the merge imports: the peak RSS is what `plait prep merge` would hold
            result = in_child(dedup_job, str(folder), num_shards, how, budget,
                              preload=("data_prep.maintenance.merge", "pyarrow.parquet"))
            assert result["duplicates"] == planted, (how, result, planted)
            row = {"records": num_records, "how": how, "seconds": result["seconds"],
                   "peak_mb": result["peak_mb"], "total_peak_mb": result["total_peak_mb"],
                   "duplicates": result["duplicates"], "records_gb": disk / 1e9, "fixture_s": made}
            if row["total_peak_mb"] > cap_mb:
                over_cap.add(how)
            out.append(row)
            print(f"  {json.dumps(row)}", flush=True)
        shutil.rmtree(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="", help="folder for the generated tables (kept; default: a temp dir)")
    parser.add_argument("--max-rows", type=int, default=100_000_000, help="largest prep table (rows)")
    parser.add_argument("--stream-s", type=float, default=20.0, help="seconds to time the whole-input stream")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--parts", default="prep,loader,merge,dedup", help="which measurements, comma-separated")
    parser.add_argument("--dedup-records", type=int, default=100_000_000,
                        help="largest record count of the merge dedup (sizes 1M, 10M, 100M up to this)")
    parser.add_argument("--dedup-cap-mb", type=float, default=1024.0,
                        help="the memory cap the merge dedup must stay under (peak RSS of its process, MB)")
    parser.add_argument("--dedup-memory-mb", type=int, default=0,
                        help="the dedup's memory budget (MB; default: the merge's DEDUP_MEMORY_BYTES)")
    parser.add_argument("--dedup-sizes", default="",
                        help="record counts of the merge dedup, comma-separated (default: 1M, 10M, 100M up to "
                             "--dedup-records)")
    parser.add_argument("--dedup-peer-max", type=int, default=10_000_000,
                        help="largest record count the in-memory dedups are run at")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="plait-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        rows, shards, ranks, merges, stream_s = [200_000], [2_000], 16, [50], 1.0
        dedups, args.dedup_peer_max = [200_000], 0  # the partitioned dedup only: its peers cost a minute here
    else:
        rows = [r for r in (1_000_000, 10_000_000, 100_000_000) if r <= args.max_rows]
        # exact mode needs a shard per slot: 1,024 ranks x 16 workers = 16,384 shards at least
        shards, ranks, merges, stream_s = [20_000, 100_000, 400_000], 1_024, [1_000, 10_000], args.stream_s
        dedups = [int(n) for n in args.dedup_sizes.split(",")] if args.dedup_sizes else [
            n for n in (1_000_000, 10_000_000, 100_000_000) if n <= args.dedup_records]
        if any(n < 20 * DEDUP_SHARD_RECORDS for n in dedups):
            parser.error(f"--dedup-sizes {args.dedup_sizes}: at least {20 * DEDUP_SHARD_RECORDS:,} records each")
    parts = set(args.parts.split(","))
    if not parts or parts - {"prep", "loader", "merge", "dedup"}:
        parser.error(f"--parts {args.parts!r}: expected a comma-separated subset of prep,loader,merge,dedup")

    print(f"1. prep planning: {ROWS_PER_SHARD} rows/shard, {ROWS_PER_TASK} rows per task, row groups of {ROW_GROUP}")
    prep = bench_prep(work, rows, stream_s) if "prep" in parts else []
    print(f"2. loader: {ranks} ranks x {WORKERS} workers, batch {BATCH}, exact mode, one rank's plan")
    loader = bench_loader(shards, ranks) if "loader" in parts else []
    print("3. merge: manifests + cross-shard dedup")
    merge = bench_merge(work, merges, 100) if "merge" in parts else []
    from data_prep.maintenance.merge import DEDUP_MEMORY_BYTES
    budget = args.dedup_memory_mb << 20 or DEDUP_MEMORY_BYTES
    print(f"4. merge dedup: {DEDUP_SHARD_RECORDS:,} records per shard, {DEDUP_DUP_SHARDS * DEDUP_PER_DUP_SHARD} "
          f"planted copies; budget {budget >> 20} MB, cap {args.dedup_cap_mb:.0f} MB")
    dedup = bench_dedup(work, dedups, args.dedup_cap_mb, budget, args.dedup_peer_max) if "dedup" in parts else []

    laion_tasks = LAION_5B_ROWS // ROWS_PER_TASK
    print("\n| what | job size | time | peak memory | LAION-5B (5.85B rows) |")
    print("|---|---|---|---|---|")
    for p in prep:
        print(f"| prep plan, every task | {p['rows']:,} rows, {p['shards']:,} shards, {p['tasks']:,} tasks | "
              f"{p['plan_s']:.2f} s | {p['plan_mb']:.0f} MB | same (footer read) |")
    for p in prep:
        print(f"| prep task: first unit / whole share | {p['rows']:,} rows | {p['task_first_unit_s']:.2f} s / "
              f"{p['task_stream_s']:.2f} s | {p['task_mb']:.0f} MB | flat: {laion_tasks:,} tasks of "
              f"{ROWS_PER_TASK:,} rows |")
    for p in prep:
        print(f"| before: whole-input stream per task | {p['rows']:,} rows | {p['whole_stream_s']:.0f} s "
              f"(extrapolated) | - | {p['whole_stream_s'] * LAION_5B_ROWS / p['rows'] / 3600:.0f} h per task |")
    for p in loader:
        print(f"| loader: one rank's plan ({WORKERS} workers) | {p['shards']:,} shards, {ranks:,} ranks | "
              f"setup {p['setup_s']:.2f} s + plan {p['rank_plan_s'] * 1e3:.1f} ms, {p['pieces']} pieces | "
              f"{p['peak_mb']:.0f} MB | resume state {p['resume_state_bytes']} B |")
    for m in merge:
        print(f"| merge (once per job) | {m['shards']:,} shards, {m['records']:,} records | {m['merge_s']:.1f} s | "
              f"{m['merge_mb']:.0f} MB | {m['merge_s'] / m['shards'] * 1e3:.1f} ms per shard: "
              f"{m['merge_s'] / m['shards'] * LAION_5B_ROWS / ROWS_PER_SHARD / 60:.0f} min for "
              f"{LAION_5B_ROWS // ROWS_PER_SHARD:,} shards (at {m['records'] // m['shards']} records each) |")
    if loader:  # one rank's plan is linear in the shard count (one permutation and cumsum of it)
        one = loader[-1]
        laion_ms = one["rank_plan_s"] * 1e3 * (LAION_5B_ROWS / ROWS_PER_SHARD) / one["shards"]
        print(f"LAION-5B at {ROWS_PER_SHARD:,} rows per shard: {LAION_5B_ROWS // ROWS_PER_SHARD:,} shards, one rank's "
              f"plan ~{laion_ms:.0f} ms per epoch")
    names = {"partitioned": f"partitioned ({budget >> 20} MB budget)", "in-memory": "same code, one in-memory run",
             "before": f"previous merge ({BEFORE_COMMIT}), in memory"}
    if dedup:
        print(f"\n| merge dedup | records | time | peak RSS (whole process) | under {args.dedup_cap_mb:.0f} MB |")
        print("|---|---|---|---|---|")
    for d in dedup:
        print(f"| {names[d['how']]} | {d['records']:,} | {d['seconds']:.1f} s | {d['total_peak_mb']:.0f} MB | "
              f"{'yes' if d['total_peak_mb'] <= args.dedup_cap_mb else 'no'} |")
    print(json.dumps({"prep": prep, "loader": loader, "merge": merge, "dedup": dedup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
