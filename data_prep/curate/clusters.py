"""Clustered near-duplicate search: k-means units, pairs within each unit, then the exact greedy over those pairs.

The input is a work folder holding `embeddings.npy`: the candidates' image embeddings [N, D] (float16 or float32)
in priority order, row 0 the best-scored. A row's number is its rank, so "better" means "smaller row".

Stages, each a pure function of the work folder, each writing its files atomically with a done marker last:
  prepare   k-means (`faiss.Kmeans`, spherical, seeded) trained on a seeded sample of the L2-normalised rows
            (`sample_per_cluster` x K rows): the plan and the centroids. The one step that is not split.
  assign p  for each row of part p (`part_rows` rows), its `probe` nearest centroids by inner product: the first
            is its home cluster, all `probe` of them its probe set P(i). A NaN, infinite or zero row is refused.
  unit c    with M(c) = {i : home(i) = c} (members) and V(c) = {i : c in P(i), home(i) != c} (visitors), both in
            rank order: every pair of M(c) x M(c) and V(c) x M(c) with cosine >= threshold, as (worse row, better
            row, cosine), to `units/c.pairs.npz`, then `units/c.done`. A task running units a..b reads the
            assignment once for their lists, and the embeddings of their members and visitors only.
  resolve   the union of the units' pairs, then the greedy of the exact search (`dedup.near_duplicates`):
            rows in rank order, a row is dropped when one of its pairs joins it to a better row that is kept;
            it is named the duplicate of the kept one of highest cosine (ties: the better-ranked one).
Parts and units are the work units of job arrays (`plait launch dedup`), or of a local pool of processes.

The boundary rule, exactly: rows i and j are compared iff home(j) is in P(i) or home(i) is in P(j). Unit home(j)
finds the pair in M x M (same home) or with i a visitor. A near-duplicate pair on the boundary of two clusters has
each cluster among the nearest two centroids of both rows, so `probe` >= 2 finds it; `probe` = 1 compares within
home clusters only. The verdicts equal the exact search's whenever every pair at or above the threshold is
compared, and differ only through pairs whose rows' probe sets miss each other's home (`bench_dedup.py` counts
them: the pair recall).

Determinism: the centroids are written once by `prepare` and only read afterwards, a part's assignment and a
unit's pairs depend on their own rows only, and `resolve` sorts the union before the greedy. So the verdicts do not
depend on how units are spread over processes or array tasks, and a killed unit reruns to the same pairs.

Memory: a unit holds its members' and visitors' embeddings (about `probe` x a cluster's rows, float32) and one
block of cosines [block, |M(c)|], its task the lists of its units (probe x their rows, int64); prepare holds the
training sample, an assignment part the centroids and one chunk of rows; resolve holds the pairs (only those at
or above the threshold) and one flag per row. Embeddings stay in `embeddings.npy`, read
through short-lived memory maps.

Cost: the assignment is O(N K D); the units are O(probe N^2 D / K) in total, so the default
K = sqrt(probe N) balances the two at O(sqrt(probe) N^1.5 D). A group of g copies of one image costs g^2 / 2
pairs: exact copies are removed at prep time (sha256), and near-duplicate groups are small.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.options import option

EMBEDDINGS = "embeddings.npy"
PLAN = "dedup_plan.json"
PREPARED = "prepared.done"
VERDICTS = "verdicts.npz"
FORMAT = "plait-semdedup/1"
_CHUNK = 65536  # rows per read in prepare and validation: 64 MiB of float16 at D = 512


@dataclass(frozen=True)
class ClusterOptions:
    """The clustered search's settings (the filter's --dedup-* flags map onto them)."""
    threshold: float = option(0.95, gt=0.0, le=1.0)
    """cosine at or above which two rows are near-duplicates"""
    num_clusters: int | None = option(None, ge=1)
    """k-means clusters K; default sqrt(probe x N), the K that balances assignment against pair search"""
    probe: int = option(3, ge=1)
    """the nearest centroids of a row it is compared in (home included); >= 2 finds pairs on a boundary"""
    sample_per_cluster: int = option(64, ge=1)
    """k-means trains on this many rows per cluster (a seeded sample; faiss wants at least 39)"""
    niter: int = option(10, ge=1)
    """k-means iterations"""
    seed: int = 0
    """seed of the training sample and of k-means"""
    block: int = option(2048, ge=1)
    """query rows per cosine block within a unit"""
    part_rows: int = option(1 << 20, ge=1)
    """rows per assignment part (the assignment's work unit: an array task assigns a range of parts)"""

    def __post_init__(self) -> None:
        from pipeline.options import validate
        validate(self)

    def clusters_for(self, n: int) -> int:
        k = self.num_clusters if self.num_clusters is not None else round(math.sqrt(self.probe * n))
        return max(1, min(k, n))


# ------------------------------------------------------------------------------------------------ files
def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _open_embeddings(work: Path) -> np.ndarray:
    path = work / EMBEDDINGS
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exn:
        raise ValueError(f"{path}: not a numpy array file of embeddings ({str(exn).splitlines()[0]})") from None
    if emb.ndim != 2 or not len(emb) or emb.dtype not in (np.float16, np.float32):
        raise ValueError(f"{path}: embeddings must be a non-empty [N, D] float16/float32 array, not "
                         f"{emb.dtype}{list(emb.shape)}")
    return emb


def _read(work: Path, index: np.ndarray | slice) -> np.ndarray:
    """Rows of embeddings.npy in their stored dtype, read with pread. Not through a memory map: the kernel maps
    the pages around every faulted row into the process, so a few thousand scattered rows put most of the file in
    its resident set (measured: 2,048 random rows of a 200 MB file mapped 182 MB)."""
    path = work / EMBEDDINGS
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if len(shape) != 2 or fortran:
            raise ValueError(f"{path}: embeddings must be a C-ordered [N, D] array, not {list(shape)}")
        (n, d), offset, fd = shape, f.tell(), f.fileno()
        row = d * dtype.itemsize
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            assert step == 1, "contiguous slices only"
            out = np.empty((max(0, stop - start), d), dtype)
            view, done = memoryview(out).cast("B"), 0
            while done < len(view):  # pread may return less than asked for
                got = os.preadv(fd, [view[done:]], offset + start * row + done)
                if not got:
                    raise ValueError(f"{path}: ends before row {start + done // row} (truncated)")
                done += got
            return out
        idx = np.asarray(index, np.int64)
        out = np.empty((len(idx), d), dtype)
        for i, r in enumerate(idx.tolist()):
            if os.preadv(fd, [out[i]], offset + r * row) != row:
                raise ValueError(f"{path}: ends before row {r} (truncated)")
        return out


def _rows(work: Path, index: np.ndarray | slice, normalise: bool = True) -> np.ndarray:
    """Rows of embeddings.npy as float32, L2-normalised (for k-means and the assignment) or as stored (for the
    pairs' cosines: the rows are L2-normalised embeddings, and the exact search takes their dot products as they
    are, so both searches give the same cosines)."""
    out = _read(work, index).astype(np.float32)
    if not normalise:
        return out
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def write_embeddings(work: str | Path, rows: Callable[[int, int], np.ndarray], n: int, dim: int,
                     chunk: int = _CHUNK) -> Path:
    """Writes `embeddings.npy` [n, dim] float16 in the work folder from `rows(start, stop)` chunk by chunk."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / (EMBEDDINGS + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, chunk):
        block = np.asarray(rows(start, min(n, start + chunk)))
        if block.ndim != 2 or block.shape[1] != dim:
            raise ValueError(f"embeddings of dimension {block.shape[-1] if block.ndim else '?'}, expected {dim}")
        out[start:start + len(block)] = block
        out.flush()
    del out
    os.replace(tmp, work / EMBEDDINGS)
    return work / EMBEDDINGS


# ------------------------------------------------------------------------------------------------ train
def prepare(work: str | Path, opts: ClusterOptions, dim: int | None = None, threads: int | None = None) -> dict:
    """Trains k-means on a seeded sample and writes the plan and centroids (the one step that is not split over
    tasks). A work folder already prepared with the same settings and input is reused; other settings are
    refused."""
    import faiss
    work = Path(work)
    emb = _open_embeddings(work)
    n, d = emb.shape
    del emb
    if dim is not None and d != dim:
        raise ValueError(f"{work / EMBEDDINGS}: embeddings of dimension {d}, expected {dim}")
    k = opts.clusters_for(n)
    plan = {"format": FORMAT, "num_rows": n, "dim": d, **asdict(opts), "num_clusters": k,
            "num_parts": -(-n // opts.part_rows)}
    if (work / PREPARED).exists():
        have = json.loads((work / PLAN).read_text())
        diffs = [key for key in plan if have.get(key) != plan[key]]
        if diffs:
            raise ValueError(f"{work}: prepared with other settings ({', '.join(diffs)}); use a new work folder")
        return have
    if threads:
        faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(opts.seed)
    train_idx = np.sort(rng.choice(n, size=min(n, opts.sample_per_cluster * k), replace=False))
    sample = _checked_rows(work, train_idx)
    km = faiss.Kmeans(d, k, niter=opts.niter, seed=opts.seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(opts.sample_per_cluster, 1))
    km.train(np.ascontiguousarray(sample))
    del sample
    _save_npy(work / "centroids.npy", np.ascontiguousarray(km.centroids, dtype=np.float32))  # [K, D]
    for folder in ("assign", "units"):
        (work / folder).mkdir(exist_ok=True)
    _write_text(work / PLAN, json.dumps(plan, indent=1))
    _write_text(work / PREPARED, "")
    return plan


def _checked_rows(work: Path, index: np.ndarray | slice) -> np.ndarray:
    """`_rows`, refusing a NaN, infinite or all-zero embedding (it has no direction), naming the first such row."""
    raw = _read(work, index).astype(np.float32)
    finite = np.isfinite(raw).all(axis=1)
    zero = finite & ~(np.abs(raw) > 0).any(axis=1)
    bad = np.flatnonzero(~finite | zero)
    if len(bad):
        rows = np.arange(len(_open_embeddings(work)))[index]
        what = "zero" if zero[bad[0]] else "non-finite (NaN or infinity)"
        raise ValueError(f"{work / EMBEDDINGS}: row {int(rows[bad[0]])} is a {what} embedding ({len(bad)} such "
                         f"rows among {len(raw)} read): it cannot be compared")
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def _plan(work: Path) -> dict:
    if not (work / PREPARED).exists():
        raise ValueError(f"{work}: not a prepared dedup work folder (no {PREPARED}); run prepare first")
    return json.loads((work / PLAN).read_text())


# ------------------------------------------------------------------------------------------------ assign
def part_done(work: str | Path, part: int) -> bool:
    return (Path(work) / "assign" / f"{part:07d}.done").exists()


def assign_part(work: str | Path, part: int) -> None:
    """Each row of part `part` (rows part x part_rows onwards): its `probe` nearest centroids, home first, checked
    rows only; the part file, then its done marker."""
    import faiss
    work = Path(work)
    plan = _plan(work)
    if not 0 <= part < plan["num_parts"]:
        raise ValueError(f"{work}: assignment part {part} is outside 0..{plan['num_parts'] - 1}")
    index = faiss.IndexFlatIP(plan["dim"])
    index.add(np.load(work / "centroids.npy", allow_pickle=False))
    start, stop = part * plan["part_rows"], min(plan["num_rows"], (part + 1) * plan["part_rows"])
    probe = min(plan["probe"], plan["num_clusters"])
    assign = np.empty((stop - start, probe), np.int32)  # [rows, probe]
    for s in range(start, stop, _CHUNK):
        e = min(stop, s + _CHUNK)
        _, nearest = index.search(np.ascontiguousarray(_checked_rows(work, slice(s, e))), probe)
        assign[s - start:e - start] = nearest
    _save_npy(work / "assign" / f"{part:07d}.npy", assign)
    _write_text(work / "assign" / f"{part:07d}.done", "")


def assignment(work: str | Path) -> np.ndarray:
    """The whole assignment [N, probe] (home first), for measurements and tests; units read it part by part."""
    work = Path(work)
    plan = _plan(work)
    return np.concatenate([np.load(work / "assign" / f"{p:07d}.npy", allow_pickle=False)
                           for p in range(plan["num_parts"])])


def unit_lists(work: Path, plan: dict, first: int, stop: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """unit -> (members, visitors), rows in rank order, for the units first..stop-1, from one pass over the
    assignment parts: a task holds the lists of its own units only."""
    missing = [p for p in range(plan["num_parts"]) if not part_done(work, p)]
    if missing:
        raise ValueError(f"{work}: {len(missing)} of {plan['num_parts']} assignment parts not done (first: "
                         f"{missing[0]}); run them (`python -m data_prep.curate.clusters assign {work}`)")
    found: dict[str, list] = {"m_unit": [], "m_row": [], "v_unit": [], "v_row": []}
    for p in range(plan["num_parts"]):
        a = np.load(work / "assign" / f"{p:07d}.npy", mmap_mode="r", allow_pickle=False)
        rows = p * plan["part_rows"] + np.arange(len(a), dtype=np.int64)
        home = np.asarray(a[:, 0])
        sel = (home >= first) & (home < stop)
        found["m_unit"].append(home[sel]), found["m_row"].append(rows[sel])
        for col in range(1, a.shape[1]):
            unit = np.asarray(a[:, col])
            sel = (unit >= first) & (unit < stop)
            found["v_unit"].append(unit[sel]), found["v_row"].append(rows[sel])
        del a
    lists: dict[int, list[np.ndarray]] = {u: [] for u in range(first, stop)}
    for kind in ("m", "v"):
        unit = np.concatenate(found[f"{kind}_unit"]) if found[f"{kind}_unit"] else np.zeros(0, np.int32)
        row = np.concatenate(found[f"{kind}_row"]) if found[f"{kind}_row"] else np.zeros(0, np.int64)
        order = np.lexsort((row, unit))
        unit, row = unit[order], row[order]
        bounds = np.searchsorted(unit, np.arange(first, stop + 1))
        for u in range(first, stop):
            lists[u].append(row[bounds[u - first]:bounds[u - first + 1]])
    return {u: (m, v) for u, (m, v) in lists.items()}


# ------------------------------------------------------------------------------------------------ units
def unit_done(work: str | Path, unit: int) -> bool:
    return (Path(work) / "units" / f"{unit:07d}.done").exists()


def run_unit(work: str | Path, unit: int, members: np.ndarray, visitors: np.ndarray) -> int:
    """Writes unit `unit`'s pairs at or above the threshold, then its done marker; returns the pair count."""
    work = Path(work)
    plan = _plan(work)
    threshold = float(plan["threshold"])
    # a large cluster gets shorter blocks: one block of cosines stays under 2^25 floats (128 MiB)
    block = max(1, min(int(plan["block"]), (1 << 25) // max(1, len(members))))
    worse, better, cosine = [], [], []
    if len(members):
        m = _rows(work, members, normalise=False)  # [m, D]
        for start in range(0, len(members), block):
            sims = m[start:start + block] @ m[:start + block].T  # [b, start + b]: members against better ones
            r, c = np.nonzero(sims >= threshold)
            keep = c < r + start  # the column is a better-ranked member (rank order within the unit)
            worse.append(members[r[keep] + start])
            better.append(members[c[keep]])
            cosine.append(sims[r[keep], c[keep]])
        for start in range(0, len(visitors), block):
            rows = visitors[start:start + block]
            sims = _rows(work, rows, normalise=False) @ m.T  # [b, m]
            r, c = np.nonzero(sims >= threshold)
            a, b = rows[r], members[c]
            worse.append(np.maximum(a, b))
            better.append(np.minimum(a, b))
            cosine.append(sims[r, c])
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    pairs = {"worse": cat(worse, np.int64), "better": cat(better, np.int64), "cosine": cat(cosine, np.float32)}
    _save_npz(work / "units" / f"{unit:07d}.pairs.npz", **pairs)
    _write_text(work / "units" / f"{unit:07d}.done", json.dumps({"pairs": len(pairs["worse"])}))
    return len(pairs["worse"])


def task_units(num_units: int, task_index: int, num_tasks: int) -> range:
    """The contiguous range of units (or assignment parts) of array task `task_index` of `num_tasks` (sizes
    differ by at most one)."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index}: must be in 0..{num_tasks - 1}")
    return range(task_index * num_units // num_tasks, (task_index + 1) * num_units // num_tasks)


def _limit_threads(threads: int | None) -> None:
    if threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
        import faiss
        faiss.omp_set_num_threads(threads)


def _assign_parts(work: str, parts: list[int], threads: int | None) -> int:
    _limit_threads(threads)
    for p in parts:
        if not part_done(work, p):
            assign_part(work, p)
    return len(parts)


def _run_unit_range(work: str, first: int, stop: int, threads: int | None) -> int:
    _limit_threads(threads)
    todo = [u for u in range(first, stop) if not unit_done(work, u)]
    if not todo:
        return 0
    lists = unit_lists(Path(work), _plan(Path(work)), todo[0], todo[-1] + 1)
    return sum(run_unit(work, u, *lists[u]) for u in todo)


def _pool(work: Path, fn, jobs: list[tuple], processes: int, bar) -> int:
    """fn(str(work), *job, threads) for every job, here or in `processes` spawned processes (faiss and BLAS
    threads do not survive a fork), one BLAS thread each in the pool; returns the sum of the results."""
    total = 0
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            total += fn(str(work), *job, None)
            if bar is not None:
                bar.update(1)
        return total
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for count in pool.map(fn, *zip(*[(str(work), *job, 1) for job in jobs])):
            total += count
            if bar is not None:
                bar.update(1)
    return total


def run_assign(work: str | Path, processes: int = 1, parts: range | None = None, progress: bool = False) -> None:
    """The assignment parts not done yet (all, or `parts`), in a pool of `processes`."""
    work = Path(work)
    plan = _plan(work)
    todo = [p for p in (parts if parts is not None else range(plan["num_parts"])) if not part_done(work, p)]
    bar = _bar(progress, len(todo), "dedup assignment")
    _pool(work, _assign_parts, [([p],) for p in todo], processes, bar)
    if bar is not None:
        bar.close()


def run_units(work: str | Path, processes: int = 1, units: range | None = None, progress: bool = False) -> int:
    """The units not done yet (all, or `units`) in a pool of `processes`, as contiguous ranges (each range reads
    the assignment once); returns the number of pairs written this run."""
    work = Path(work)
    plan = _plan(work)
    units = units if units is not None else range(plan["num_clusters"])
    todo = [u for u in units if not unit_done(work, u)]
    if not todo:
        return 0
    # ranges of ~16 units at least (one pass over the assignment each), ~8 per process at most
    size = max(16, -(-len(units) // (8 * max(1, processes))))
    ranges = [(s, min(units.stop, s + size)) for s in range(units.start, units.stop, size)]
    ranges = [r for r in ranges if any(not unit_done(work, u) for u in range(*r))]
    bar = _bar(progress, len(ranges), "dedup units")
    total = _pool(work, _run_unit_range, ranges, processes, bar)
    if bar is not None:
        bar.close()
    return total


# ------------------------------------------------------------------------------------------------ resolve
def resolve(work: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of [N]: the kept row each row duplicates or -1, cosine [N]) from the units' pairs, by the exact
    search's greedy; written to verdicts.npz once, read back on later calls."""
    work = Path(work)
    plan = _plan(work)
    if (work / VERDICTS).exists():
        with np.load(work / VERDICTS, allow_pickle=False) as v:
            return v["duplicate_of"], v["cosine"]
    missing = [u for u in range(plan["num_clusters"]) if not unit_done(work, u)]
    if missing:
        raise ValueError(f"{work}: {len(missing)} of {plan['num_clusters']} dedup units not done (first: "
                         f"{missing[0]}); run them (`python -m data_prep.curate.clusters units {work}`)")
    worse, better, cosine = [], [], []
    for u in range(plan["num_clusters"]):
        with np.load(work / "units" / f"{u:07d}.pairs.npz", allow_pickle=False) as p:
            worse.append(p["worse"]), better.append(p["better"]), cosine.append(p["cosine"])
    worse, better, cosine = np.concatenate(worse), np.concatenate(better), np.concatenate(cosine)
    # one entry per pair (a pair found by two units keeps its higher cosine), each row's pairs best first
    order = np.lexsort((better, -cosine, worse))
    worse, better, cosine = worse[order], better[order], cosine[order]
    n = plan["num_rows"]
    duplicate_of = np.full(n, -1, np.int64)
    found = np.zeros(n, np.float32)
    starts = np.flatnonzero(np.r_[True, worse[1:] != worse[:-1]]) if len(worse) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(worse)]
    for s, e in zip(starts, ends):  # rows in rank order: every better row's verdict is final when read
        kept = duplicate_of[better[s:e]] < 0
        if kept.any():
            j = s + int(np.argmax(kept))  # the highest cosine among the kept (pairs sorted by cosine)
            duplicate_of[worse[s]], found[worse[s]] = better[j], cosine[j]
    _save_npz(work / VERDICTS, duplicate_of=duplicate_of, cosine=found)
    return duplicate_of, found


def pairs(work: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Every compared pair at or above the threshold, (worse, better), unique and sorted (for measurements)."""
    work = Path(work)
    plan = _plan(work)
    ws, bs = [], []
    for u in range(plan["num_clusters"]):
        with np.load(work / "units" / f"{u:07d}.pairs.npz", allow_pickle=False) as p:
            ws.append(p["worse"]), bs.append(p["better"])
    code = np.unique(np.concatenate(ws) * plan["num_rows"] + np.concatenate(bs))
    return code // plan["num_rows"], code % plan["num_rows"]


def near_duplicates_clustered(work: str | Path, opts: ClusterOptions, processes: int = 1, run: bool = True,
                              dim: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """prepare, the assignment and the units (in a local pool when `run`, else only what an array did), resolve.
    Returns (duplicate_of, cosine) over the rows of the work folder's embeddings, or None when `run` is False and
    assignment parts or units are still to be done."""
    plan = prepare(work, opts, dim=dim)
    if run:
        run_assign(work, processes, progress=progress)
        run_units(work, processes, progress=progress)
    elif not (all(part_done(work, p) for p in range(plan["num_parts"]))
              and all(unit_done(work, u) for u in range(plan["num_clusters"]))):
        return None
    return resolve(work)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc=desc)


# ------------------------------------------------------------------------------------------------ array task
def main(argv: list[str] | None = None) -> int:
    """`python -m data_prep.curate.clusters {assign,units} WORK [--task-index I --num-tasks T]`: one array task
    (or, with neither, all) of the assignment parts or of the units of a prepared work folder; a rerun skips the
    parts and units already done. Every assignment part must be done before the units run."""
    p = argparse.ArgumentParser(prog="python -m data_prep.curate.clusters", description=main.__doc__)
    p.add_argument("stage", choices=("assign", "units"))
    p.add_argument("work", help="the prepared work folder (the filter's --dedup-work)")
    p.add_argument("--task-index", type=int, help="this task's index (default: $SLURM_ARRAY_TASK_ID, else all)")
    p.add_argument("--num-tasks", type=int, help="number of tasks the parts or units are split over")
    p.add_argument("--processes", type=int, default=1, help="local processes for this task's share")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        plan = _plan(Path(a.work))
        index = a.task_index if a.task_index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        share = None
        if index is not None:
            if not a.num_tasks or a.num_tasks < 1:
                raise ValueError("--num-tasks: needed (>= 1) with a task index")
            total = plan["num_parts"] if a.stage == "assign" else plan["num_clusters"]
            share = task_units(total, int(index), a.num_tasks)
        if a.stage == "assign":
            run_assign(a.work, a.processes, share, progress=not a.no_progress)
            print(f"{a.work}: assignment parts {share or 'all'} done")
            return 0
        count = run_units(a.work, a.processes, share, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as exn:
        p.exit(2, f"plait: error: {exn}\n")
    print(f"{a.work}: {count} pairs at or above {plan['threshold']} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
