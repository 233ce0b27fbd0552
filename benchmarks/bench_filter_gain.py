"""Does CLIP-score filtering inside plait pay off on real data, and with which scorer? train -> export -> score ->
filter -> train again.

1. A noisy Fashion-MNIST training set: 40% of the 60k captions (a fixed-seed sample) replaced by the caption of a
   random other class, the others as in `plait demo`; sharded by plait prep like the demo (5,000 rows per shard).
2. The demo's model and config (pipeline/presets/demo.toml), trained on it for the demo's 360 steps (the demo's
   time cap is lifted so that every run trains exactly the same number of steps), exported in open_clip format.
3. One row per scorer (--scorers): `plait prep score` of the noisy set with that scorer's export, `plait prep
   filter --top-fraction 0.6`, and the demo's model trained from scratch on the kept set, same config and steps.
   Scorers:
     noisy     the model of step 2 (trained on the noisy set itself)
     iterated  the model retrained on the `noisy` scorer's kept set (a second round: it saw cleaner data)
     trusted   the demo's model trained for the same steps on a small trusted subset alone: --trusted clean pairs
               (a fixed-seed sample of the training images with their true captions)
     lit       the `lit-fmnist` preset (the demo's image tower against the locked pretrained MiniLM text tower)
               trained on the noisy set
4. The ceilings, unless --no-ceilings: the same model and steps on the 36k uncorrupted pairs alone (what a perfect
   filter would keep) and on the clean 60k (the demo's captions: what the noise costs).
5. Unless --no-decontaminate: the `noisy` scorer's filter again with `--decontaminate` against the test split
   (embedding cosine and pHash), and the model retrained on what it keeps: how many training images are
   near-duplicates of test images, and what zero-shot top-1 is without them.
Printed and written to RUN_DIR/filter_gain.json: per scorer the filter's precision (share of corrupted pairs among
the kept and among the removed), zero-shot top-1 on the clean 10k test split, and the share of the perfect
filter's gain it recovers.

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


SCORERS = ("noisy", "iterated", "trusted", "lit")
LIT_PRESET = "lit-fmnist"


def train_on(shards: str, test_shards: str, run_dir: Path, steps: int, preset: str = DEMO_PRESET) -> dict:
    """`preset`'s training on `shards`; a finished run's report is reused (the script resumes stage by stage)."""
    if (run_dir / "report.json").exists():
        report = json.loads((run_dir / "report.json").read_text())
        if report.get("steps") == steps and "checkpoint" in report:
            return report
    cfg = load_config(preset, [f"data.train_shards={json.dumps(shards)}",
                               f"eval.zeroshot_shards={json.dumps(test_shards)}",
                               f"eval.classnames={json.dumps(list(FASHION_MNIST_CLASSES))}",
                               f"train.run_dir={json.dumps(str(run_dir))}", f"train.steps={steps}",
                               "train.max_time_s=100000.0"])
    # a killed experiment continues from its last checkpoint (plait's resume is exact: same data order)
    return train(cfg, resume="auto")


def export_of(report: dict, folder: Path) -> Path:
    if not (folder / "open_clip_config.json").exists():
        state, model_cfg = load_checkpoint_model(report["checkpoint"])
        export_open_clip(state, model_cfg, folder)
    return folder


def filter_precision(filtered: Path, corrupted: set[str]) -> dict:
    records = pq.read_table(filtered / "samples.parquet", columns=["key", "status", "reason"]).to_pylist()
    kept = {r["key"] for r in records if r["status"] == "ok"}
    removed = {r["key"] for r in records if r["status"] != "ok"}
    return {
        "kept": len(kept), "removed": len(removed),
        "corrupted_among_kept": len(kept & corrupted) / len(kept),
        "corrupted_among_removed": len(removed & corrupted) / len(removed) if removed else None,
        "corrupted_removed_of_all_corrupted": len(removed & corrupted) / len(corrupted),
    }


def score_filter_train(name: str, noisy: Path, export: Path, run_dir: Path, a, steps: int, test_shards: str,
                       corrupted: set[str], timings: dict, decontaminate: tuple[str, ...] = (),
                       retrain: bool = True) -> dict:
    """One row: score the noisy set with `export`, keep the best --keep, retrain from scratch on the kept set."""
    scores = run_dir / f"scores_{name.split('_')[0]}"  # the decontamination row reuses its scorer's scores
    t = time.monotonic()
    summary = score(ScoreOptions(str(noisy), str(export), out=str(scores), batch_size=256, num_workers=1,
                                 embeddings=True, progress=False))
    timings[f"score_{name}_s"] = time.monotonic() - t
    print(f"[{name}] {format_summary(summary)}", flush=True)
    t = time.monotonic()
    filtered = run_dir / f"filtered_{name}"
    extra = {"decontaminate": decontaminate, "decontaminate_cosine": a.decontaminate_cosine,
             "decontaminate_hamming": a.decontaminate_hamming} if decontaminate else {}
    result = filter_dataset(FilterOptions(str(noisy), str(filtered), scores=str(scores), top_fraction=a.keep,
                                          progress=False, **extra))
    timings[f"filter_{name}_s"] = time.monotonic() - t
    precision = filter_precision(filtered, corrupted)
    print(f"[{name}] filter: kept {precision['kept']}, {precision['corrupted_among_kept']:.1%} of them corrupted; "
          f"{precision['corrupted_among_removed']:.1%} of the removed were corrupted", flush=True)
    row = {"scorer": name, "filter": precision, "score_summary": summary,
           "filter_cutoff": result["filter"].get("top_fraction_cutoff"), "zero_shot_top1": None}
    if retrain:
        t = time.monotonic()
        trained = train_on(shard_spec(filtered), test_shards, run_dir / f"train_filtered_{name}", steps)
        timings[f"train_filtered_{name}_s"] = time.monotonic() - t
        print(f"[{name}] retrained on the kept set: zero-shot top-1 {trained['zeroshot']['top1']:.1%}", flush=True)
        row.update(zero_shot_top1=trained["zeroshot"]["top1"], steps=trained["steps"],
                   samples_per_s=trained.get("samples_per_s"), final_loss=trained.get("final_loss"))
    if decontaminate:
        row["decontamination"] = result["filter"].get("decontamination")
        row["reasons"] = result["reasons"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/filter_gain")
    p.add_argument("--noise", type=float, default=0.4, help="share of the captions replaced")
    p.add_argument("--keep", type=float, default=0.6, help="--top-fraction of the filter")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=2, help="prep processes")
    p.add_argument("--limit", type=int, default=None, help="first N training images only (a smoke run)")
    p.add_argument("--scorers", default=",".join(SCORERS),
                   help=f"comma-separated scorer rows, from {', '.join(SCORERS)} (iterated needs noisy)")
    p.add_argument("--trusted", type=int, default=6000, help="clean pairs the trusted scorer trains on")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="skip the reference run on the uncorrupted pairs alone (the perfect filter)")
    p.add_argument("--clean-ceiling", action="store_true", help="also train on the clean 60k (what the noise costs)")
    p.add_argument("--no-decontaminate", dest="decontaminate", action="store_false",
                   help="skip the decontamination row")
    # Fashion-MNIST's 28-px product shots: the filter's defaults (cosine 0.95, 8 bits) flag every training image,
    # and even pHash distance 0 pairs are look-alikes (results/2026-12-07-bench_filter_gain.md)
    p.add_argument("--decontaminate-cosine", type=float, default=0.0,
                   help="the decontamination row's embedding threshold (0: embeddings not used)")
    p.add_argument("--decontaminate-hamming", type=int, default=0,
                   help="the decontamination row's pHash threshold (bits)")
    p.add_argument("--decontaminate-retrain", action="store_true",
                   help="also retrain on the decontaminated kept set (else the row counts what it removes)")
    a = p.parse_args(argv)
    scorers = [s for s in a.scorers.split(",") if s]
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown or ("iterated" in scorers and "noisy" not in scorers):
        p.error(f"--scorers {a.scorers!r}: expected names from {', '.join(SCORERS)} (iterated needs noisy)")
    run_dir = Path(a.run_dir)
    steps = a.steps or load_config(DEMO_PRESET, []).train.steps
    t0 = time.monotonic()
    timings: dict[str, float] = {}

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
    print(f"noisy-trained: zero-shot top-1 {noisy_result['zeroshot']['top1']:.1%} after {noisy_result['steps']} "
          "steps", flush=True)
    report: dict = {
        "noise": a.noise, "keep": a.keep, "steps": steps, "seed": a.seed, "trusted": a.trusted,
        "noisy": {"zero_shot_top1": noisy_result["zeroshot"]["top1"], "steps": noisy_result["steps"],
                  "samples_per_s": noisy_result.get("samples_per_s"), "final_loss": noisy_result.get("final_loss")},
        "scorers": {},
    }

    def save() -> None:
        report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        report["total_s"] = round(time.monotonic() - t0, 1)
        (run_dir / "filter_gain.json").write_text(json.dumps(report, indent=2))

    if a.ceilings:  # first: every scorer row is read against the perfect filter
        clean_rows, _ = noisy_rows(FASHION_MNIST_DIR, 0.0, a.seed, a.limit)
        sets = {"perfect_filter": [r for i, r in enumerate(clean_rows) if sample_key(i) not in replaced]}
        if a.clean_ceiling:
            sets["clean"] = clean_rows
        for name, name_rows in sets.items():
            shard_rows(run_dir / name, name_rows, a.processes)
            t = time.monotonic()
            ceiling = train_on(shard_spec(run_dir / name), test_shards, run_dir / f"train_{name}", steps)
            timings[f"train_{name}_s"] = time.monotonic() - t
            report[name] = {"samples": len(name_rows), "zero_shot_top1": ceiling["zeroshot"]["top1"],
                            "steps": ceiling["steps"]}
            print(f"ceiling {name}: {len(name_rows)} pairs, zero-shot top-1 {ceiling['zeroshot']['top1']:.1%}",
                  flush=True)
        save()

    for name in scorers:
        t = time.monotonic()
        if name == "noisy":
            export = export_of(noisy_result, run_dir / "export_noisy")
        elif name == "iterated":
            export = export_of(json.loads((run_dir / "train_filtered_noisy" / "report.json").read_text()),
                               run_dir / "export_iterated")
        elif name == "trusted":
            clean_rows, _ = noisy_rows(FASHION_MNIST_DIR, 0.0, a.seed, a.limit)
            chosen = sorted(random.Random(a.seed + 1).sample(range(len(clean_rows)), min(a.trusted, len(clean_rows))))
            shard_rows(run_dir / "trusted", [clean_rows[i] for i in chosen], a.processes)
            del clean_rows
            trusted = train_on(shard_spec(run_dir / "trusted"), test_shards, run_dir / "train_trusted", steps)
            print(f"[trusted] scorer trained on {len(chosen)} clean pairs: zero-shot top-1 "
                  f"{trusted['zeroshot']['top1']:.1%}", flush=True)
            export = export_of(trusted, run_dir / "export_trusted")
            report["trusted_scorer_zero_shot_top1"] = trusted["zeroshot"]["top1"]
        else:  # lit
            lit = train_on(shard_spec(noisy), test_shards, run_dir / "train_lit", steps, preset=LIT_PRESET)
            print(f"[lit] scorer trained on the noisy set: zero-shot top-1 {lit['zeroshot']['top1']:.1%}",
                  flush=True)
            export = export_of(lit, run_dir / "export_lit")
            report["lit_scorer_zero_shot_top1"] = lit["zeroshot"]["top1"]
        timings[f"scorer_{name}_s"] = time.monotonic() - t
        report["scorers"][name] = score_filter_train(name, noisy, export, run_dir, a, steps, test_shards, corrupted,
                                                     timings)
        save()

    if a.decontaminate:
        export = export_of(noisy_result, run_dir / "export_noisy")
        try:
            report["decontaminated"] = score_filter_train("noisy_decontaminated", noisy, export, run_dir, a, steps,
                                                          test_shards, corrupted, timings,
                                                          decontaminate=(str(run_dir / "test"),),
                                                          retrain=a.decontaminate_retrain)
        except ValueError as e:  # thresholds that flag everything: the filter keeps nothing, a result in itself
            report["decontaminated"] = {"scorer": "noisy_decontaminated", "error": str(e), "zero_shot_top1": None}
            print(f"[noisy_decontaminated] {e}", flush=True)
        save()

    noisy_top1 = report["noisy"]["zero_shot_top1"]
    best = report.get("perfect_filter", {}).get("zero_shot_top1")
    rows_out = [r for r in list(report["scorers"].values()) + [report.get("decontaminated")]
                if r and r["zero_shot_top1"] is not None]
    for row in rows_out:
        row["gain_points"] = 100 * (row["zero_shot_top1"] - noisy_top1)
        row["share_of_perfect_gain"] = ((row["zero_shot_top1"] - noisy_top1) / (best - noisy_top1)
                                        if best is not None and best > noisy_top1 else None)
    save()
    print(f"zero-shot top-1 on the clean test split, {steps} steps: noisy-trained {noisy_top1:.1%}")
    if best is not None:
        print(f"  perfect filter ({report['perfect_filter']['samples']} uncorrupted pairs): {best:.1%} "
              f"({100 * (best - noisy_top1):+.1f} points)" + (f"; clean 60k: {report['clean']['zero_shot_top1']:.1%}"
                                                      if "clean" in report else ""))
    for row in rows_out:
        share = row["share_of_perfect_gain"]
        print(f"  scorer {row['scorer']:<22} removed {row['filter']['corrupted_among_removed']:.1%} corrupted, "
              f"kept {row['filter']['corrupted_among_kept']:.1%} corrupted; retrained {row['zero_shot_top1']:.1%} "
              f"({row['gain_points']:+.1f} points" + (f", {share:.0%} of the perfect filter's gain)" if share is not None
                                                      else ")"))
    if "decontaminated" in report:
        print(f"  decontamination: {report['decontaminated'].get('decontamination')}")
    print(f"timings: {report['timings_s']}, total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
