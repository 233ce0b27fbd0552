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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.flags import add_options, from_args
from pipeline.options import option, validate
from pipeline.config import OptimConfig
from data_prep.shards.members import MemberKeys
from data_prep.shards.layout import CLASSNAMES_FILE, format_classnames
from pipeline.eval.datasets import IMAGE_KEYS, batches, normalise_template, read_classnames, read_lines, resolve
from pipeline.artifacts.load import load_model
from pipeline.eval.evaluate import (DEFAULT_TEMPLATES, class_embeddings, classification_counts, image_features,
                               summarise_classification)
from pipeline.artifacts.export import FORMATS, Source, export, source_training
from pipeline.artifacts.model_card import eval_entries
from pipeline.train.optim import lr_factor, no_decay
from pipeline.data.shardspec import shard_sizes

# The first tenth of the steps warms the learning rate up; a cosine (pipeline/train/optim.py) takes it to zero.
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class FinetuneConfig:
    source: str = option(positional=True, metavar="model")
    """Exported model dir (open_clip / safetensors / hf), weights file, or training checkpoint."""
    train_data: str = option()
    """Labelled training shards (image + cls): a spec, a folder, or a clip_benchmark root."""
    test_data: str = option()
    """Labelled test shards: a spec, a folder, or a clip_benchmark root."""
    model: str | None = option(None, metavar="ARCH")
    """Architecture of a bare weights file (open_clip model name or .json config)."""
    classnames: str | None = option(None, metavar="FILE")
    """File with one class name per line (default: the data's classnames.txt)."""
    templates: str | None = option(None, metavar="FILE")
    """File with one prompt template per line (default: the data's, else 'a photo of a {}.')."""
    mode: str = option("full", choices=("linear", "full"))
    """linear: the head only, on cached features of the frozen tower; full: head and image tower."""
    epochs: int = option(1, gt=0)
    """Passes over the training data."""
    lr: float | None = option(None, gt=0)
    """Peak learning rate (default: 1e-3 in linear mode, 1e-4 in full mode)."""
    weight_decay: float = option(0.05, ge=0)
    """AdamW weight decay (norms, biases and embeddings are exempt, as in pretraining)."""
    layer_decay: float = option(1.0, gt=0, le=1)
    """Layer-wise LR decay in full mode: each image block trains at this times the next one's LR; 1.0: off."""
    batch_size: int = option(128, gt=0)
    """Samples per step, in training and evaluation."""
    max_train_samples: int = option(0, ge=0)
    """Train on at most this many samples per epoch; 0: all."""
    max_test_samples: int = option(0, ge=0)
    """Evaluate on at most this many samples; 0: all."""
    seed: int = 0
    """Seed of the training order."""
    device: str = "auto"
    """auto (GPU when present), cpu, cuda, cuda:1, ..."""
    out: str | None = option(None, metavar="DIR")
    """Export the fine-tuned model here (with classifier.safetensors + classnames.txt)."""
    format: str = option("open_clip", choices=FORMATS)
    """Export format of --out."""
    output: str | None = option(None, metavar="FILE")
    """Write the JSON result here."""
    image_keys: str = option(IMAGE_KEYS, metavar="KEYS")
    """Image members, tried in order (';'-separated extensions, as data.image_keys; clip_benchmark's 0.webp
    included)."""

    def __post_init__(self):
        validate(self)
        self.keys  # a bad --image-keys fails here, naming the flag

    @property
    def keys(self) -> MemberKeys:
        return MemberKeys.parse(self.image_keys, names=("--image-keys", "--caption-keys"))

    @property
    def peak_lr(self) -> float:
        return self.lr or (1e-3 if self.mode == "linear" else 1e-4)

    def schedule(self, total_steps: int) -> OptimConfig:
        """The pretraining optimizer's schedule settings for a run of `total_steps`."""
        return OptimConfig(lr=self.peak_lr, weight_decay=self.weight_decay, schedule="cosine", min_lr_ratio=0.0,
                           warmup_steps=max(1, int(WARMUP_FRACTION * total_steps)))


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
    Weight decay as in pretraining (pipeline/train/optim.py's `no_decay`)."""
    groups: dict[tuple[int, bool], dict] = {}
    named = list(model.head.named_parameters(prefix="head"))
    if train_tower:
        named += [(n, p) for n, p in model.clip.named_parameters() if _is_image_tower(n)]
    for name, param in named:
        depth = num_layers + 1 if name.startswith("head") else layer_id(name, num_layers)
        decay = not no_decay(name, param)
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
def evaluate_classifier(model: Classifier, urls, transform, classnames, batch_size, device, max_samples=0,
                        keys: MemberKeys | None = None) -> dict:
    model.eval()
    counts = torch.zeros(3 + 2 * len(classnames), dtype=torch.float64)
    keys = keys or MemberKeys.parse(IMAGE_KEYS)
    for images, labels in batches(list(urls), transform, "cls", batch_size, max_samples, keys=keys):
        counts += classification_counts(model(images.to(device)).float().cpu(), torch.as_tensor(labels))
    if counts[2] == 0:
        raise ValueError(f"no labelled samples (image + cls) in the test data ({urls[0]} ...)")
    return summarise_classification(counts, list(classnames))


def train(model: Classifier, cfg: FinetuneConfig, train_urls, transform, device, num_layers: int) -> dict:
    """Trains in place; returns {'steps', 'train_s', 'final_loss'}."""
    torch.manual_seed(cfg.seed)
    groups = param_groups(model, cfg.peak_lr, cfg.weight_decay, cfg.layer_decay, num_layers, cfg.mode == "full")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    for p in model.clip.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    loss_fn = nn.CrossEntropyLoss()
    started, step, loss = time.monotonic(), 0, torch.tensor(float("nan"))
    if cfg.mode == "linear":
        # Frozen tower: encode the training set once, then train the head on cached features.
        feats, labels = image_features(model.clip, train_urls, transform, cfg.batch_size, device,
                                       cfg.max_train_samples, keys=cfg.keys)
        feats, labels = torch.from_numpy(feats).to(device), torch.from_numpy(labels).to(device)
        total = math.ceil(len(feats) / cfg.batch_size) * cfg.epochs
        schedule = cfg.schedule(total)
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(feats), generator=gen).split(cfg.batch_size):
                loss = _step(model.head(feats[idx]), labels[idx], loss_fn, optimizer, step, total, schedule)
                step += 1
    else:
        sizes = resolve_count(train_urls, cfg.max_train_samples)
        total = max(1, math.ceil(sizes / cfg.batch_size) * cfg.epochs)
        schedule = cfg.schedule(total)
        for _ in range(cfg.epochs):
            model.train()
            for images, labels in batches(list(train_urls), transform, "cls", cfg.batch_size,
                                          cfg.max_train_samples, shuffle=1000, keys=cfg.keys):
                loss = _step(model(images.to(device)), torch.as_tensor(labels, device=device), loss_fn, optimizer,
                             min(step, total - 1), total, schedule)
                step += 1
    model.eval()
    return {"steps": step, "train_s": round(time.monotonic() - started, 1), "final_loss": float(loss)}


def _step(logits, labels, loss_fn, optimizer, step: int, total: int, schedule: OptimConfig) -> torch.Tensor:
    factor = lr_factor(step, schedule, total)  # each group keeps its layer-decayed share of the peak LR
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def resolve_count(urls, max_samples: int) -> int:
    """Training samples per epoch (for the LR schedule): sizes.json/_stats.json counts, capped by max_samples."""
    try:
        count = sum(shard_sizes(list(urls)))
    except FileNotFoundError:
        count = max_samples or 10_000  # unknown size: the cosine then ends at the cap or stays near peak
    return min(count, max_samples) if max_samples else count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait finetune", description=(
        "Fine-tune an exported model (or checkpoint) as an image classifier on labelled shards (image + cls), "
        "starting from its zero-shot head; evaluate on a test split; export the result."))
    add_options(parser, FinetuneConfig)
    return parser


def run(cfg: FinetuneConfig) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    train_set, test_set = resolve(cfg.train_data, "train"), resolve(cfg.test_data, "test")
    classnames = read_classnames(cfg.classnames) if cfg.classnames else (test_set.classnames or train_set.classnames)
    if not classnames:
        raise ValueError("class names needed: --classnames FILE (or classnames.txt beside the data)")
    templates = (tuple(map(normalise_template, read_lines(cfg.templates))) if cfg.templates
                 else test_set.templates or DEFAULT_TEMPLATES)
    loaded = load_model(cfg.source, cfg.model)
    if cfg.out and loaded.kind == "hf":
        raise ValueError("--out: fine-tuned HF models cannot be re-exported; start from an open_clip export")
    clip = loaded.model.to(device)
    model = Classifier(clip, zero_shot_head(clip, loaded.tokenize, classnames, templates, device))
    result = {"model": str(cfg.source), "mode": cfg.mode, "classnames": list(classnames),
              "zero_shot": evaluate_classifier(model, test_set.urls, loaded.transform, classnames, cfg.batch_size,
                                               device, cfg.max_test_samples, cfg.keys)}
    result["training"] = train(model, cfg, train_set.urls, loaded.transform, device, _num_image_layers(clip))
    result["finetuned"] = evaluate_classifier(model, test_set.urls, loaded.transform, classnames, cfg.batch_size,
                                              device, cfg.max_test_samples, cfg.keys)
    if cfg.out:
        result["export"] = str(export_finetuned(model, loaded, cfg, result))
    return result


def export_finetuned(model: Classifier, loaded, cfg: FinetuneConfig, result: dict) -> Path:
    """Exports the fine-tuned towers like any model, with the head and class names in the same directory."""
    training = source_training(cfg.source)  # the pretraining history, as the source's own card states it
    finetune = {"mode": cfg.mode, "train_shards": cfg.train_data, "test_shards": cfg.test_data,
                "epochs": cfg.epochs, "lr": cfg.peak_lr, "layer_decay": cfg.layer_decay, "from": str(cfg.source),
                "classifier": "classifier.safetensors", "classnames": "classnames.txt"}
    state = {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    src = Source(clip=state, model_cfg=loaded.model_cfg, training=training, checkpoint=str(cfg.source),
                 name="plait-finetuned")
    evals = {"zero_shot_before": _scalars(result["zero_shot"]), "finetuned": _scalars(result["finetuned"])}
    base, steps = training.get("step"), result["training"].get("steps")
    entries = [*eval_entries(evals["zero_shot_before"], base, "plait finetune (zero-shot head, before)",
                             "zero_shot_before/"),
               *eval_entries(evals["finetuned"], f"{'n/a' if base is None else base} + {steps} fine-tune steps",
                             "plait finetune (after)", "finetuned/")]
    return export(src, cfg.format, cfg.out, eval_results=evals, extra_meta={"finetune": finetune}, evals=entries,
                  add_files=partial(write_head, head=head, classnames=result["classnames"]))


def write_head(folder: Path, head: dict[str, torch.Tensor], classnames: list[str]) -> None:
    """The classifier beside the exported towers: its weights and the class names in label order."""
    save_file(head, folder / "classifier.safetensors")
    (folder / CLASSNAMES_FILE).write_bytes(format_classnames(classnames))


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def main(argv: list[str] | None = None) -> int:
    cfg = from_args(FinetuneConfig, build_parser().parse_args(argv))
    result = run(cfg)
    text = json.dumps({**result, "config": asdict(cfg)}, indent=2)
    if cfg.output:
        Path(cfg.output).write_text(text)
    print(text)
    zs, ft = result["zero_shot"]["top1"], result["finetuned"]["top1"]
    print(f"plait finetune ({cfg.mode}): top-1 zero-shot {zs:.2%} -> fine-tuned {ft:.2%}")
    return 0
