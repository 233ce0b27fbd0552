"""`plait finetune`: image classification from an exported model on a labelled shard set.

The classifier starts as the zero-shot head (class embeddings from the text tower, scaled by the model's
temperature), so step 0 already scores the zero-shot accuracy. `linear` trains only that head on frozen,
cached features; `full` also trains the image tower, optionally with layer-wise learning-rate decay (the last
block at lr, each earlier one at `layer_decay` times the next). The result is evaluated on the test split and
exported like any model, with the head beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.eval_data import batches, normalise_template, read_lines, resolve
from pipeline.eval_models import load_model
from pipeline.evaluate import (DEFAULT_TEMPLATES, class_embeddings, classification_counts, image_features,
                               summarise_classification)


class ClassifierHead(nn.Module):
    """logits = scale * (W e + b) on normalised embeddings e. W starts as the unit-norm class embeddings and
    `scale` is the model's fixed temperature, so the optimizer moves W on the scale of unit vectors (an
    nn.Linear holding scale * W would need a ~100x larger learning rate to move at all)."""

    def __init__(self, dim: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * (emb @ self.weight.T + self.bias)  # [B, D] -> [B, C]


class Classifier(nn.Module):
    """The image tower plus the head on its normalised embedding: images [B, 3, H, W] -> logits [B, C]."""

    def __init__(self, clip: nn.Module, head: nn.Module):
        super().__init__()
        self.clip, self.head = clip, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.clip.encode_image(images, normalize=True))


@torch.no_grad()
def zero_shot_head(clip: nn.Module, tokenize, classnames, templates, device) -> ClassifierHead:
    weights = class_embeddings(clip, tokenize, classnames, templates, device)  # [C, D]
    head = ClassifierHead(weights.shape[1], weights.shape[0], clip.logit_scale.exp().item()).to(device)
    head.weight.copy_(weights)
    return head


def layer_id(name: str, num_layers: int) -> int:
    """0 for the patch/position embeddings, i + 1 for block i, num_layers + 1 for what follows the blocks
    (open_clip `visual.transformer.resblocks.i`, HF `vision_model.encoder.layers.i`)."""
    block = re.search(r"(?:resblocks|encoder\.layers)\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    if re.search(r"(class_embedding|positional_embedding|conv1|ln_pre|embeddings|pre_layrnorm)", name):
        return 0
    return num_layers + 1


def param_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float,
                 num_layers: int, train_tower: bool) -> list[dict]:
    """AdamW groups: head always; image-tower params when `train_tower`, each at lr * decay^(depth from top).
    No weight decay on 1-d tensors (norms, biases) and embeddings."""
    groups: dict[tuple[int, bool], dict] = {}
    named = list(model.head.named_parameters(prefix="head"))
    if train_tower:
        named += [(n, p) for n, p in model.clip.named_parameters() if _is_image_tower(n)]
    for name, param in named:
        depth = num_layers + 1 if name.startswith("head") else layer_id(name, num_layers)
        decay = param.ndim >= 2 and "embedding" not in name
        key = (depth, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * layer_decay ** (num_layers + 1 - depth),
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    for g in groups.values():
        g["base_lr"] = g["lr"]
    return list(groups.values())


def _is_image_tower(name: str) -> bool:
    return name.startswith(("visual.", "hf.vision_model.", "hf.visual_projection."))


def _num_image_layers(clip: nn.Module) -> int:
    names = [n for n, _ in clip.named_parameters() if _is_image_tower(n)]
    ids = [int(m.group(1)) for n in names if (m := re.search(r"(?:resblocks|encoder\.layers)\.(\d+)\.", n))]
    return max(ids) + 1 if ids else 0


@torch.no_grad()
def evaluate_classifier(model: Classifier, urls, transform, classnames, batch_size, device, max_samples=0) -> dict:
    model.eval()
    counts = torch.zeros(3 + 2 * len(classnames), dtype=torch.float64)
    for images, labels in batches(list(urls), transform, "cls", batch_size, max_samples):
        counts += classification_counts(model(images.to(device)).float().cpu(), torch.as_tensor(labels))
    if counts[2] == 0:
        raise ValueError(f"no labelled samples (image + cls) in the test data ({urls[0]} ...)")
    return summarise_classification(counts, list(classnames))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model: Classifier, args, train_urls, transform, device, num_layers: int) -> dict:
    """Trains in place; returns {'steps', 'train_s', 'final_loss'}."""
    torch.manual_seed(args.seed)
    groups = param_groups(model, args.lr, args.weight_decay, args.layer_decay, num_layers, args.mode == "full")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    for p in model.clip.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    loss_fn = nn.CrossEntropyLoss()
    started, step, loss = time.monotonic(), 0, torch.tensor(float("nan"))
    if args.mode == "linear":
        # Frozen tower: encode the training set once, then train the head on cached features.
        feats, labels = image_features(model.clip, train_urls, transform, args.batch_size, device,
                                       args.max_train_samples)
        feats, labels = torch.from_numpy(feats).to(device), torch.from_numpy(labels).to(device)
        steps_per_epoch = math.ceil(len(feats) / args.batch_size)
        total = steps_per_epoch * args.epochs
        gen = torch.Generator().manual_seed(args.seed)
        for _ in range(args.epochs):
            for idx in torch.randperm(len(feats), generator=gen).split(args.batch_size):
                loss = _step(model.head(feats[idx]), labels[idx], loss_fn, optimizer, step, total, args)
                step += 1
    else:
        sizes = resolve_count(train_urls, args.max_train_samples)
        total = max(1, math.ceil(sizes / args.batch_size) * args.epochs)
        for _ in range(args.epochs):
            model.train()
            for images, labels in batches(list(train_urls), transform, "cls", args.batch_size,
                                          args.max_train_samples, shuffle=1000):
                loss = _step(model(images.to(device)), torch.as_tensor(labels, device=device), loss_fn, optimizer,
                             min(step, total - 1), total, args)
                step += 1
    model.eval()
    return {"steps": step, "train_s": round(time.monotonic() - started, 1), "final_loss": float(loss)}


def _step(logits, labels, loss_fn, optimizer, step, total, args) -> torch.Tensor:
    factor = cosine_lr(step, total, max(1, int(0.1 * total)))
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def resolve_count(urls, max_samples: int) -> int:
    """Training samples per epoch (for the LR schedule): sizes.json/_stats.json counts, capped by max_samples."""
    from pipeline.shardspec import shard_sizes
    try:
        count = sum(shard_sizes(list(urls)))
    except FileNotFoundError:
        count = max_samples or 10_000  # unknown size: the cosine then ends at the cap or stays near peak
    return min(count, max_samples) if max_samples else count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plait finetune", description=(
        "Fine-tune an exported model (or checkpoint) as an image classifier on labelled shards (image + cls), "
        "starting from its zero-shot head; evaluate on a test split; export the result."))
    p.add_argument("model", help="exported model dir (open_clip / safetensors / hf), weights file, or checkpoint")
    p.add_argument("--model", dest="arch", help="architecture of a weights file (open_clip name or .json)")
    p.add_argument("--train-data", required=True, help="labelled training shards (spec, folder, or clip_benchmark root)")
    p.add_argument("--test-data", required=True, help="labelled test shards (spec, folder, or clip_benchmark root)")
    p.add_argument("--classnames", help="file, one class name per line (default: the data's classnames.txt)")
    p.add_argument("--templates", help="file, one template per line (default: the data's, else 'a photo of a {}.')")
    p.add_argument("--mode", choices=["linear", "full"], default="full",
                   help="linear: head only on frozen features; full: head + image tower (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: 1e-3 linear, 1e-4 full)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise LR decay for full mode, e.g. 0.75; 1.0 disables it (default: 1.0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=0, help="0: all")
    p.add_argument("--max-test-samples", type=int, default=0, help="0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="export the fine-tuned model here (with classifier.safetensors + classnames.txt)")
    p.add_argument("--format", choices=["open_clip", "hf", "safetensors"], default="open_clip")
    p.add_argument("--output", help="write the JSON result here")
    return p


def run(args) -> dict:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must lie in (0, 1], got {args.layer_decay}")
    args.lr = args.lr or (1e-3 if args.mode == "linear" else 1e-4)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    train_set, test_set = resolve(args.train_data, "train"), resolve(args.test_data, "test")
    classnames = read_lines(args.classnames) if args.classnames else (test_set.classnames or train_set.classnames)
    if not classnames:
        raise ValueError("class names needed: --classnames FILE (or classnames.txt beside the data)")
    templates = (tuple(map(normalise_template, read_lines(args.templates))) if args.templates
                 else test_set.templates or DEFAULT_TEMPLATES)
    loaded = load_model(args.model, args.arch)
    if args.out and loaded.kind == "hf":
        raise ValueError("--out: fine-tuned HF models cannot be re-exported; start from an open_clip export")
    clip = loaded.model.to(device)
    model = Classifier(clip, zero_shot_head(clip, loaded.tokenize, classnames, templates, device))
    result = {"model": str(args.model), "mode": args.mode, "classnames": list(classnames),
              "zero_shot": evaluate_classifier(model, test_set.urls, loaded.transform, classnames, args.batch_size,
                                               device, args.max_test_samples)}
    result["training"] = train(model, args, train_set.urls, loaded.transform, device, _num_image_layers(clip))
    result["finetuned"] = evaluate_classifier(model, test_set.urls, loaded.transform, classnames, args.batch_size,
                                              device, args.max_test_samples)
    if args.out:
        result["export"] = str(export_finetuned(model, loaded, args, result))
    return result


def export_finetuned(model: Classifier, loaded, args, result: dict) -> Path:
    from pipeline.export import Source, export

    source_meta = Path(args.model) / "plait_metadata.json"
    training = json.loads(source_meta.read_text()).get("training", {}) if source_meta.is_file() else {}
    finetune = {"mode": args.mode, "train_shards": args.train_data, "test_shards": args.test_data,
                "epochs": args.epochs, "lr": args.lr, "layer_decay": args.layer_decay, "from": str(args.model),
                "classifier": "classifier.safetensors", "classnames": "classnames.txt"}
    state = {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}
    src = Source(clip=state, model_cfg=loaded.model_cfg, training=training, checkpoint=str(args.model),
                 name="plait-finetuned")
    evals = {"zero_shot_before": _scalars(result["zero_shot"]), "finetuned": _scalars(result["finetuned"])}
    out = export(src, args.format, args.out, eval_results=evals, extra_meta={"finetune": finetune})
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
              out / "classifier.safetensors")
    (out / "classnames.txt").write_text("\n".join(result["classnames"]) + "\n")
    return out


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    zs, ft = result["zero_shot"]["top1"], result["finetuned"]["top1"]
    print(f"plait finetune ({args.mode}): top-1 zero-shot {zs:.2%} -> fine-tuned {ft:.2%}")
    return 0
