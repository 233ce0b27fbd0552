"""Clustered near-duplicate search: k-means units, pairs within each unit, then today's greedy over those pairs.

The input is a work folder holding `embeddings.npy`: the candidates' image embeddings [N, D] (float16 or float32)
in priority order, row 0 the best-scored. A row's number is its rank, so "better" means "smaller row".

Stages, each a pure function of the work folder, each writing its files atomically with a done marker last:
  prepare   k-means (`faiss.Kmeans`, spherical, seeded) trained on a seeded sample of the L2-normalised rows
            (`sample_per_cluster` x K rows), then every row's `probe` nearest centroids by inner product: the
            first is its home cluster, all `probe` of them are its probe set P(i). Writes centroids, the
            assignment and, per cluster c, its members M(c) = {i : home(i) = c} and visitors
            V(c) = {i : c in P(i), home(i) != c}, both in rank order.
  unit c    every pair of M(c) x M(c) and V(c) x M(c) with cosine >= threshold, as (worse row, better row,
            cosine), to `units/c.pairs.npz`, then `units/c.done`. Reads only the embeddings of M(c) and V(c).
  resolve   the union of the units' pairs, then the greedy of the exact search (`dedup.near_duplicates`):
            rows in rank order, a row is dropped when one of its pairs joins it to a better row that is kept;
            it is named the duplicate of the kept one of highest cosine (ties: the better-ranked one).

The boundary rule, exactly: rows i and j are compared iff home(j) is in P(i) or home(i) is in P(j). Unit home(j)
finds the pair in M x M (same home) or with i a visitor. A near-duplicate pair on the boundary of two clusters has
each cluster among the nearest two centroids of both rows, so `probe` >= 2 finds it; `probe` = 1 compares within
home clusters only. The verdicts equal the exact search's whenever every pair at or above the threshold is
compared, and differ only through pairs whose rows' probe sets miss each other's home (`bench_dedup.py` counts
them: the pair recall).

Determinism: the centroids, assignment and unit lists are written once by `prepare` and only read afterwards; a
unit's pairs depend on its own rows only, and `resolve` sorts the union before the greedy. So the verdicts do not
depend on how units are spread over processes or array tasks, and a killed unit reruns to the same pairs.

Memory: a unit holds its members' and visitors' embeddings (about `probe` x a cluster's rows, float32) and one
block of cosines [block, |M(c)|]; prepare holds the centroids and one chunk of rows at a time; resolve holds the
pairs (only those at or above the threshold) and one flag per row. Embeddings stay in `embeddings.npy`, read
through short-lived memory maps.

Cost: prepare is O(N K D) for the assignment; the units are O(probe N^2 D / K) in total, so the default
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


def _rows(work: Path, index: np.ndarray | slice) -> np.ndarray:
    """Rows of embeddings.npy as float32, L2-normalised; the memory map is dropped on return, so pages read here
    do not stay in this process's resident set."""
    emb = _open_embeddings(work)
    out = np.asarray(emb[index], dtype=np.float32)
    del emb
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


# ------------------------------------------------------------------------------------------------ prepare
def prepare(work: str | Path, opts: ClusterOptions, dim: int | None = None, threads: int | None = None,
            progress: bool = False) -> dict:
    """Checks the embeddings, trains k-means, assigns every row; writes the plan and unit lists. A work folder
    already prepared with the same settings and input is reused; other settings are refused."""
    import faiss
    work = Path(work)
    emb = _open_embeddings(work)
    n, d = emb.shape
    del emb
    if dim is not None and d != dim:
        raise ValueError(f"{work / EMBEDDINGS}: embeddings of dimension {d}, expected {dim}")
    k = opts.clusters_for(n)
    plan = {"format": FORMAT, "num_rows": n, "dim": d, **asdict(opts), "num_clusters": k}
    if (work / PREPARED).exists():
        have = json.loads((work / PLAN).read_text())
        diffs = [key for key in plan if have.get(key) != plan[key]]
        if diffs:
            raise ValueError(f"{work}: prepared with other settings ({', '.join(diffs)}); use a new work folder")
        return have
    if threads:
        faiss.omp_set_num_threads(threads)
    _check_rows(work, n, progress)
    rng = np.random.default_rng(opts.seed)
    train_idx = np.sort(rng.choice(n, size=min(n, opts.sample_per_cluster * k), replace=False))
    km = faiss.Kmeans(d, k, niter=opts.niter, seed=opts.seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(opts.sample_per_cluster, 1))
    km.train(np.ascontiguousarray(_rows(work, train_idx)))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)  # [K, D]
    index = faiss.IndexFlatIP(d)
    index.add(centroids)
    probe = min(opts.probe, k)
    assign = np.empty((n, probe), np.int32)  # [N, probe]: home first
    bar = _bar(progress, n, "assigning")
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        _, nearest = index.search(np.ascontiguousarray(_rows(work, slice(start, stop))), probe)
        assign[start:stop] = nearest
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    home = assign[:, 0]
    members = np.argsort(home, kind="stable").astype(np.int64)  # rank order within each cluster
    member_offsets = np.concatenate([[0], np.cumsum(np.bincount(home, minlength=k))]).astype(np.int64)
    rows_v = np.repeat(np.arange(n, dtype=np.int64), probe - 1)
    units_v = assign[:, 1:].reshape(-1).astype(np.int64)
    order = np.lexsort((rows_v, units_v))
    visitors = rows_v[order]
    visitor_offsets = np.concatenate([[0], np.cumsum(np.bincount(units_v, minlength=k))]).astype(np.int64)
    _save_npy(work / "centroids.npy", centroids)
    _save_npy(work / "assign.npy", assign)
    # separate .npy files, so that a unit maps them and reads only its own slice
    for name, array in (("members", members), ("member_offsets", member_offsets), ("visitors", visitors),
                        ("visitor_offsets", visitor_offsets)):
        _save_npy(work / f"{name}.npy", array)
    (work / "units").mkdir(exist_ok=True)
    sizes = np.diff(member_offsets)
    plan.update(largest_cluster=int(sizes.max()), empty_clusters=int((sizes == 0).sum()))
    _write_text(work / PLAN, json.dumps(plan, indent=1))
    _write_text(work / PREPARED, "")
    return plan


def _check_rows(work: Path, n: int, progress: bool) -> None:
    """A NaN, infinite or all-zero embedding has no direction: refused, naming the first such row."""
    for start in range(0, n, _CHUNK):
        emb = _open_embeddings(work)
        block = np.asarray(emb[start:start + _CHUNK], dtype=np.float32)
        del emb
        finite = np.isfinite(block).all(axis=1)
        zero = finite & ~(np.abs(block) > 0).any(axis=1)
        bad = np.flatnonzero(~finite | zero)
        if len(bad):
            row = start + int(bad[0])
            what = "zero" if zero[bad[0]] else "non-finite (NaN or infinity)"
            raise ValueError(f"{work / EMBEDDINGS}: row {row} is a {what} embedding ({len(bad)} such rows in "
                             f"rows {start}..{start + len(block) - 1}): it cannot be compared")


# ------------------------------------------------------------------------------------------------ units
def _plan(work: Path) -> dict:
    if not (work / PREPARED).exists():
        raise ValueError(f"{work}: not a prepared dedup work folder (no {PREPARED}); run prepare first")
    return json.loads((work / PLAN).read_text())


def unit_done(work: str | Path, unit: int) -> bool:
    return (Path(work) / "units" / f"{unit:07d}.done").exists()


def run_unit(work: str | Path, unit: int) -> int:
    """Writes unit `unit`'s pairs at or above the threshold, then its done marker; returns the pair count."""
    work = Path(work)
    plan = _plan(work)
    if not 0 <= unit < plan["num_clusters"]:
        raise ValueError(f"{work}: unit {unit} is outside 0..{plan['num_clusters'] - 1}")
    load = lambda name: np.load(work / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    mo, vo = load("member_offsets"), load("visitor_offsets")
    members = np.array(load("members")[mo[unit]:mo[unit + 1]])
    visitors = np.array(load("visitors")[vo[unit]:vo[unit + 1]])
    threshold = float(plan["threshold"])
    # a large cluster gets shorter blocks: one block of cosines stays under 2^25 floats (128 MiB)
    block = max(1, min(int(plan["block"]), (1 << 25) // max(1, len(members))))
    worse, better, cosine = [], [], []
    if len(members):
        m = _rows(work, members)  # [m, D]
        for start in range(0, len(members), block):
            sims = m[start:start + block] @ m[:start + block].T  # [b, start + b]: members against better ones
            r, c = np.nonzero(sims >= threshold)
            keep = c < r + start  # the column is a better-ranked member (rank order within the unit)
            worse.append(members[r[keep] + start])
            better.append(members[c[keep]])
            cosine.append(sims[r[keep], c[keep]])
        for start in range(0, len(visitors), block):
            rows = visitors[start:start + block]
            sims = _rows(work, rows) @ m.T  # [b, m]
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
    """The contiguous range of units of array task `task_index` of `num_tasks` (sizes differ by at most one)."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index}: must be in 0..{num_tasks - 1}")
    return range(task_index * num_units // num_tasks, (task_index + 1) * num_units // num_tasks)


def _run_units(work: str, units: list[int], threads: int | None) -> int:
    if threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    return sum(run_unit(work, u) for u in units if not unit_done(work, u))


def run_units(work: str | Path, processes: int = 1, units: range | None = None, progress: bool = False) -> int:
    """Runs the units not done yet (all, or `units`) in a pool of `processes` (spawned: faiss and BLAS threads do
    not survive a fork); returns the number of pairs written this run."""
    work = Path(work)
    plan = _plan(work)
    todo = [u for u in (units if units is not None else range(plan["num_clusters"])) if not unit_done(work, u)]
    bar = _bar(progress, len(todo), "dedup units")
    total = 0
    batches = [todo[i:i + 16] for i in range(0, len(todo), 16)]  # 16 units per call: a cluster is small work
    if processes <= 1:
        for batch in batches:
            total += _run_units(str(work), batch, None)
            if bar is not None:
                bar.update(len(batch))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            for batch, count in zip(batches, pool.map(_run_units, [str(work)] * len(batches), batches,
                                                      [1] * len(batches))):
                total += count
                if bar is not None:
                    bar.update(len(batch))
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
    """prepare, the units (in a local pool when `run`, else only those already done by an array), resolve.
    Returns (duplicate_of, cosine) over the rows of the work folder's embeddings, or None when `run` is False and
    units are still to be done."""
    plan = prepare(work, opts, dim=dim, progress=progress)
    if run:
        run_units(work, processes, progress=progress)
    elif not all(unit_done(work, u) for u in range(plan["num_clusters"])):
        return None
    return resolve(work)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, mininterval=0.5, desc=desc)


# ------------------------------------------------------------------------------------------------ array task
def main(argv: list[str] | None = None) -> int:
    """`python -m data_prep.curate.clusters units WORK [--task-index I --num-tasks T]`: one array task (or, with
    neither, every unit) of a prepared work folder; reruns skip the units already done."""
    p = argparse.ArgumentParser(prog="python -m data_prep.curate.clusters", description=main.__doc__)
    p.add_argument("stage", choices=("units",))
    p.add_argument("work", help="the prepared work folder (the filter's --dedup-work)")
    p.add_argument("--task-index", type=int, help="this task's index (default: $SLURM_ARRAY_TASK_ID, else all)")
    p.add_argument("--num-tasks", type=int, help="number of tasks the units are split over")
    p.add_argument("--processes", type=int, default=1, help="local processes for this task's units")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        plan = _plan(Path(a.work))
        index = a.task_index if a.task_index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        units = None
        if index is not None:
            if not a.num_tasks or a.num_tasks < 1:
                raise ValueError("--num-tasks: needed (>= 1) with a task index")
            units = task_units(plan["num_clusters"], int(index), a.num_tasks)
        count = run_units(a.work, a.processes, units, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as exn:
        p.exit(2, f"plait: error: {exn}\n")
    print(f"{a.work}: {count} pairs at or above {plan['threshold']} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
