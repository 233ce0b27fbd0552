"""`plait eval`: zero-shot classification, image<->text retrieval and linear probes on shard sets.

Every metric is a pure function of features (tested on hand-computed cases); the drivers encode a rank's share
of the shards and reduce over ranks, so the same code serves one process, `torchrun`, and the training loop.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.train.distributed import World, all_reduce_sum
from data_prep.shards.members import CAPTION_KEYS, MemberKeys
from pipeline.eval.datasets import (CLASSNAME_SUITES, EVAL_KEYS, IMAGE_KEYS, TEMPLATE_SUITES, batches, rank_share,
                                    read_classnames, read_templates, resolve, suite_label)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
PROBE_CS = (0.01, 0.1, 1.0, 10.0)


def _urls(shards) -> list[str]:
    return list(resolve(shards).urls) if isinstance(shards, (str, Path)) else list(shards)


def _gather(obj, world: World | None) -> list:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if world is None or world.world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def labelled_images(shards, transform: Callable, batch_size: int, num_workers: int = 0, max_samples: int = 0,
                    keys: MemberKeys = EVAL_KEYS):
    """Batches of (images [B, 3, H, W], labels [B]) in shard order; no shuffling."""
    for images, labels in batches(_urls(shards), transform, "cls", batch_size, max_samples, num_workers, keys=keys):
        yield images, torch.as_tensor(labels)


# ------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def class_embeddings(clip: nn.Module, tokenize: Callable, classnames, templates, device) -> torch.Tensor:
    """[C, D]: each class's normalised mean embedding over the templates."""
    weights = []
    for name in classnames:
        texts = tokenize([t.format(name) for t in templates]).to(device)
        emb = clip.encode_text(texts, normalize=True).mean(dim=0)
        weights.append(emb / emb.norm())
    return torch.stack(weights)


def classification_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[3 + 2C] float64: top-1 hits, top-5 hits, samples, then per-class hits and per-class samples.
    Counts (not rates) so that ranks' results add up exactly."""
    num_classes = logits.shape[1]
    top = logits.topk(min(5, num_classes), dim=1).indices  # [N, k]
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(dim=1)
    per_hits = torch.bincount(labels[hit1], minlength=num_classes)
    per_total = torch.bincount(labels, minlength=num_classes)
    head = torch.tensor([hit1.sum(), hit5.sum(), len(labels)])
    return torch.cat([head, per_hits, per_total]).double()


def summarise_classification(counts: torch.Tensor, classnames: Sequence[str]) -> dict:
    c = len(classnames)
    total = int(counts[2])
    per_hits, per_total = counts[3:3 + c], counts[3 + c:]
    per_class = (per_hits / per_total.clamp(min=1)).tolist()
    present = per_total > 0
    return {"top1": counts[0].item() / max(total, 1), "top5": counts[1].item() / max(total, 1), "num_samples": total,
            "mean_per_class_recall": (per_hits[present] / per_total[present]).mean().item() if present.any() else 0.0,
            "per_class": dict(zip(_unique_labels(classnames), per_class))}


def _unique_labels(classnames: Sequence[str]) -> list[str]:
    """Report keys: a name that occurs more than once (open_clip's ImageNet names hold two `missile`s and two `sunglasses`) gets its
    class index, so no class's recall overwrites another's."""
    counts = collections.Counter(classnames)
    return [name if counts[name] == 1 else f"{name} (class {i})" for i, name in enumerate(classnames)]


@torch.no_grad()
def zero_shot(clip: nn.Module, tokenize: Callable, shards, classnames, templates, transform: Callable,
              batch_size: int = 512, device: str | torch.device = "cpu", max_samples: int = 0,
              world: World | None = None, allow_pipe: bool = False, keys: MemberKeys = EVAL_KEYS) -> dict:
    """Top-1 / top-5, mean per-class recall and per-class accuracy of zero-shot classification. With `world`,
    each rank scores its share of the shards (`max_samples` is split between ranks) and counts are summed."""
    if not classnames:
        raise ValueError("zero-shot classification needs class names (classnames.txt or --classnames)")
    was_training = clip.training
    clip.eval()
    urls = _urls(shards)
    if world is not None and world.world_size > 1:
        urls = rank_share(urls, world)
        max_samples = math.ceil(max_samples / world.world_size) if max_samples else 0
    weights = class_embeddings(clip, tokenize, classnames, templates, device)  # [C, D]
    counts = torch.zeros(3 + 2 * len(classnames), dtype=torch.float64)
    for images, labels in batches(urls, transform, "cls", batch_size, max_samples, allow_pipe=allow_pipe, keys=keys):
        feats = clip.encode_image(images.to(device), normalize=True)  # [B, D]
        counts += classification_counts((feats @ weights.T).float().cpu(), torch.as_tensor(labels))
    if world is not None and world.world_size > 1:
        counts = all_reduce_sum(counts.to(device)).cpu()
    clip.train(was_training)
    if counts[2] == 0:
        raise ValueError(f"no labelled samples (image + cls) found in {shards}")
    return summarise_classification(counts, list(classnames))


# ------------------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------------------

def retrieval_metrics(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@k both ways. image_feats [N, D], text_feats [M, D] (normalised), text_image [M]: the image of
    each caption. An image counts as found when any of its captions is in its top k."""
    n, m = len(image_feats), len(text_feats)
    out = {}
    i2t_hits = {k: 0 for k in ks}
    for start in range(0, n, chunk):
        sim = image_feats[start:start + chunk] @ text_feats.T  # [n_chunk, M]
        top = sim.topk(min(max(ks), m), dim=1).indices  # [n_chunk, k]
        owners = text_image[top]  # [n_chunk, k]
        own = torch.arange(start, start + len(sim))[:, None]
        for k in ks:
            i2t_hits[k] += (owners[:, :k] == own).any(dim=1).sum().item()
    t2i_hits = {k: 0 for k in ks}
    for start in range(0, m, chunk):
        sim = text_feats[start:start + chunk] @ image_feats.T  # [m_chunk, N]
        top = sim.topk(min(max(ks), n), dim=1).indices  # [m_chunk, k]
        target = text_image[start:start + len(sim)][:, None]
        for k in ks:
            t2i_hits[k] += (top[:, :k] == target).any(dim=1).sum().item()
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t_hits[k] / max(n, 1)
        out[f"text_to_image_R@{k}"] = t2i_hits[k] / max(m, 1)
    out.update({"num_images": n, "num_texts": m})
    return out


@torch.no_grad()
def retrieval(clip: nn.Module, tokenize: Callable, shards, transform: Callable, batch_size: int = 512,
              device: str | torch.device = "cpu", max_samples: int = 0, world: World | None = None,
              allow_pipe: bool = False, keys: MemberKeys = EVAL_KEYS) -> dict:
    """Image<->text R@1/5/10 over samples with an image and a caption member (`keys`; one caption per line). With `world`, ranks
    encode disjoint shares and the features are gathered before ranking (every rank returns the result)."""
    clip.eval()
    urls = _urls(shards)
    if world is not None and world.world_size > 1:
        urls = rank_share(urls, world)
        max_samples = math.ceil(max_samples / world.world_size) if max_samples else 0
    images, texts, owner = [], [], []
    for imgs, captions in batches(urls, transform, "caption", batch_size, max_samples, allow_pipe=allow_pipe,
                                  keys=keys):
        base = sum(len(x) for x in images)
        images.append(clip.encode_image(imgs.to(device), normalize=True).float().cpu())
        flat = [(base + i, c) for i, caps in enumerate(captions) for c in caps]
        for start in range(0, len(flat), batch_size):
            part = flat[start:start + batch_size]
            texts.append(clip.encode_text(tokenize([c for _, c in part]).to(device), normalize=True).float().cpu())
            owner += [i for i, _ in part]
    local = (torch.cat(images) if images else torch.zeros(0, 0), torch.cat(texts) if texts else torch.zeros(0, 0),
             torch.tensor(owner, dtype=torch.long))
    all_img, all_txt, all_owner, offset = [], [], [], 0
    for img, txt, own in _gather(local, world):
        if len(img):
            all_img.append(img), all_txt.append(txt), all_owner.append(own + offset)
            offset += len(img)
    if not all_img:
        raise ValueError(f"no image-caption samples (image + txt) found in {shards}")
    return retrieval_metrics(torch.cat(all_img), torch.cat(all_txt), torch.cat(all_owner))


# ------------------------------------------------------------------------------------------------------------
# Captioning
# ------------------------------------------------------------------------------------------------------------

def captioning(model: nn.Module, shards, transform: Callable, classnames: Sequence[str] = (), batch_size: int = 32,
               device: str | torch.device = "cpu", max_samples: int = 0, world: World | None = None,
               num_beams: int = 1, max_length: int = 30, allow_pipe: bool = False,
               keys: MemberKeys = EVAL_KEYS) -> dict:
    """BLEU-4, CIDEr and class naming (pipeline/eval/caption.py) of a captioner's greedy (or beam) captions
    against the shards' captions; ranks caption disjoint shares, the rows are gathered before scoring."""
    from pipeline.eval.caption import caption_metrics, generate_captions

    urls = _urls(shards)
    if world is not None and world.world_size > 1:
        urls = rank_share(urls, world)
        max_samples = math.ceil(max_samples / world.world_size) if max_samples else 0
    rows = generate_captions(model, urls, transform, batch_size, device, num_beams, max_length,
                             max_samples=max_samples, allow_pipe=allow_pipe, keys=keys,
                             progress=world is None or world.is_main)
    rows = [r for part in _gather(rows, world) for r in part]
    if not rows:
        raise ValueError(f"no image samples found in {shards}")
    out = caption_metrics(rows, classnames)
    out.update({"decoding": "greedy" if num_beams == 1 else f"beam search, {num_beams} beams",
                "max_length": max_length})
    return out


# ------------------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def image_features(clip: nn.Module, shards, transform: Callable, batch_size: int = 512,
                   device: str | torch.device = "cpu", max_samples: int = 0,
                   world: World | None = None, allow_pipe: bool = False,
                   keys: MemberKeys = EVAL_KEYS) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) of labelled shards; with `world`, gathered from all ranks."""
    clip.eval()
    urls = _urls(shards)
    if world is not None and world.world_size > 1:
        urls = rank_share(urls, world)
        max_samples = math.ceil(max_samples / world.world_size) if max_samples else 0
    feats, labels = [], []
    for images, y in batches(urls, transform, "cls", batch_size, max_samples, allow_pipe=allow_pipe, keys=keys):
        feats.append(clip.encode_image(images.to(device), normalize=True).float().cpu().numpy())
        labels += y
    parts = _gather((np.concatenate(feats) if feats else np.zeros((0, 0), np.float32), np.asarray(labels)), world)
    parts = [p for p in parts if len(p[1])]
    if not parts:
        raise ValueError(f"no labelled samples (image + cls) found in {shards}")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 cs: Sequence[float] = PROBE_CS, val_fraction: float = 0.2, seed: int = 0,
                 classnames: Sequence[str] | None = None) -> dict:
    """Logistic regression on frozen features: C chosen on a held-out part of train, refit on all of train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(x, y, c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x, y)

    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = max(1, int(len(order) * val_fraction))
    val, fit_idx = order[:n_val], order[n_val:]
    sweep = {}
    for c in cs:
        sweep[str(c)] = float((fit(train_x[fit_idx], train_y[fit_idx], c).predict(train_x[val]) == train_y[val]).mean())
    best = max(cs, key=lambda c: sweep[str(c)])
    clf = fit(train_x, train_y, best)
    proba = clf.predict_proba(test_x)  # [N, C_seen]
    classes = clf.classes_
    num_classes = len(classnames) if classnames else int(max(train_y.max(), test_y.max())) + 1
    logits = torch.full((len(test_x), num_classes), -1.0, dtype=torch.float64)
    logits[:, torch.as_tensor(classes)] = torch.as_tensor(proba, dtype=torch.float64)
    names = list(classnames) if classnames else [str(i) for i in range(num_classes)]
    result = summarise_classification(classification_counts(logits, torch.as_tensor(test_y)), names)
    result.update({"C": best, "probe_sweep": sweep, "num_train": int(len(train_x))})
    return result


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------

def world_from_env() -> World:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if size > 1:
        return World(rank=dist.get_rank(), world_size=dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def is_captioner(model: nn.Module) -> bool:
    from pipeline.models.caption_head import captioner_for
    try:
        captioner_for(model)
    except ValueError:
        return False
    return True


def _device(name: str, world: World) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait eval", description=(
        "Evaluate an exported model (open_clip dir, HF CLIPModel dir, safetensors export, weights file + --model) "
        "or a training checkpoint/run dir: zero-shot classification, retrieval, linear probe. Run under torchrun "
        "to split the shards between processes."))
    parser.add_argument("model", help="model directory, weights file, checkpoint or run dir")
    parser.add_argument("--model", dest="arch", help="architecture of a weights file (open_clip name or .json)")
    parser.add_argument("--data", required=True, help=(
        "shard spec (dir/{00000..00009}.tar, a::b), a folder of shards, or a clip_benchmark wds root "
        "(ROOT/test/*.tar, classnames.txt, zeroshot_classification_templates.txt)"))
    parser.add_argument("--split", default="test", help="clip_benchmark split folder (default: %(default)s)")
    parser.add_argument("--task", action="append", choices=["zeroshot", "retrieval", "linear_probe", "caption"],
                        help="repeatable; default: what the data supports (zeroshot with class names, else "
                             "retrieval; linear_probe when --train-data is given; caption for a captioner)")
    parser.add_argument("--caption-beams", type=int, default=1,
                        help="caption task: beam search width; 1: greedy (default)")
    parser.add_argument("--caption-max-length", type=int, default=0, help=(
        "caption task: tokens per caption, start and end included (default: 30, or the text context if shorter)"))
    parser.add_argument("--train-data", help="labelled training shards for the linear probe (clip_benchmark root: "
                                             "its train split is used when omitted and present)")
    parser.add_argument("--classnames", help="file, one class name per line in label order; or a suite from the "
                        f"installed open_clip: {', '.join(CLASSNAME_SUITES)}")
    parser.add_argument("--templates", help="file, one prompt template per line ({} or {c} marks the class); or "
                        "a suite from the installed open_clip: openai (its 80 ImageNet prompts), simple")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-samples", type=int, default=0, help="per task; 0: all (default)")
    parser.add_argument("--train-max-samples", type=int, default=0, help="linear probe training samples; 0: all")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--output", help="write the JSON result here (rank 0); always printed too")
    parser.add_argument("--image-keys", default=IMAGE_KEYS, metavar="KEYS", help=(
        "image members, tried in order (';'-separated extensions, as data.image_keys; default: %(default)s, "
        "clip_benchmark's 0.webp included)"))
    parser.add_argument("--caption-keys", default=CAPTION_KEYS, metavar="KEYS", help=(
        "caption members of retrieval sets, tried in order: extensions or json:FIELD (as data.caption_keys)"))
    parser.add_argument("--allow-pipe", action="store_true", help=(
        "accept `pipe:CMD` shard specs, which run CMD in a shell to read a shard: only for commands you wrote "
        "yourself (refused by default: a spec from elsewhere must not run code)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.artifacts.load import load_model

    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    keys = MemberKeys.parse(args.image_keys, args.caption_keys, ("--image-keys", "--caption-keys"))
    data = resolve(args.data, args.split, allow_pipe=args.allow_pipe, flag="--allow-pipe")
    classnames = read_classnames(args.classnames) if args.classnames else data.classnames
    templates = read_templates(args.templates) if args.templates else data.templates or DEFAULT_TEMPLATES
    train_data = args.train_data
    if not train_data and Path(args.data, "train").is_dir() and "linear_probe" in (args.task or []):
        train_data = args.data
    tasks = args.task or (["retrieval"] if data.kind == "retrieval" or not classnames else ["zeroshot"]) + (
        ["linear_probe"] if train_data else [])
    if "linear_probe" in tasks and not train_data:
        raise ValueError("--task linear_probe needs --train-data (labelled training shards)")
    world = world_from_env()
    device = _device(args.device, world)
    loaded = load_model(args.model, args.arch)
    model = loaded.model.to(device)
    if not args.task and is_captioner(model):
        tasks.append("caption")
    if "caption" in tasks:
        from pipeline.eval.caption import check_decoding
        context = loaded.model_cfg["text_cfg"].get("context_length", 77)
        caption_length = args.caption_max_length or min(30, context)
        check_decoding(args.caption_beams, caption_length, 5, args.batch_size, context)
    result = {"model": str(args.model), "model_kind": loaded.kind, "data": args.data, "processes": world.world_size}
    suites = {"classnames": args.classnames and suite_label(args.classnames, CLASSNAME_SUITES),
              "templates": args.templates and suite_label(args.templates, TEMPLATE_SUITES)}
    if any(suites.values()):
        result["suite"] = {k: v for k, v in suites.items() if v}
    if "zeroshot" in tasks:
        result["zeroshot"] = zero_shot(model, loaded.tokenize, data.urls, classnames, templates, loaded.transform,
                                       args.batch_size, device, args.max_samples, world, allow_pipe=args.allow_pipe, keys=keys)
    if "retrieval" in tasks:
        result["retrieval"] = retrieval(model, loaded.tokenize, data.urls, loaded.transform, args.batch_size,
                                        device, args.max_samples, world, allow_pipe=args.allow_pipe, keys=keys)
    if "caption" in tasks:
        result["caption"] = captioning(model, data.urls, loaded.transform, classnames, args.batch_size, device,
                                       args.max_samples, world, args.caption_beams, caption_length,
                                       allow_pipe=args.allow_pipe, keys=keys)
    if "linear_probe" in tasks:
        train_urls = resolve(train_data, "train", allow_pipe=args.allow_pipe, flag="--allow-pipe").urls
        train = image_features(model, train_urls, loaded.transform, args.batch_size, device,
                               args.train_max_samples, world, allow_pipe=args.allow_pipe, keys=keys)
        test = image_features(model, data.urls, loaded.transform, args.batch_size, device, args.max_samples, world,
                              allow_pipe=args.allow_pipe, keys=keys)
        if world.is_main:
            result["linear_probe"] = linear_probe(*train, *test, classnames=classnames or None)
    if world.is_main:
        text = json.dumps(result, indent=2)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(text)
        print(text)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
