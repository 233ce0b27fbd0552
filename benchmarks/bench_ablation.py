"""Objectives ablation on Fashion-MNIST shards at a fixed CPU budget.

Every configuration trains the same model (`fmnist-vit56`: 28 px images upsampled to 56 px, 7 px patches, 64
tokens, so that FLIP's masking has tokens to drop; a 6-layer image tower, a 2-layer text tower) from the same seed
on the same in-memory batches for the same CPU time (--budget-cpu-s of this process, both threads counted: robust
to other jobs on the machine), then is evaluated on the same held-out images. A faster objective therefore trains
more steps, which is FLIP's point.
  samples/s   median step time (augment + forward + loss + backward + AdamW) of fresh models, measured in
              interleaved rounds before training so that load from other processes hits every configuration
              alike; its CPU time per step sets the configuration's step count for the budget;
  run/s       the training run's own samples/s; the configurations train in turns, each an equal share of its
              steps, so that the machine's drift over the minutes of training hits them alike;
  zero-shot   top-1 over the 10 classes with prompts unlike the training captions (contrastive/SigLIP heads);
  probe       linear-probe top-1 on the frozen image embeddings (every configuration, the autoencoder too);
  recon       MAE masked-patch loss / MLM token loss (whole vocabulary) / ITM matching loss / caption
              next-token cross-entropy / autoencoder L_img + L_txt on held-out training batches;
  captions    for the caption configurations, greedy captions of --caption-samples test images scored with
              BLEU-4 and CIDEr (pycocoevalcap) against the class named in the evaluation templates, which the
              training captions never use, and the share of captions that name the true class.
--equal-steps NAME... adds a contrastive run with as many steps as each named configuration trained (the cost of
its objective at equal steps rather than equal CPU).
Ratios against the contrastive baseline (and masked objectives against contrastive + FLIP), paired round by
round in the timing, are printed with the issue's targets.
Usage: .venv/bin/python benchmarks/bench_ablation.py [--budget-cpu-s 80] [--only flip50 ...] [--equal-steps NAME ...]

The defaults (80 CPU-seconds, ~40 s on 2 quiet cores, per configuration; batch 64) take about a minute per
configuration (under heavy load from other jobs, 2-3x that: the CPU budget holds, the wall time does not). That is far from convergence: the accuracy columns compare objectives at equal, small
compute, not their final quality.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.input.sources import FASHION_MNIST_CLASSES  # noqa: E402
from pipeline.config import DataConfig, ObjectiveConfig, OptimConfig, load_config  # noqa: E402
from pipeline.data.loader import TrainStream  # noqa: E402
from pipeline.train.distributed import World  # noqa: E402
from pipeline.eval.evaluate import class_embeddings, labelled_images, linear_probe  # noqa: E402
from pipeline.eval.caption import caption_metrics  # noqa: E402
from pipeline.models.caption_head import captioner_for, decode, greedy  # noqa: E402
from pipeline.models.model import build_model  # noqa: E402
from pipeline.models.sizes import model_config  # noqa: E402
from pipeline.models.towers import tokenizer_for  # noqa: E402
from pipeline.objectives.combined import Objective, clamp_logit_scale  # noqa: E402
from pipeline.train.optim import build_optimizer, lr_factor  # noqa: E402
from pipeline.data.transforms import image_transform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fmnist-vit56"
FLIP = {"flip": {"mask_ratio": 0.5}}
# MAE's decoder is meant to be light next to the encoder (MAE's ViT-L: ~1/10 of the encoder's compute); the default
# 2 x 128 decoder over all 64 positions (MAE's) outweighs this 6 x 96 encoder over 32 visible ones, so the ablation
# scales it down to 1 x 48 (~1/12 of the encoder's FLOPs; CrossMAE's, over the 32 masked positions only, half that).
LIGHT_DECODER = {"decoder_width": 48, "decoder_layers": 1}
MAE_SELF = {"mae": {"weight": 1.0, "decoder": "self", **LIGHT_DECODER}}
MAE_CROSS = {"mae": {"weight": 1.0, "decoder": "cross", **LIGHT_DECODER}}
# A 49k-way softmax per masked token costs more than this 2 x 96 text tower: MLM trains on a sampled softmax
# (the held-out MLM loss in the table always scores the whole vocabulary).
MLM = {"mlm": {"weight": 1.0, "candidates": 1024}}
NO_CONTRASTIVE = {"contrastive": {"weight": 0.0}}
# Each configuration: [objective] sections (pipeline/objectives/), as a TOML file would give them.
CONFIGS = {
    "contrastive": {},
    "siglip": {**NO_CONTRASTIVE, "siglip": {"weight": 1.0}},
    "flip50": {**FLIP},
    "flip50+mae": {**FLIP, **MAE_SELF},
    "flip50+crossmae": {**FLIP, **MAE_CROSS},
    "flip50+mlm": {**FLIP, **MLM},
    "flip50+mae+mlm": {**FLIP, **MAE_SELF, **MLM},
    "flip50+crossmae+mlm": {**FLIP, **MAE_CROSS, **MLM},
    "ae-concat": {**NO_CONTRASTIVE, "autoencoder": {"weight": 1.0, "fusion": "concat"}},
    "ae-bilinear": {**NO_CONTRASTIVE, "autoencoder": {"weight": 1.0, "fusion": "bilinear"}},
    "ae-attention": {**NO_CONTRASTIVE, "autoencoder": {"weight": 1.0, "fusion": "attention"}},
    "contrastive+adversarial": {"adversarial": {"weight": 0.1}},
    "contrastive+adversarial-alt": {"adversarial": {"weight": 0.1, "mode": "alternating"}},
    "contrastive+itm": {"itm": {"weight": 1.0}},
    "flip50+itm": {**FLIP, "itm": {"weight": 1.0}},
    # CoCa's weights: caption 2.0 against contrastive 1.0; the default 2-block decoder at the text tower's width
    "contrastive+caption": {"caption": {"weight": 2.0}},
    "flip50+caption": {**FLIP, "caption": {"weight": 2.0}},
}


def objective_config(name: str, unmasked_steps: int = 0) -> ObjectiveConfig:
    """The configuration's sections, with FLIP's unmasked tail and the autoencoder's sampled softmax."""
    sections = {unit: dict(keys) for unit, keys in CONFIGS[name].items()}
    if "flip" in sections:
        sections["flip"]["unmasked_steps"] = unmasked_steps
    sections["autoencoder"] = {"text_candidates": 1024, **sections.get("autoencoder", {})}
    return ObjectiveConfig(**sections)


def ensure_shards(train: str, test: str) -> tuple[str, str]:
    """The ready Fashion-MNIST shards if present, else written with `plait prep shard` into a temp dir."""
    if Path(train.split("{")[0]).parent.exists() and Path(test.split("{")[0]).parent.exists():
        return train, test
    out = Path(tempfile.mkdtemp(prefix="plait-ablation-"))
    for split in ("train", "test"):
        subprocess.run([sys.executable, str(ROOT / "plait.py"), "prep", "shard", "--input",
                        "/usr/share/datasets/fashion-mnist", "--input-format", "fashion-mnist", "--split", split,
                        "--output", str(out / split)], check=True)
    shards = {s: sorted(p.name for p in (out / s).glob("*.tar")) for s in ("train", "test")}
    spec = {s: f"{out / s}/{{{shards[s][0][:-4]}..{shards[s][-1][:-4]}}}.tar" for s in shards}
    return spec["train"], spec["test"]


def load_batches(train: str, model_cfg: dict, batch_size: int, count: int) -> list[dict]:
    """`count` training batches decoded once (random-resized-crop augmentation applied once per sample)."""
    cfg = DataConfig(train_shards=train, batch_size=batch_size, num_workers=1, shuffle_buffer=2000, seed=0)
    stream = iter(TrainStream(cfg, World(), image_transform(model_cfg, is_train=True), tokenizer_for(model_cfg)))
    return [{k: v for k, v in next(stream).items() if k in ("image", "text")} for _ in range(count)]


def load_labelled(shards: str, model_cfg: dict, count: int) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = [], []
    for x, y in labelled_images(shards, image_transform(model_cfg, is_train=False), 256, max_samples=count):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels).numpy()


def train_step(model, objective, optimizer, batch: dict, step: int) -> torch.Tensor:
    augmented = objective.augment(batch, step)
    loss, _, _ = objective(model(augmented), augmented, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    clamp_logit_scale(model.clip, objective.cfg.max_logit_scale)
    return loss.detach()


@torch.no_grad()
def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.clip.encode_image(images[i:i + 512], normalize=True) for i in range(0, len(images), 512)])


@torch.no_grad()
def reconstruction(model, objective, batches: list[dict]) -> dict[str, float]:
    """Held-out reconstruction losses (unweighted) with the training masks' statistics."""
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        torch.manual_seed(10_000 + i)
        augmented = objective.augment(batch, 0)
        outputs = model(augmented)
        parts, units = {}, objective.units
        if "mae" in units:
            parts["mae"] = units["mae"].loss(outputs, augmented, 0)[0]
        if "mlm" in units:
            parts["mlm"] = units["mlm"].loss(outputs, augmented, 0)[0]
        if "itm" in units:
            parts["itm"] = units["itm"].loss(outputs, augmented, 0)[0]
        if "caption" in units:
            parts["caption"] = units["caption"].loss(outputs, augmented, 0)[0]
        if "autoencoder" in units:
            _, parts["txt"], parts["img"] = units["autoencoder"].loss_fn(
                outputs["ae_image_pred"], outputs["ae_image_target"], outputs["ae_text_logits"],
                outputs["ae_text_targets"])
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
    return sums


def fresh(name: str, args, model_cfg: dict, steps: int, unmasked: int = 0) -> dict:
    """A configuration's model, objective and optimizer from seed 0, scheduled for `steps` steps."""
    torch.manual_seed(0)
    cfg = objective_config(name, unmasked)
    model = build_model(dict(model_cfg), cfg)
    objective = Objective(cfg, World(), total_steps=steps)
    optim_cfg = OptimConfig(lr=args.lr, warmup_steps=max(1, steps // 10))
    return {"config": name, "_model": model, "_objective": objective, "_optim_cfg": optim_cfg,
            "_optimizer": build_optimizer(model, optim_cfg)}


def planned_steps(r: dict, base_cpu_s: float, args) -> tuple[int, int]:
    """(steps, unmasked steps) that fill the CPU budget: FLIP's final unmasked steps cost a contrastive step."""
    if "flip" not in CONFIGS[r["config"]]:
        return max(1, int(args.budget_cpu_s / r["cpu_step_s"])), 0
    masked_share = 1 - args.unmasked_fraction
    per_step = masked_share * r["cpu_step_s"] + args.unmasked_fraction * base_cpu_s
    steps = max(1, int(args.budget_cpu_s / per_step))
    return steps, round(args.unmasked_fraction * steps)


def train_lockstep(runs: list[dict], data: dict, chunk: int) -> None:
    """Trains every configuration for its planned steps, the configurations taking turns: each turn, every one trains
    the same share of its steps (`chunk` steps for the longest), so that all of them finish together.
    Trained one after another, two configurations' run/s strayed up to 30% from their timing rounds: the shared
    machine's speed drifts over the minutes of a run. Taking turns, every configuration meets the drift alike; with
    equal step counts per turn instead of equal shares, the short ones finished early and the last turns' drift
    fell on the long ones alone (FLIP's run/s 1.47x against 1.75x in the timing rounds, once)."""
    for r in runs:
        r.update(step=0, train_s=0.0, train_cpu_s=0.0)
        r["_model"].train()
    turns = max(1, math.ceil(max(r["steps"] for r in runs) / chunk))
    for turn in range(1, turns + 1):
        for r in runs:
            model, objective, optimizer, optim_cfg = r["_model"], r["_objective"], r["_optimizer"], r["_optim_cfg"]
            end = r["steps"] * turn // turns
            if end == r["step"]:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            for step in range(r["step"], end):
                for group in optimizer.param_groups:
                    group["lr"] = optim_cfg.lr * lr_factor(step, optim_cfg, r["steps"])
                loss = train_step(model, objective, optimizer, data["train"][step % len(data["train"])], step)
            r["final_loss"] = float(loss)
            r["train_s"] += time.perf_counter() - wall
            r["train_cpu_s"] += time.process_time() - cpu
            r["step"] = end
        done = sum(r["step"] for r in runs) / sum(r["steps"] for r in runs)
        print(f"\r  training in turns: {done:.0%}", end="", flush=True)
    print()


def evaluate(r: dict, data: dict, templates) -> dict:
    """Zero-shot and linear-probe top-1 on the held-out images, and the held-out reconstruction losses."""
    model, objective, cfg = r["_model"], r["_objective"], r["_objective"].cfg
    result = {k: v for k, v in r.items() if not k.startswith("_") and k != "step"}
    result["parameters_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    model.eval()
    test_x = image_embeddings(model, data["test_images"]).double().numpy()  # float64: linear_probe needs it
    if cfg.contrastive.weight or cfg.siglip.weight:
        weights = class_embeddings(model.clip, data["tokenize"], FASHION_MNIST_CLASSES, templates, "cpu")
        result["zeroshot_top1"] = float(((torch.as_tensor(test_x) @ weights.double().t()).argmax(1).numpy()
                                         == data["test_labels"]).mean())
    probe_x = image_embeddings(model, data["probe_images"]).double().numpy()
    result["probe_top1"] = linear_probe(probe_x, data["probe_labels"], test_x, data["test_labels"],
                                        cs=(0.1, 1.0, 10.0))["top1"]
    if "caption" in objective.units:
        result["captions"] = caption_scores(model, data, templates)
    model.train()
    result["recon"] = reconstruction(model, objective, data["val"])
    return result


@torch.no_grad()
def caption_scores(model, data: dict, templates) -> dict:
    """Greedy captions (plait caption's defaults: at most the text context, no end before 5 tokens) of the first
    test images, against references from the evaluation templates, which no training caption uses."""
    images, labels = data["caption_images"], data["caption_labels"]
    captioner = captioner_for(model)
    context = model.clip.context_length
    rows, cpu = [], time.process_time()
    for i in range(0, len(images), 64):
        ids = greedy(captioner, images[i:i + 64], max_length=context, min_length=5)
        rows += [{"key": str(i + j), "caption": c, "label": int(labels[i + j]),
                  "references": [t.format(FASHION_MNIST_CLASSES[int(labels[i + j])]) for t in templates]}
                 for j, c in enumerate(decode(ids))]
    cpu = time.process_time() - cpu
    scores = caption_metrics(rows, FASHION_MNIST_CLASSES)
    return {"bleu_4": scores["bleu_4"], "cider": scores["cider"], "names_true_class": scores["names_true_class"],
            "captions_per_cpu_s": len(rows) / cpu, "examples": [r["caption"] for r in rows[:4]]}


def interleaved_timing(runs: list[dict], batch: dict, rounds: int) -> None:
    """Median wall and CPU time per step of each (fresh) configuration, configurations taking turns so that
    machine load drifts evenly; each round's mean of two steps is kept (`round_step_s`) for paired ratios.
    Step 0: FLIP's masks on (its unmasked tail costs a contrastive step)."""
    cpu: dict[str, list[float]] = {r["config"]: [] for r in runs}
    for r in runs:  # warm-up: first-call allocations
        train_step(r["_model"], r["_objective"], r["_optimizer"], batch, 0)
        r["round_step_s"] = []
    for _ in range(rounds):
        for r in runs:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(2):
                train_step(r["_model"], r["_objective"], r["_optimizer"], batch, 0)
            r["round_step_s"].append((time.perf_counter() - t) / 2)
            cpu[r["config"]].append((time.process_time() - c) / 2)
    for r in runs:
        r["step_s"] = statistics.median(r["round_step_s"])
        r["cpu_step_s"] = statistics.median(cpu[r["config"]])
        r["samples_per_s"] = len(batch["text"]) / r["step_s"]


def paired_ratio(r: dict, base: dict) -> float:
    """Median over the timing rounds of r's step time over base's in the same round: the drift cancels."""
    return statistics.median(a / b for a, b in zip(r["round_step_s"], base["round_step_s"]))


def fmt(value, spec=".1%") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict], args) -> None:
    """`samples/s` and `vs base` from the interleaved timing rounds of fresh models (`vs base`: paired per round);
    `run/s` from the training runs themselves (steps x batch over their wall time, trained in turns; FLIP's unmasked
    tail included)."""
    base = next((r for r in results if r["config"] == "contrastive"), None)
    flip = next((r for r in results if r["config"] == "flip50"), None)
    for r in results:
        r["run_samples_per_s"] = r["steps"] * args.batch_size / r["train_s"]
    print(f"\nObjectives ablation: {MODEL}, {args.budget_cpu_s:g} CPU-seconds per configuration, batch "
          f"{args.batch_size}, {args.threads} threads, eval on {args.eval_samples} test images, probe "
          f"trained on {args.probe_samples}")
    print(f"{'config':28s} {'samples/s':>9s} {'vs base':>7s} {'run/s':>6s} {'steps':>6s} {'cpu s':>6s} "
          f"{'zero-shot':>9s} {'probe':>6s}  recon")
    for r in results:
        ratio = 1 / paired_ratio(r, base) if base else None
        recon = ", ".join(f"{k} {v:.3f}" for k, v in r["recon"].items()) or "-"
        if "captions" in r:
            c = r["captions"]
            recon += (f"; BLEU-4 {c['bleu_4']:.3f}, CIDEr {c['cider']:.3f}, names the class "
                      f"{c['names_true_class']:.1%}")
        print(f"{r['config']:28s} {r['samples_per_s']:9.1f} {fmt(ratio, '.2f'):>7s} {r['run_samples_per_s']:6.0f} "
              f"{r['steps']:6d} {r['train_cpu_s']:6.0f} {fmt(r.get('zeroshot_top1')):>9s} {fmt(r['probe_top1']):>6s}"
              f"  {recon}")
    if base and flip:
        speed = 1 / paired_ratio(flip, base)
        run_speed = flip["run_samples_per_s"] / base["run_samples_per_s"]
        acc = flip["zeroshot_top1"] / max(base["zeroshot_top1"], 1e-9)
        print(f"\nFLIP 50%: {speed:.2f}x the samples/s of unmasked in the timing rounds, {run_speed:.2f}x over the "
              f"training runs (target >= 1.6x), at {acc:.1%} of its zero-shot top-1 (target >= 95%)")
        for r in results:
            if r["config"].startswith("contrastive+") or r["config"].startswith("contrastive ("):
                print(f"{r['config']}: step time {paired_ratio(r, base) - 1:+.0%} over contrastive in the timing "
                      f"rounds, {base['run_samples_per_s'] / r['run_samples_per_s'] - 1:+.0%} over the training runs")
            if r["config"].startswith("flip50+"):
                print(f"{r['config']}: step time {paired_ratio(r, flip) - 1:+.0%} over contrastive + FLIP in the "
                      f"timing rounds, {flip['run_samples_per_s'] / r['run_samples_per_s'] - 1:+.0%} over the "
                      f"training runs (target <= +25%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-shards", default="/tmp/fm/train/{00000..00011}.tar")
    parser.add_argument("--test-shards", default="/tmp/fm/test/{00000..00001}.tar")
    parser.add_argument("--budget-cpu-s", type=float, default=80.0,
                        help="CPU-seconds of training per configuration (this process, all threads)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batches", type=int, default=400, help="distinct training batches held in memory "
                        "(a configuration that trains longer cycles through them)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--unmasked-fraction", type=float, default=0.1, help="FLIP's final unmasked steps")
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--probe-samples", type=int, default=1000)
    parser.add_argument("--val-batches", type=int, default=2, help="held-out batches for reconstruction losses")
    parser.add_argument("--timing-rounds", type=int, default=20)
    parser.add_argument("--chunk-steps", type=int, default=10, help="steps the longest configuration trains per turn "
                        "(the others train the same share of theirs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="a subset of the configurations")
    parser.add_argument("--equal-steps", nargs="*", default=[], choices=list(CONFIGS), metavar="NAME",
                        help="also train contrastive for as many steps as each of these configurations")
    parser.add_argument("--caption-samples", type=int, default=500,
                        help="test images captioned for the caption configurations' BLEU-4 and CIDEr")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    names = args.only or list(CONFIGS)
    names += [n for n in args.equal_steps if n not in names]
    if "contrastive" not in names:
        names = ["contrastive", *names]  # the baseline: its step time prices FLIP's unmasked tail
    train, test = ensure_shards(args.train_shards, args.test_shards)
    model_cfg = model_config(MODEL)
    batches = load_batches(train, model_cfg, args.batch_size, args.max_batches + args.val_batches)
    probe_images, probe_labels = load_labelled(train, model_cfg, args.probe_samples)
    test_images, test_labels = load_labelled(test, model_cfg, args.eval_samples)
    data = {"train": batches[: args.max_batches], "val": batches[args.max_batches:],
            "tokenize": tokenizer_for(model_cfg), "probe_images": probe_images, "probe_labels": probe_labels,
            "test_images": test_images, "test_labels": test_labels,
            "caption_images": test_images[:args.caption_samples], "caption_labels": test_labels[:args.caption_samples]}
    templates = load_config("demo").eval.templates
    print(f"data ready in {time.perf_counter() - t0:.0f}s", flush=True)

    timing = [fresh(name, args, model_cfg, steps=1000) for name in names]
    interleaved_timing(timing, batches[0], args.timing_rounds)
    base_cpu = next(r for r in timing if r["config"] == "contrastive")["cpu_step_s"]
    runs = []
    for t in timing:
        steps, unmasked = planned_steps(t, base_cpu, args)
        r = fresh(t["config"], args, model_cfg, steps, unmasked)
        r.update({k: t[k] for k in ("step_s", "cpu_step_s", "samples_per_s", "round_step_s")},
                 steps=steps, unmasked_steps=unmasked)
        runs.append(r)
    base_timing = next(t for t in timing if t["config"] == "contrastive")
    for name in args.equal_steps:
        steps = next(r["steps"] for r in runs if r["config"] == name)
        r = fresh("contrastive", args, model_cfg, steps)
        r.update({k: base_timing[k] for k in ("step_s", "cpu_step_s", "samples_per_s", "round_step_s")},
                 steps=steps, unmasked_steps=0)
        r["config"] = f"contrastive ({steps} steps)"
        runs.append(r)
    del timing, base_timing
    print(f"timing done at {time.perf_counter() - t0:.0f}s; planned steps: "
          + ", ".join(f"{r['config']} {r['steps']}" for r in runs), flush=True)
    train_lockstep(runs, data, args.chunk_steps)
    results = []
    for r in runs:
        results.append(evaluate(r, data, templates))
        print(f"  {r['config']}: {r['steps']} steps in {r['train_cpu_s']:.0f} CPU-s ({r['train_s']:.0f} s), zero-shot "
              f"{fmt(results[-1].get('zeroshot_top1'))}, probe {fmt(results[-1]['probe_top1'])}, recon "
              f"{results[-1]['recon']}", flush=True)
    print_table(results, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if not k.startswith("_")}
                                               for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
