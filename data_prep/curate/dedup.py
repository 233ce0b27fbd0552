"""Near-duplicate removal by embedding: greedy, exact, blocked, and not bounded by memory.

Candidates are visited in priority order (best score first); a candidate is dropped when the cosine of its image
embedding to an already KEPT one reaches the threshold, so of a group of near-duplicates the best-scored survives.

The index is the kept embeddings themselves, float16, appended to a file-backed array (`numpy.memmap`): 1 KiB per
sample at 512 dimensions, on disk, so the kept set may exceed RAM. Each chunk of candidates is compared to the kept
set in blocks (one matmul per block, on the GPU when there is one), then greedily within the chunk. The search is
exact (no approximate index), so the result does not depend on index parameters; its cost is one dot product per
(candidate, kept sample) pair: N * K * D multiply-adds for N candidates and K kept. FAISS (`faiss-cpu` installs from
PyPI here) would run the same brute force in its flat index, but in RAM; its compressed indexes (IVF, PQ) are
approximate. `benchmarks/bench_score.py` measures the cost: about 10.6 h per million samples on 2 CPU threads.

So this search is the reference and the method for small sets; `near_duplicates_of` takes it below EXACT_BELOW
candidates and the clustered search of `clusters.py` (k-means units on faiss, the same greedy over the pairs
they find) from there on, or whichever --dedup-method names.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


class KeptIndex:
    """The kept embeddings [K, D], float16, in a growing file-backed array."""

    def __init__(self, dim: int, folder: str | Path | None = None, capacity: int = 1 << 16):
        self.dim, self.size = dim, 0
        self._tmp = tempfile.TemporaryDirectory(prefix="plait-dedup-", dir=folder)
        self._path = Path(self._tmp.name) / "kept.f16"
        self._data = np.lib.format.open_memmap(self._path, mode="w+", dtype=np.float16, shape=(capacity, dim))

    def add(self, vectors: np.ndarray) -> None:
        """Appends vectors [n, D]."""
        need = self.size + len(vectors)
        if need > len(self._data):
            self._data.flush()
            grown = np.lib.format.open_memmap(self._path.with_suffix(".next"), mode="w+", dtype=np.float16,
                                              shape=(max(need, 2 * len(self._data)), self.dim))
            grown[: self.size] = self._data[: self.size]
            del self._data
            self._path.with_suffix(".next").replace(self._path)
            self._data = grown
        self._data[self.size:need] = vectors
        self.size = need

    def max_similarity(self, queries: torch.Tensor, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(max cosine [n], index of that kept vector [n]) of each query [n, D] over the kept set, in blocks."""
        best = torch.full((len(queries),), -2.0, device=device)
        where = torch.full((len(queries),), -1, dtype=torch.long, device=device)
        for start in range(0, self.size, block):
            kept = torch.from_numpy(np.ascontiguousarray(self._data[start:start + block])).to(device).float()  # [b, D]
            sims = queries @ kept.T  # [n, b]
            value, index = sims.max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            where = torch.where(better, index + start, where)
        return best, where

    def close(self) -> None:
        del self._data
        self._tmp.cleanup()


def near_duplicates(embeddings: Callable[[np.ndarray], np.ndarray], order: np.ndarray, threshold: float,
                    chunk: int = 4096, block: int = 65536, device: str | torch.device = "cpu",
                    folder: str | Path | None = None, progress: Callable[[int], None] | None = None,
                    capacity: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy near-duplicate removal over the candidates `order` (indices, best first).

    `embeddings(indices)` returns the L2-normalised image embeddings [n, D] of those candidates (read lazily, so
    the caller may stream them from disk). Returns (dropped [N] bool over `order` positions, duplicate_of [N]: the
    position in `order` of the kept sample it duplicates or -1, cosine [N])."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--dedup-embeddings {threshold}: a cosine threshold must be in (0, 1]")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU visible (the near-duplicate search runs on the CPU with --device cpu)")
    n = len(order)
    dropped = np.zeros(n, bool)
    duplicate_of = np.full(n, -1, np.int64)
    cosine = np.zeros(n, np.float32)
    kept_positions: list[np.ndarray] = []  # positions in `order` of the kept rows, in index order
    index: KeptIndex | None = None
    try:
        for start in range(0, n, chunk):
            vecs = np.asarray(embeddings(order[start:start + chunk]), dtype=np.float32)  # [c, D]
            if index is None:
                index = KeptIndex(vecs.shape[1], folder, capacity)
            q = torch.from_numpy(vecs).to(device)  # [c, D]
            c = len(q)
            best, where = index.max_similarity(q, block, device) if index.size else (
                torch.full((c,), -2.0, device=device), torch.full((c,), -1, dtype=torch.long, device=device))
            best, where = best.cpu().numpy(), where.cpu().numpy()
            sims = (q @ q.T).cpu().numpy()  # [c, c]: within the chunk, visited in order
            keep = np.zeros(c, bool)
            all_kept = np.concatenate(kept_positions) if kept_positions else np.zeros(0, np.int64)
            # only a candidate near an earlier one of its own chunk depends on the chunk's earlier verdicts
            near_earlier = np.tril(sims >= threshold, k=-1).any(axis=1)  # [c]
            for i in range(c):
                if not near_earlier[i]:
                    if best[i] >= threshold:
                        dropped[start + i], cosine[start + i] = True, best[i]
                        duplicate_of[start + i] = all_kept[where[i]]
                    else:
                        keep[i] = True
                    continue
                earlier = np.flatnonzero(keep[:i])
                inner = sims[i, earlier]
                j = int(inner.argmax()) if len(earlier) else -1
                if best[i] >= threshold and (j < 0 or best[i] >= inner[j]):
                    dropped[start + i], cosine[start + i] = True, best[i]
                    duplicate_of[start + i] = all_kept[where[i]]
                elif j >= 0 and inner[j] >= threshold:
                    dropped[start + i], cosine[start + i] = True, inner[j]
                    duplicate_of[start + i] = start + earlier[j]
                else:
                    keep[i] = True
            index.add(vecs[keep].astype(np.float16))
            kept_positions.append(start + np.flatnonzero(keep))
            if progress is not None:
                progress(c)
    finally:
        if index is not None:
            index.close()
    return dropped, duplicate_of, cosine


# ------------------------------------------------------------------------------------------------ method choice
METHODS = ("auto", "exact", "clustered")
EXACT_BELOW = 20_000
"""--dedup-method auto: the exact search below this many candidates (about 15 s on 2 CPU threads at 20,000, and
quadratic), the clustered one (`clusters.py`) from there on."""


class DedupPending(Exception):
    """The clustered search's units are left to a job array (--dedup-units array) and not all done yet."""


def choose_method(method: str, num_candidates: int) -> str:
    if method not in METHODS:
        raise ValueError(f"--dedup-method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        return "exact" if num_candidates < EXACT_BELOW else "clustered"
    return method


def near_duplicates_of(embeddings: Callable[[np.ndarray], np.ndarray], order: np.ndarray, dim: int,
                       threshold: float, method: str = "auto", work: str | Path | None = None,
                       clusters=None, processes: int = 1, units: str = "local", device: str = "cpu",
                       progress: bool = False) -> tuple[str, np.ndarray, np.ndarray]:
    """(method used, duplicate_of [N]: the position in `order` of the kept sample each candidate duplicates or
    -1, cosine [N]) by the exact or the clustered search. The clustered one copies the candidates' embeddings, in
    `order`, to `work`/embeddings.npy once (a rerun with the same candidates reuses the folder and the units
    already done); with `units` "array" it runs no unit itself and raises DedupPending until an array did them.
    `clusters` is a `clusters.ClusterOptions` (its threshold is replaced by `threshold`)."""
    import dataclasses
    import hashlib
    import json
    from data_prep.curate import clusters as clustered
    chosen = choose_method(method, len(order))
    if chosen == "exact" or not len(order):
        dropped, dup_of, cos = near_duplicates(embeddings, order, threshold, device=device)
        return "exact", np.where(dropped, dup_of, -1), np.where(dropped, cos, 0.0).astype(np.float32)
    if work is None:
        raise ValueError("--dedup-method clustered needs a local work folder (--dedup-work DIR)")
    work = Path(work)
    opts = dataclasses.replace(clusters or clustered.ClusterOptions(), threshold=threshold)
    candidates = hashlib.sha256(np.ascontiguousarray(order, np.int64).tobytes()).hexdigest()
    marker = work / "candidates.json"
    if marker.exists() and json.loads(marker.read_text()).get("sha256") != candidates:
        raise ValueError(f"--dedup-work {str(work)!r} holds the search of other candidates: use a new folder")
    if not (work / clustered.EMBEDDINGS).exists():
        clustered.write_embeddings(work, lambda a, b: embeddings(order[a:b]), len(order), dim)
        marker.write_text(json.dumps({"sha256": candidates, "num_candidates": len(order)}))
    result = clustered.near_duplicates_clustered(work, opts, processes=processes, run=units == "local", dim=dim,
                                                 progress=progress)
    if result is None:
        raise DedupPending(f"near-duplicate units prepared in {work}: run them as a job array (`python -m "
                           f"data_prep.curate.clusters units {work} --task-index I --num-tasks T`, which "
                           "`plait launch dedup` renders), then rerun this command")
    return "clustered", result[0], result[1]
