"""`plait demo`: the whole pipeline on real data (Fashion-MNIST) in one command, with a short report.

shards (data_prep) -> streaming loader -> contrastive training (Accelerate, CPU) -> zero-shot on the 10k test split
with prompts unlike the training captions -> open_clip export -> reload with open_clip, same embeddings -> report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import open_clip

from data_prep import cli as prep_cli
from data_prep.input.sources import FASHION_MNIST_CLASSES
from pipeline.config import load_config
from pipeline.artifacts.export import embeddings, export, fixed_batch, load_checkpoint_model, load_source
from pipeline.models.towers import build_clip
from pipeline.train.loop import run as train

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEMO_PRESET = "demo"  # pipeline/presets/demo.toml, inside the package: `plait demo` runs from any directory


def shard_split(source: Path, split: str, out: Path, samples_per_shard: int) -> str:
    """Shards one Fashion-MNIST split with `plait prep shard` (a rerun skips finished shards)."""
    prep_cli.main(["shard", "--input", str(source), "--input-format", "fashion-mnist",
                   "--split", split, "--output", str(out), "--samples-per-shard", str(samples_per_shard),
                   "--no-progress"])
    sizes = json.loads((out / "sizes.json").read_text())
    names = sorted(sizes)
    return str(out / f"{{{Path(names[0]).stem}..{Path(names[-1]).stem}}}.tar") if len(names) > 1 else str(out / names[0])


def check_reload(export_dir: Path, checkpoint: str) -> float:
    """Max |difference| between the embeddings of open_clip's reload and of the training checkpoint."""
    state, model_cfg = load_checkpoint_model(checkpoint)
    trained = build_clip(model_cfg)
    trained.load_state_dict(state)
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    images, tokens = fixed_batch(model_cfg)
    a, b = embeddings(trained, images, tokens), embeddings(reloaded, images, tokens)
    return max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plait demo", description=__doc__.split("\n\n")[0], epilog=(
        "Writes RUN_DIR/report.json, loss.png, metrics.jsonl, checkpoints/ and export/ (open_clip format)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo", help="where shards, checkpoints and the report go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the demo preset (pipeline/presets/demo.toml), e.g. --set train.steps=50")
    parser.add_argument("--samples-per-shard", type=int, default=5000, help="shard size for both splits")
    parser.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST idx gz "
                        "files (Debian package dataset-fashion-mnist)")
    args = parser.parse_args(argv)
    source = Path(args.fashion_mnist)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found: install the Debian package dataset-fashion-mnist "
                                "(`make demo` does)")
    started = time.monotonic()
    run_dir = Path(args.run_dir)
    print(f"[1/4] sharding Fashion-MNIST into {run_dir}/shards ...", flush=True)
    train_shards = shard_split(source, "train", run_dir / "shards" / "train", args.samples_per_shard)
    test_shards = shard_split(source, "test", run_dir / "shards" / "test", args.samples_per_shard)

    cfg = load_config(DEMO_PRESET, [f"data.train_shards={json.dumps(train_shards)}",
                                    f"eval.zeroshot_shards={json.dumps(test_shards)}",
                                    f"eval.classnames={json.dumps(list(FASHION_MNIST_CLASSES))}",
                                    f"train.run_dir={json.dumps(str(run_dir))}", *args.overrides])
    print(f"[2/4] training {cfg.model.name} for {cfg.train.steps} steps (at most {cfg.train.max_time_s:.0f} s) "
          "...", flush=True)
    result = train(cfg)

    print("[3/4] exporting in open_clip format and reloading ...", flush=True)
    # the card plait export writes: built from the run dir (steps, objectives, datasets, recorded evaluations)
    export_dir = export(load_source(result["checkpoint"]), "open_clip", run_dir / "export")
    reload_error = check_reload(export_dir, result["checkpoint"])
    if reload_error > 1e-5:
        raise RuntimeError(f"reloaded model's embeddings differ by {reload_error:.2e}")

    report = {
        "zero_shot_top1": result["zeroshot"]["top1"], "zero_shot_top5": result["zeroshot"]["top5"],
        "zero_shot_per_class": result["zeroshot"]["per_class"],
        "final_loss": result.get("final_loss"), "samples_per_s": result.get("samples_per_s"),
        "data_wait_fraction": result.get("data_wait_fraction"), "steps": result["steps"],
        "samples_seen": result["samples_seen"], "train_wall_s": result["wall_s"],
        "total_wall_s": time.monotonic() - started, "export": str(export_dir),
        "reload_max_abs_diff": reload_error, "eval_templates": list(cfg.eval.templates),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print("[4/4] report", flush=True)
    print(f"  zero-shot top-1     {report['zero_shot_top1']:.1%}  (top-5 {report['zero_shot_top5']:.1%}, "
          f"{result['zeroshot']['num_samples']} test images, prompts unseen in training)")
    print(f"  final loss          {report['final_loss']:.3f}")
    print(f"  throughput          {report['samples_per_s']:.0f} samples/s "
          f"(data wait {report['data_wait_fraction']:.1%})")
    print(f"  training            {report['steps']} steps, {report['samples_seen']} samples, "
          f"{report['train_wall_s']:.0f} s")
    print(f"  export              {export_dir} (open_clip reload: max |diff| {reload_error:.1e})")
    print(f"  wall time           {report['total_wall_s']:.0f} s; report.json and loss.png in {run_dir}")
    return 0
