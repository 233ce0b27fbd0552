"""Training-loop overhead: steps/s of `plait train` vs a minimal hand-written open_clip + ClipLoss + AdamW loop.

Same model (`tiny-bench`: ViT 4x256 at 64 px, text 4x256), same batch (128), same shards and transforms, in the
same process, alternating rounds so that machine load hits both alike; medians of per-step times. Also prints the model FLOP/s of each
against this machine's measured fp32 matmul peak (MFU).

    .venv/bin/python benchmarks/bench_train.py [--shards SPEC] [--steps 12] [--rounds 2]
    .venv/bin/python benchmarks/bench_train.py --report-to tensorboard,wandb,mlflow [--rounds 4]

Target: plait >= 0.95x the hand-written loop. With --report-to, the same plait loop with those trackers against
none (train.report_to=[]), alternating rounds, and the cost of one record's tracker calls; target: trackers cost
<= 2% of the step time. wandb runs offline and MLflow logs to a SQLite file in a temporary folder unless
WANDB_MODE / MLFLOW_TRACKING_URI say otherwise: nothing leaves the machine by default.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import webdataset as wds
from open_clip.loss import ClipLoss
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import load_config, to_dict  # noqa: E402
from pipeline.models.sizes import model_config  # noqa: E402
from pipeline.train import metrics  # noqa: E402
from pipeline.train.loop import build_accelerator, run  # noqa: E402

MODEL, BATCH = "tiny-bench", 128


def plait_config(shards: str, steps: int, run_dir: Path, report_to: list[str] | None = None):
    return load_config(None, [f"model.name={MODEL}", f"data.train_shards={shards}", f"data.batch_size={BATCH}",
                              "data.num_workers=1", "train.device=cpu", f"train.steps={steps}",
                              "train.log_every=1", f"train.run_dir={run_dir}", "optim.warmup_steps=2"]
                       + ([] if report_to is None else [f"train.report_to={json.dumps(report_to)}"]))


def plait_step_times(shards: str, steps: int, warmup: int, run_dir: Path,
                     report_to: list[str] | None = None) -> list[float]:
    """Seconds per step after `warmup` steps, from the metrics log (a record every step: the pessimistic case,
    with the loss all-reduce and grad-norm of logging in every step, and every tracker called at every step).
    `report_to` None: train.report_to's default (tensorboard)."""
    run(plait_config(shards, steps, run_dir, report_to))
    elapsed = [json.loads(x)["elapsed_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:])]


def hand_step_times(shards: str, steps: int, warmup: int) -> list[float]:
    """The minimal loop a user would write: open_clip model, a webdataset pipeline, ClipLoss, AdamW."""
    torch.manual_seed(0)
    cfg = model_config(MODEL)
    model = open_clip.CLIP(**cfg, output_dict=True)
    transform = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards), wds.split_by_worker, wds.tarfile_to_samples(), wds.shuffle(500),
        wds.decode("pil"), wds.to_tuple("jpg", "txt"), wds.map_tuple(transform, lambda t: tokenizer([t])[0]),
        wds.batched(BATCH, partial=False))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=1).repeat(10)
    loss_fn = ClipLoss()
    # the fused kernel, as plait uses by default (optim.fused): the ratio then measures the loop, not the kernel
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    batches = iter(loader)
    times, last = [], time.perf_counter()
    for step in range(steps):
        images, texts = next(batches)
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        now = time.perf_counter()
        if step >= warmup:
            times.append(now - last)
        last = now
    return times


def flops_per_step() -> float:
    """Model FLOPs of one forward + backward at the benchmark batch (matmuls, convolutions, attention)."""
    cfg = model_config(MODEL)
    model = open_clip.CLIP(**cfg, output_dict=True)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(BATCH, 3, size, size)
    texts = torch.randint(1, 49000, (BATCH, cfg["text_cfg"]["context_length"]))
    with FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return float(counter.get_total_flops())


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def record_log_s(records: list[dict], run_dir: Path, report_to: list[str], repeats: int = 5) -> float:
    """Seconds per record of MetricsLog.write (metrics.jsonl + the trackers' log calls), over `records` logged
    `repeats` times at increasing steps; the best of three passes."""
    cfg = plait_config("unused.tar", 1, run_dir, report_to)
    run_dir.mkdir(parents=True)
    log = metrics.MetricsLog(run_dir, build_accelerator(cfg.train), enabled=True)
    log.start_trackers(to_dict(cfg), continuing={})
    best, step = float("inf"), 0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            for record in records:
                step += 1
                log.write({**record, "step": step})
        best = min(best, (time.perf_counter() - t) / (repeats * len(records)))
    log.accelerator.end_training()
    return best


def tracker_overhead(shards: str, trackers: list[str], args, tmp: Path) -> int:
    """Step times of the same plait loop with `trackers` and with none, alternating rounds; then the cost of one
    record's tracker calls, measured alone."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    bare, tracked, ratios = [], [], []
    for r in range(args.rounds):
        bare_round = plait_step_times(shards, args.steps, args.warmup, tmp / f"bare{r}", report_to=[])
        tracked_round = plait_step_times(shards, args.steps, args.warmup, tmp / f"tracked{r}", report_to=trackers)
        bare, tracked = bare + bare_round, tracked + tracked_round
        ratios.append(statistics.median(tracked_round) / statistics.median(bare_round))
        # This round's own medians: a round that machine load slowed shows here, and in neither column alone.
        print(f"round {r}: median s/step without trackers {statistics.median(bare_round):.4f}, "
              f"with {','.join(trackers)} {statistics.median(tracked_round):.4f} "
              f"(ratio {ratios[-1]:.4f})", flush=True)
    records = [json.loads(x) for x in (tmp / "tracked0/metrics.jsonl").read_text().splitlines()]
    jsonl_s = record_log_s(records, tmp / "log-bare", [])
    tracked_s = record_log_s(records, tmp / "log-tracked", trackers)
    step_s = statistics.median(bare)
    print(f"model {MODEL}, batch {BATCH}, a record every step ({len(records[0])} fields), "
          f"{args.rounds} rounds x {args.steps - args.warmup} timed steps")
    print(f"without trackers: {1 / step_s:.3f} steps/s ({step_s:.4f} s/step)")
    print(f"with {','.join(trackers)}: {1 / statistics.median(tracked):.3f} steps/s "
          f"({statistics.median(tracked):.4f} s/step)")
    print(f"step-time ratio with / without: {statistics.median(tracked) / step_s:.4f} (target <= 1.02); "
          f"median of the rounds' ratios {statistics.median(ratios):.4f}")
    print(f"one record alone: metrics.jsonl {jsonl_s * 1e3:.2f} ms, with the trackers {tracked_s * 1e3:.2f} ms: "
          f"the trackers' calls are {(tracked_s - jsonl_s) / step_s:.2%} of a step")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="", help="training shards (default: write Fashion-MNIST ones)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report-to", default="", metavar="NAMES",
                        help="comma-separated trackers (tensorboard,wandb,mlflow): compare plait with them against "
                             "plait without trackers, instead of against the hand-written loop")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if not shards:
            from tests.helpers.fmnist_fixture import spec, write_shards
            shards = spec(write_shards(Path(tmp) / "shards", "train", 2048, per_shard=512, fmt="jpg"))
        if args.report_to:
            return tracker_overhead(shards, args.report_to.split(","), args, Path(tmp))
        plait, hand = [], []
        for r in range(args.rounds):
            plait += plait_step_times(shards, args.steps, args.warmup, Path(tmp) / f"run{r}")
            hand += hand_step_times(shards, args.steps, args.warmup)
            print(f"round {r}: median s/step plait {statistics.median(plait):.3f}, "
                  f"hand-written {statistics.median(hand):.3f}", flush=True)
    flops, peak = flops_per_step(), matmul_peak_flops()
    # Medians of per-step times: robust to the load spikes of a shared machine.
    best_plait, best_hand = 1 / statistics.median(plait), 1 / statistics.median(hand)
    print(f"model {MODEL}, batch {BATCH}: {flops / 1e9:.1f} GFLOP per step (forward + backward, text at the full "
          f"context: the hand-written loop's work; plait runs the text tower on packed captions, without the "
          f"padding, so its figure below counts some FLOPs it skipped)")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(f"plait train:   {best_plait:.3f} steps/s, {best_plait * flops / 1e9:.1f} GFLOP/s, "
          f"MFU {best_plait * flops / peak:.1%}")
    print(f"hand-written:  {best_hand:.3f} steps/s, {best_hand * flops / 1e9:.1f} GFLOP/s, "
          f"MFU {best_hand * flops / peak:.1%}")
    print(f"ratio plait / hand-written: {best_plait / best_hand:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
