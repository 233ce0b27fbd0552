"""Clustered near-duplicate search (`data_prep/curate/clusters.py`) on 1M x 512 float16 embeddings: time, peak
memory, and recall of planted pairs and of the exact search's pairs at the same threshold.

The embeddings: a mixture of --modes anisotropic Gaussian clusters on the sphere (Zipf-sized; per mode, every
dimension of the noise has its own log-normal scale), then normalised. --dup-fraction of the rows are copies of
another row (an "original") plus small noise, in groups of 1-4 copies, so a group holds 2-5 rows; every pair of a
group is a planted pair. Rows are in random priority order (row 0 the best-scored), originals and copies mixed.

Measured, each in a fresh spawned child (its own peak RSS; pool workers as its children):
  clustered   prepare (k-means on a sample), the assignment parts and the units in a pool of --processes,
              resolve.
  planted     recall of the planted pairs at or above --threshold among the pairs the clustered search compared.
  exact pairs --queries random rows against all N rows by brute force (float32 matmul in blocks, what
              faiss.IndexFlatIP computes): every pair at or above the threshold touching a query row; recall =
              the share the clustered search found.
  verdicts    the exact greedy (`dedup.near_duplicates`) and the clustered search on the first --subsample
              rows: time of each and the share of equal verdicts.

    .venv/bin/python benchmarks/bench_dedup.py [--rows 1000000] [--work DIR] [--quick]
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 512


def _hwm_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries the forked parent's RSS over
    an exec into it, so a spawned child would report its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """The largest RSS of this process plus all its children together, sampled every `interval_s` (the pool's
    workers run beside this process, so their sum is what the machine must hold)."""

    def __init__(self, interval_s: float = 0.2):
        import threading
        import psutil
        self.me, self.interval_s = psutil.Process(), interval_s
        self.total_mb = self.child_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil
        while not self._stop.wait(self.interval_s):
            try:
                kids = [c.memory_info().rss for c in self.me.children(recursive=True)]
            except psutil.Error:  # a worker that exited between listing and reading
                continue
            self.child_mb = max(self.child_mb, max(kids, default=0) / 2**20)
            self.total_mb = max(self.total_mb, (self.me.memory_info().rss + sum(kids)) / 2**20)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_total_rss_mb": self.total_mb, "worker_peak_rss_mb": self.child_mb}


def generate(work: Path, rows: int, modes: int, dup_fraction: float, seed: int, copy_noise: float) -> dict:
    """Writes work/embeddings.npy [rows, DIM] float16 and work/planted.npy [P, 2] (worse, better) planted pairs."""
    from data_prep.curate import clusters
    from tqdm import tqdm
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(modes, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # anisotropic spread per mode: log-normal scale per dimension, overall width per mode
    scales = np.exp(rng.normal(0.0, 0.5, size=(modes, DIM))).astype(np.float32)
    scales *= (rng.uniform(0.02, 0.08, size=(modes, 1)) / np.sqrt((scales ** 2).mean(axis=1, keepdims=True)))
    weights = 1.0 / np.arange(1, modes + 1) ** 0.7  # Zipf-like mode sizes
    mode_of = rng.choice(modes, size=rows, p=weights / weights.sum())
    # planted groups: a copy row takes an original row's vector plus noise
    num_copies = int(rows * dup_fraction)
    is_copy = np.zeros(rows, bool)
    copy_rows = rng.choice(rows, size=num_copies, replace=False)
    is_copy[copy_rows] = True
    originals = np.flatnonzero(~is_copy)
    group_sizes = rng.integers(1, 5, size=num_copies)  # copies per original, 1-4
    owner = np.repeat(rng.choice(originals, size=num_copies, replace=False), group_sizes)[:num_copies]
    original_of = np.full(rows, -1, np.int64)
    original_of[copy_rows] = owner
    chunk = 65536

    def base(start: int, stop: int) -> np.ndarray:
        r = np.random.default_rng([seed, start])
        m = mode_of[start:stop]
        x = centres[m] + r.normal(size=(stop - start, DIM)).astype(np.float32) * scales[m]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    clusters.write_embeddings(work, base, rows, DIM, chunk)
    emb = np.load(work / clusters.EMBEDDINGS, mmap_mode="r+")
    order = np.argsort(copy_rows)
    copy_sorted, owner_sorted = copy_rows[order], owner[order]
    for start in tqdm(range(0, num_copies, chunk), desc="planting", file=sys.stderr):
        rows_c, rows_o = copy_sorted[start:start + chunk], owner_sorted[start:start + chunk]
        r = np.random.default_rng([seed, 1, start])
        x = np.asarray(emb[rows_o], np.float32) + r.normal(size=(len(rows_c), DIM)).astype(np.float32) * copy_noise
        emb[rows_c] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    emb.flush()
    del emb
    # planted pairs: every pair of a group (the original and its copies)
    group = np.where(original_of >= 0, original_of, np.arange(rows))
    members = np.flatnonzero(np.bincount(group, minlength=rows)[group] > 1)
    members = members[np.argsort(group[members], kind="stable")]
    g = group[members]
    pairs = []
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(g)]):
        rs = members[s:e]
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                pairs.append((max(rs[i], rs[j]), min(rs[i], rs[j])))
    planted = np.array(pairs, np.int64).reshape(-1, 2)
    np.save(work / "planted.npy", planted)
    return {"rows": rows, "copies": num_copies, "planted_pairs": len(planted)}


def _cos(work: Path, pairs: np.ndarray) -> np.ndarray:
    from data_prep.curate import clusters
    out = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), 65536):
        p = pairs[s:s + 65536]
        a, b = clusters._rows(work, p[:, 0], normalise=False), clusters._rows(work, p[:, 1], normalise=False)
        out[s:s + len(p)] = (a * b).sum(axis=1)
    return out


def run_clustered(work: str, threshold: float, probe: int, processes: int, clusters_k: int | None) -> dict:
    from data_prep.curate import clusters
    base = _hwm_mb()
    sampler = RssSampler()
    opts = clusters.ClusterOptions(threshold=threshold, probe=probe, num_clusters=clusters_k)
    t0 = time.perf_counter()
    plan = clusters.prepare(work, opts, dim=DIM)
    t1 = time.perf_counter()
    clusters.run_assign(work, processes, progress=True)
    t2 = time.perf_counter()
    pairs = clusters.run_units(work, processes, progress=True)
    t3 = time.perf_counter()
    dup_of, _ = clusters.resolve(work)
    t4 = time.perf_counter()
    sizes = np.bincount(clusters.assignment(work)[:, 0], minlength=plan["num_clusters"])
    return {"train_s": t1 - t0, "assign_s": t2 - t1, "units_s": t3 - t2, "resolve_s": t4 - t3, "total_s": t4 - t0,
            "pairs": pairs, "dropped": int((dup_of >= 0).sum()), "num_clusters": plan["num_clusters"],
            "largest_cluster": int(sizes.max()), "median_cluster": float(np.median(sizes)),
            "empty_clusters": int((sizes == 0).sum()),
            "peak_rss_mb": _hwm_mb(), "start_rss_mb": base, **sampler.stop()}


def exact_pairs_of_queries(work: str, queries: np.ndarray, threshold: float) -> dict:
    """Every pair (q, j), j != q, with cosine >= threshold, by brute force against all rows."""
    from data_prep.curate import clusters
    from tqdm import tqdm
    n = np.load(Path(work) / clusters.EMBEDDINGS, mmap_mode="r").shape[0]
    q = clusters._rows(Path(work), queries, normalise=False)  # [Q, D]: the cosines the search itself takes
    found = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, n, 32768), desc="exact pairs", file=sys.stderr):
        block = clusters._rows(Path(work), slice(start, start + 32768), normalise=False)  # [b, D]
        for qs in range(0, len(q), 4096):
            sims = q[qs:qs + 4096] @ block.T  # [<=4096, b]
            r, c = np.nonzero(sims >= threshold)
            a, b = queries[qs + r], start + c
            keep = a != b
            found.append(np.stack([np.maximum(a, b)[keep], np.minimum(a, b)[keep]], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
    return {"pairs": pairs.tolist(), "seconds": time.perf_counter() - t0, "peak_rss_mb": _hwm_mb()}


def verdicts_on_subsample(work: str, sub: str, rows: int, threshold: float, probe: int) -> dict:
    """The exact greedy and the clustered search on the first `rows` rows (their own work folder)."""
    from data_prep.curate import clusters
    from data_prep.curate.dedup import near_duplicates
    x = clusters._rows(Path(work), slice(0, rows), normalise=False)
    t0 = time.perf_counter()
    dropped, dup_of, _ = near_duplicates(lambda idx: x[idx], np.arange(rows), threshold)
    exact_s = time.perf_counter() - t0
    clusters.write_embeddings(sub, lambda a, b: x[a:b], rows, DIM)
    t0 = time.perf_counter()
    got, _ = clusters.near_duplicates_clustered(sub, clusters.ClusterOptions(threshold=threshold, probe=probe))
    clustered_s = time.perf_counter() - t0
    ref = np.where(dropped, dup_of, -1)
    return {"rows": rows, "exact_s": exact_s, "clustered_s": clustered_s, "exact_dropped": int(dropped.sum()),
            "clustered_dropped": int((got >= 0).sum()), "equal_verdicts": float((got == ref).mean()),
            "equal_keep_drop": float(((got >= 0) == dropped).mean())}


def _child(fn, args, queue) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as exn:  # reported to the parent, which raises
        queue.put({"error": f"{type(exn).__name__}: {exn}"})


def in_child(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:
            if not proc.is_alive():
                raise RuntimeError(f"{fn.__name__}: child exited with {proc.exitcode}") from None
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{fn.__name__}: {result['error']}")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="embeddings")
    p.add_argument("--modes", type=int, default=2000, help="Gaussian clusters of the mixture")
    p.add_argument("--dup-fraction", type=float, default=0.1, help="share of rows that are planted copies")
    p.add_argument("--copy-noise", type=float, default=0.012, help="per-dimension noise std of a copy")
    p.add_argument("--threshold", type=float, default=0.9, help="cosine threshold")
    p.add_argument("--probe", type=int, default=3, help="clusters a row is compared in")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default sqrt(probe x rows))")
    p.add_argument("--processes", type=int, default=2, help="unit pool processes")
    p.add_argument("--queries", type=int, default=10_000, help="rows whose exact pairs are computed")
    p.add_argument("--subsample", type=int, default=20_000, help="rows for the exact greedy as the verdict peer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the embeddings (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="20k rows, 2k queries, 5k subsample: seconds")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.modes, a.queries, a.subsample = 20_000, 100, 2_000, 5_000
    tmp = tempfile.TemporaryDirectory(prefix="bench-dedup-", dir=a.work)
    work = Path(tmp.name) / "search"
    t0 = time.perf_counter()
    gen = generate(work, a.rows, a.modes, a.dup_fraction, a.seed, a.copy_noise)
    gen["seconds"] = time.perf_counter() - t0
    print(f"generated {a.rows} rows, {gen['planted_pairs']} planted pairs in {gen['seconds']:.0f} s", file=sys.stderr)
    clustered = in_child(run_clustered, str(work), a.threshold, a.probe, a.processes, a.clusters)
    print(f"clustered: {json.dumps(clustered)}", file=sys.stderr)
    from data_prep.curate import clusters
    worse, better = clusters.pairs(work)
    found = set((worse * a.rows + better).tolist())
    planted = np.load(work / "planted.npy")
    planted_cos = _cos(work, planted)
    above = planted[planted_cos >= a.threshold]
    planted_found = sum(int(w * a.rows + b in found) for w, b in above)
    queries = np.sort(np.random.default_rng(a.seed + 7).choice(a.rows, size=min(a.queries, a.rows), replace=False))
    exact = in_child(exact_pairs_of_queries, str(work), queries, a.threshold)
    exact_pairs = np.array(exact.pop("pairs"), np.int64).reshape(-1, 2)
    exact_found = sum(int(w * a.rows + b in found) for w, b in exact_pairs)
    sub = in_child(verdicts_on_subsample, str(work), str(Path(tmp.name) / "sub"), min(a.subsample, a.rows),
                   a.threshold, a.probe)
    result = {
        "rows": a.rows, "dim": DIM, "threshold": a.threshold, "probe": a.probe, "processes": a.processes,
        "generate": gen, "clustered": clustered,
        "planted": {"pairs": len(planted), "at_or_above_threshold": len(above), "found": planted_found,
                    "recall": planted_found / max(1, len(above)),
                    "cosine_min": float(planted_cos.min()) if len(planted) else None},
        "exact_queries": {"queries": len(queries), "pairs": len(exact_pairs), "found": exact_found,
                          "recall": exact_found / max(1, len(exact_pairs)), **exact},
        "subsample": sub,
    }
    c = clustered
    print("| rows | clusters (largest) | train s | assign s | units s | resolve s | total s | peak RSS MB: all / "
          f"main / one worker | planted recall | exact-pair recall | verdicts = exact on {sub['rows']} |")
    print(f"| {a.rows:,} | {c['num_clusters']:,} ({c['largest_cluster']:,}) | {c['train_s']:.0f} | "
          f"{c['assign_s']:.0f} | {c['units_s']:.0f} | {c['resolve_s']:.1f} | {c['total_s']:.0f} | "
          f"{c['peak_total_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} / {c['worker_peak_rss_mb']:.0f} | "
          f"{result['planted']['recall']:.4f} of {len(above):,} | "
          f"{result['exact_queries']['recall']:.4f} of {len(exact_pairs):,} | {sub['equal_verdicts']:.4f} |")
    print(json.dumps(result))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
