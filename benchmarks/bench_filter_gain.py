"""Does CLIP-score filtering inside plait pay off on real data? train -> export -> score -> filter -> train again.

1. A noisy Fashion-MNIST training set: 40% of the 60k captions (a fixed-seed sample) replaced by the caption of a
   random other class, the others as in `plait demo`; sharded by plait prep like the demo (5,000 rows per shard).
2. The demo's model and config (pipeline/presets/demo.toml), trained on it for the demo's 360 steps (the demo's
   time cap is lifted so that both runs train exactly the same number of steps), exported in open_clip format.
3. `plait prep score` of the same noisy set with that export, then `plait prep filter --top-fraction 0.6`.
4. The same model trained from scratch on the kept set, same config, same 360 steps.
5. The ceilings, unless --no-ceilings: the same model and steps on the clean 60k (the demo's captions: what the
   noise costs) and on the 36k uncorrupted pairs alone (what a perfect filter would keep).
Printed and written to RUN_DIR/filter_gain.json: the filter's precision (share of corrupted pairs among the kept,
share of corrupted pairs among the removed), and zero-shot top-1 on the clean 10k test split for every run.

Run under the shared lock: `flock /tmp/plait-bench.lock python benchmarks/bench_filter_gain.py`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.maintenance import merge as merge_mod  # noqa: E402
from data_prep.curate.filter import FilterOptions, filter_dataset  # noqa: E402
from data_prep.options import JobOptions, SourceOptions  # noqa: E402
from data_prep.job.plan import sample_key  # noqa: E402
from data_prep.job.run import run_task  # noqa: E402
from data_prep.curate.score import ScoreOptions, format_summary, score  # noqa: E402
from data_prep.input.sources import FASHION_MNIST_CLASSES, fashion_mnist_caption, read_rows  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.demo import DEMO_PRESET, FASHION_MNIST_DIR, shard_split  # noqa: E402
from pipeline.artifacts.export import export_open_clip, load_checkpoint_model  # noqa: E402
from pipeline.train.loop import run as train  # noqa: E402


def noisy_rows(source: str, fraction: float, seed: int, limit: int | None = None):
    """The training rows with round(fraction * 60k) captions, drawn with `seed`, replaced by a caption of another
    class (uniform over the other nine, the template drawn as the demo draws it for that row)."""
    rows = list(itertools.islice(read_rows(SourceOptions(source, "fashion-mnist", split="train")), limit))
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(rows)), round(fraction * len(rows))))
    for i in sorted(chosen):
        row = rows[i]
        other = (row.extra["cls"] + rng.randrange(1, len(FASHION_MNIST_CLASSES))) % len(FASHION_MNIST_CLASSES)
        row.caption = fashion_mnist_caption(row.index, other)
    return rows, {sample_key(i) for i in chosen}


def shard_rows(folder: Path, rows: list, processes: int) -> None:
    """Fashion-MNIST rows into shards with plait prep, as the demo shards them (skipped when already done)."""
    if not (folder / "manifest.json").exists():
        opts = JobOptions(output=str(folder), source=SourceOptions(FASHION_MNIST_DIR, "fashion-mnist", split="train"),
                          samples_per_shard=5000)
        run_task(opts, processes, rows=iter(rows), progress=False)
        merge_mod.merge(str(folder))


def shard_spec(folder: Path) -> str:
    names = sorted(json.loads((folder / "sizes.json").read_text()))
    return str(folder / f"{{{Path(names[0]).stem}..{Path(names[-1]).stem}}}.tar")


def train_on(shards: str, test_shards: str, run_dir: Path, steps: int) -> dict:
    """The demo's training on `shards`; a finished run's report is reused (the script resumes stage by stage)."""
    if (run_dir / "report.json").exists():
        report = json.loads((run_dir / "report.json").read_text())
        if report.get("steps") == steps and "checkpoint" in report:
            return report
    cfg = load_config(DEMO_PRESET, [f"data.train_shards={json.dumps(shards)}",
                                    f"eval.zeroshot_shards={json.dumps(test_shards)}",
                                    f"eval.classnames={json.dumps(list(FASHION_MNIST_CLASSES))}",
                                    f"train.run_dir={json.dumps(str(run_dir))}", f"train.steps={steps}",
                                    "train.max_time_s=100000.0"])
    # a killed experiment continues from its last checkpoint (plait's resume is exact: same data order)
    return train(cfg, resume="auto")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/filter_gain")
    p.add_argument("--noise", type=float, default=0.4, help="share of the captions replaced")
    p.add_argument("--keep", type=float, default=0.6, help="--top-fraction of the filter")
    p.add_argument("--steps", type=int, default=None, help="training steps of both runs (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=2, help="prep processes")
    p.add_argument("--limit", type=int, default=None, help="first N training images only (a smoke run)")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="skip the two reference runs (clean 60k, and the uncorrupted pairs alone)")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    steps = a.steps or load_config(DEMO_PRESET, []).train.steps
    t0 = time.monotonic()
    timings = {}

    noisy = run_dir / "noisy"
    rows, corrupted = noisy_rows(FASHION_MNIST_DIR, a.noise, a.seed, a.limit)
    shard_rows(noisy, rows, a.processes)
    del rows
    replaced = set(corrupted)  # before prep's dedup: the perfect filter's set leaves these out
    test_shards = shard_split(Path(FASHION_MNIST_DIR), "test", run_dir / "test", 5000)
    timings["prep_s"] = time.monotonic() - t0
    table = pq.read_table(noisy / "samples.parquet", columns=["key", "status"])
    keys = {k for k, s in zip(table.column("key").to_pylist(), table.column("status").to_pylist()) if s == "ok"}
    corrupted &= keys  # prep's exact dedup may have dropped a few images
    print(f"noisy set: {len(keys)} samples, {len(corrupted)} corrupted ({len(corrupted) / len(keys):.1%})",
          flush=True)

    t = time.monotonic()
    noisy_result = train_on(shard_spec(noisy), test_shards, run_dir / "train_noisy", steps)
    timings["train_noisy_s"] = time.monotonic() - t
    state, model_cfg = load_checkpoint_model(noisy_result["checkpoint"])
    export = export_open_clip(state, model_cfg, run_dir / "export_noisy")
    print(f"noisy-trained: zero-shot top-1 {noisy_result['zeroshot']['top1']:.1%} after {noisy_result['steps']} "
          "steps", flush=True)

    t = time.monotonic()
    summary = score(ScoreOptions(str(noisy), str(export), out=str(run_dir / "scores"), batch_size=256,
                                 num_workers=1, embeddings=True, progress=False))
    timings["score_s"] = time.monotonic() - t
    print(format_summary(summary), flush=True)
    t = time.monotonic()
    filtered = run_dir / "filtered"
    result = filter_dataset(FilterOptions(str(noisy), str(filtered), scores=str(run_dir / "scores"),
                                          top_fraction=a.keep, progress=False))
    timings["filter_s"] = time.monotonic() - t
    records = pq.read_table(filtered / "samples.parquet", columns=["key", "status"]).to_pylist()
    kept = {r["key"] for r in records if r["status"] == "ok"}
    removed = {r["key"] for r in records if r["status"] != "ok"}
    precision = {
        "kept": len(kept), "removed": len(removed),
        "corrupted_among_kept": len(kept & corrupted) / len(kept),
        "corrupted_among_removed": len(removed & corrupted) / len(removed) if removed else None,
        "corrupted_removed_of_all_corrupted": len(removed & corrupted) / len(corrupted),
    }
    print(f"filter: kept {len(kept)}, {precision['corrupted_among_kept']:.1%} of them corrupted; "
          f"{precision['corrupted_among_removed']:.1%} of the removed were corrupted", flush=True)

    t = time.monotonic()
    filtered_result = train_on(shard_spec(filtered), test_shards, run_dir / "train_filtered", steps)
    timings["train_filtered_s"] = time.monotonic() - t
    report = {
        "noise": a.noise, "keep": a.keep, "steps": steps, "seed": a.seed,
        "noisy": {"zero_shot_top1": noisy_result["zeroshot"]["top1"], "steps": noisy_result["steps"],
                  "samples_per_s": noisy_result.get("samples_per_s"), "final_loss": noisy_result.get("final_loss")},
        "filtered": {"zero_shot_top1": filtered_result["zeroshot"]["top1"], "steps": filtered_result["steps"],
                     "samples_per_s": filtered_result.get("samples_per_s"),
                     "final_loss": filtered_result.get("final_loss")},
        "filter": precision, "score_summary": summary, "filter_cutoff": result["filter"].get("top_fraction_cutoff"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "total_s": round(time.monotonic() - t0, 1),
    }
    if a.ceilings:
        clean_rows, _ = noisy_rows(FASHION_MNIST_DIR, 0.0, a.seed, a.limit)
        sets = {"clean": clean_rows,
                "perfect_filter": [r for i, r in enumerate(clean_rows) if sample_key(i) not in replaced]}
        for name, name_rows in sets.items():
            shard_rows(run_dir / name, name_rows, a.processes)
            t = time.monotonic()
            ceiling = train_on(shard_spec(run_dir / name), test_shards, run_dir / f"train_{name}", steps)
            timings[f"train_{name}_s"] = time.monotonic() - t
            report[name] = {"samples": len(name_rows), "zero_shot_top1": ceiling["zeroshot"]["top1"],
                            "steps": ceiling["steps"]}
        report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        report["total_s"] = round(time.monotonic() - t0, 1)
    gain = report["filtered"]["zero_shot_top1"] - report["noisy"]["zero_shot_top1"]
    report["gain_points"] = 100 * gain
    (run_dir / "filter_gain.json").write_text(json.dumps(report, indent=2))
    print(f"zero-shot top-1 on the clean test split: noisy-trained {report['noisy']['zero_shot_top1']:.1%}, "
          f"filtered-trained {report['filtered']['zero_shot_top1']:.1%} ({100 * gain:+.1f} points; target >= +5)")
    print(f"removed pairs that were corrupted: {precision['corrupted_among_removed']:.1%} (target >= 90%); "
          f"corrupted among kept: {precision['corrupted_among_kept']:.1%}")
    if a.ceilings:
        noisy_top1, best = report["noisy"]["zero_shot_top1"], report["perfect_filter"]["zero_shot_top1"]
        clean = report["clean"]
        print(f"ceilings: clean {clean['samples']:,} {clean['zero_shot_top1']:.1%} (the noise costs "
              f"{100 * (clean['zero_shot_top1'] - noisy_top1):.1f} points), the "
              f"{report['perfect_filter']['samples']} uncorrupted pairs alone {best:.1%} (a perfect filter: "
              f"{100 * (best - noisy_top1):+.1f} points); this filter got "
              f"{gain / (best - noisy_top1):.0%} of the perfect filter's gain" if best > noisy_top1 else
              f"ceilings: clean {clean['zero_shot_top1']:.1%}, perfect filter {best:.1%}")
    print(f"timings: {report['timings_s']}, total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
