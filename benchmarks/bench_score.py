"""`plait prep score` and `plait prep filter` against their plain peers, on the same shards in the same run.

score:  samples/s of `plait prep score` against a bare loop that runs the same exported model over the same shards
        with open_clip's own preprocess and tokenizer in a plain webdataset pipeline (`WebDataset.decode("pil")`,
        `to_tuple`, `map_tuple`, `batched`, `WebLoader`): same batch size, same worker count, rounds interleaved,
        each timed end to end (model loading included on both sides).
filter: MB/s of `plait prep filter` (decisions from the score files, copy, index, records, manifests) against a
        plain `tarfile` copy of exactly the same members into new tars.
dedup:  the near-duplicate search's cost (data_prep/curate/dedup.py, exact, blocked) on random unit embeddings where
        nothing is a duplicate (the worst case: every sample stays in the index), extrapolated to a million.

Data: the noisy Fashion-MNIST set of bench_filter_gain.py (RUN_DIR/noisy) and its exported model when they exist,
else the clean 10k test split and an untrained `fmnist-vit` export (the speed does not depend on the weights).
Run under the shared lock: `flock /tmp/plait-bench.lock python benchmarks/bench_score.py`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.curate.dedup import near_duplicates  # noqa: E402
from data_prep.curate.filter import FilterOptions, filter_dataset  # noqa: E402
from data_prep.curate.score import ScoreOptions, score  # noqa: E402


def bare_loop(urls: list[str], export: str, batch_size: int, workers: int) -> tuple[int, float]:
    """The same model over the same shards, open_clip's preprocess, a plain webdataset pipeline."""
    import open_clip
    import webdataset as wds

    started = time.monotonic()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    model.eval()
    pipeline = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
                .to_tuple("__key__", "jpg;png;webp", "txt")
                .map_tuple(lambda k: k, preprocess, lambda t: tokenizer([t])[0])
                .batched(batch_size))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    keys, scores = [], []
    with torch.no_grad():
        for k, images, texts in loader:
            fi = model.encode_image(images, normalize=True)  # [B, E]
            ft = model.encode_text(texts, normalize=True)  # [B, E]
            scores.append((fi * ft).sum(-1).numpy())
            keys += k
    return len(keys), time.monotonic() - started


def plait_score(dataset: str, export: str, batch_size: int, workers: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory(prefix="bench-score-") as out:
        started = time.monotonic()
        summary = score(ScoreOptions(dataset, export, out=out, batch_size=batch_size, num_workers=workers,
                                     progress=False))
        return summary["num_samples"], time.monotonic() - started


def tar_copy(src: Path, out: Path, kept: set[str]) -> int:
    """A plain tarfile copy of the kept samples' members; returns the bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in sorted(src.glob("0*.tar")):
        with tarfile.open(shard) as tin, tarfile.open(out / shard.name, "w") as tout:
            for member in tin:
                if member.name.split(".", 1)[0] in kept:
                    tout.addfile(member, tin.extractfile(member))
        total += (out / shard.name).stat().st_size
    return total


def dataset_and_model(run_dir: Path, work: Path) -> tuple[Path, Path, str]:
    noisy, export = run_dir / "noisy", run_dir / "export_noisy"
    if (noisy / "manifest.json").exists() and (export / "open_clip_config.json").exists():
        return noisy, export, "noisy Fashion-MNIST train (60k) and the noisy-trained fmnist-vit export"
    from data_prep import cli as prep_cli
    from pipeline.artifacts.export import export_open_clip
    from pipeline.models.sizes import model_config
    from pipeline.models.towers import build_clip
    dataset = work / "test"
    if not (dataset / "manifest.json").exists():
        prep_cli.main(["shard", "--input", "/usr/share/datasets/fashion-mnist", "--input-format", "fashion-mnist",
                       "--split", "test", "--output", str(dataset), "--samples-per-shard", "5000", "--no-progress"])
    cfg = model_config("fmnist-vit")
    torch.manual_seed(0)
    export = export_open_clip(build_clip(cfg).state_dict(), cfg, work / "export")
    return dataset, export, "Fashion-MNIST test (10k) and an untrained fmnist-vit export"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/filter_gain", help="bench_filter_gain.py's run dir (data, model)")
    p.add_argument("--work", default="runs/bench_score")
    p.add_argument("--shards", type=int, default=2, help="shards of the dataset scored per round")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="loader workers, both sides (two cores: one decodes)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dedup-samples", type=int, default=20000)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source, export, what = dataset_and_model(Path(a.run_dir), work)
    print(f"data and model: {what}", flush=True)

    # a dataset folder holding the first --shards shards (hard links: same bytes, no copy)
    subset = work / "subset"
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir(parents=True)
    names = sorted(json.loads((source / "sizes.json").read_text()))[: a.shards]
    for name in names:
        (subset / name).hardlink_to(source / name)
    urls = [str(subset / n) for n in names]
    results = {"plait": [], "bare": []}
    for r in range(a.rounds):
        for side in (("plait", "bare") if r % 2 == 0 else ("bare", "plait")):
            n, s = (plait_score(str(subset), str(export), a.batch_size, a.workers) if side == "plait"
                    else bare_loop(urls, str(export), a.batch_size, a.workers))
            results[side].append(n / s)
            print(f"round {r} {side}: {n} samples in {s:.1f} s = {n / s:.0f} samples/s", flush=True)
    plait_rate, bare_rate = (statistics.median(results[k]) for k in ("plait", "bare"))
    report = {"score": {"plait_samples_per_s": plait_rate, "bare_samples_per_s": bare_rate,
                        "ratio": plait_rate / bare_rate, "rounds": results, "samples": n,
                        "batch_size": a.batch_size, "workers": a.workers}}
    print(f"score: plait {plait_rate:.0f} samples/s, bare open_clip + webdataset loop {bare_rate:.0f} samples/s: "
          f"{plait_rate / bare_rate:.2f}x (target >= 1.0x)", flush=True)

    # filter: the full source, scored once (bench_filter_gain's scores when there are), top 60%
    scores = Path(a.run_dir) / "scores" if source == Path(a.run_dir) / "noisy" else work / "scores"
    if not (scores / "summary.json").exists():
        score(ScoreOptions(str(source), str(export), out=str(scores), batch_size=a.batch_size, num_workers=a.workers,
                           progress=False))
    out = work / "filtered"
    shutil.rmtree(out, ignore_errors=True)
    t = time.monotonic()
    result = filter_dataset(FilterOptions(str(source), str(out), scores=str(scores), top_fraction=0.6,
                                          progress=False))
    plait_s = time.monotonic() - t
    plait_bytes = sum(s["bytes"] for s in result["shards"])
    import pyarrow.parquet as pq
    table = pq.read_table(out / "samples.parquet", columns=["key", "status"])
    kept = {k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist()) if s == "ok"}
    peer = work / "tarcopy"
    shutil.rmtree(peer, ignore_errors=True)
    t = time.monotonic()
    peer_bytes = tar_copy(source, peer, kept)
    peer_s = time.monotonic() - t
    shutil.rmtree(peer, ignore_errors=True)
    report["filter"] = {"plait_mb_per_s": plait_bytes / plait_s / 1e6, "tarfile_mb_per_s": peer_bytes / peer_s / 1e6,
                        "ratio": (plait_bytes / plait_s) / (peer_bytes / peer_s), "kept": len(kept),
                        "plait_bytes": plait_bytes, "plait_s": plait_s, "tarfile_bytes": peer_bytes, "tarfile_s": peer_s}
    print(f"filter: plait {report['filter']['plait_mb_per_s']:.0f} MB/s ({plait_bytes / 1e6:.0f} MB in {plait_s:.1f} "
          f"s, decisions and manifests included), plain tarfile copy {report['filter']['tarfile_mb_per_s']:.0f} MB/s "
          f"({peer_bytes / 1e6:.0f} MB in {peer_s:.1f} s): {report['filter']['ratio']:.2f}x", flush=True)

    # dedup: worst case (nothing duplicates), D = 512 as ViT-B/32's embeddings
    n, d = a.dedup_samples, 512
    emb = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    t = time.monotonic()
    dropped, _, _ = near_duplicates(lambda idx: emb[idx], np.arange(n), 0.95)
    dedup_s = time.monotonic() - t
    per_million = dedup_s * (1e6 / n) ** 2
    report["dedup"] = {"samples": n, "dim": d, "seconds": dedup_s, "dropped": int(dropped.sum()),
                       "pairs_per_s": n * n / 2 / dedup_s, "extrapolated_s_per_million": per_million}
    print(f"dedup: {n} x {d} embeddings (all kept) in {dedup_s:.1f} s = {n * n / 2 / dedup_s / 1e6:.0f} M pairs/s; "
          f"a million such samples: {per_million / 3600:.1f} h on this CPU ({torch.get_num_threads()} threads), "
          "quadratic in the kept count", flush=True)
    (work / "bench_score.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
