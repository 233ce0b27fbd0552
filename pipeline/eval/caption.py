"""`plait caption EXPORT --data SHARDS --out FILE`: one generated caption per sample, and the captioning metrics
`plait eval --task caption` reports (BLEU-4 and CIDEr against the shards' captions, class naming).

The model is a captioner exported by `plait export` (an open_clip CoCa: a run trained with objective.caption);
decoding is plait's own greedy or beam search (pipeline/models/caption_head.py), which equals open_clip's
`CoCa.generate` top-1 loop. Shards are read as `plait eval` reads them (fsspec, member by member, no pickles).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from data_prep.shards.members import CAPTION_KEYS, MemberKeys
from pipeline.data.transforms import decode_member
from pipeline.eval.datasets import EVAL_KEYS, IMAGE_KEYS, raw_samples, resolve
from pipeline.models.caption_head import beam_search, captioner_for, decode, greedy

OUTPUT_SUFFIXES = (".parquet", ".jsonl")


def _sample(sample: dict, transform: Callable, keys: MemberKeys) -> tuple:
    """(key, image tensor, reference captions, label or None) of a raw sample; KeyError without an image."""
    image = keys.image_members(sample)[0]
    if not image:
        raise KeyError(f"{sample.get('__url__', '')}:{sample.get('__key__', '')}: {keys.missing_image(sample)}")
    try:
        text = keys.caption_of(sample)
    except KeyError:
        text = ""
    references = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    label = int(decode_member("cls", sample["cls"])) if "cls" in sample else None
    return sample["__key__"], transform(decode_member(image[0], sample[image[0]])), references, label


def _collate(samples: list[tuple]) -> tuple:
    names, images, references, labels = zip(*samples)
    return list(names), torch.stack(images), list(references), list(labels)


def sample_batches(urls: Sequence[str], transform: Callable, batch_size: int, allow_pipe: bool = False,
                   keys: MemberKeys = EVAL_KEYS) -> Iterator[tuple]:
    """(keys, images [B, 3, H, W], reference captions, labels) in shard order."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.pipelinefilter(raw_samples)(allow_pipe=allow_pipe),
        wds.map(functools.partial(_sample, transform=transform, keys=keys), handler=wds.warn_and_continue),
        wds.batched(batch_size, partial=True, collation_fn=_collate),
    )
    yield from pipeline


@torch.no_grad()
def generate_captions(model: torch.nn.Module, urls: Sequence[str], transform: Callable, batch_size: int = 32,
                      device: str | torch.device = "cpu", num_beams: int = 1, max_length: int = 30,
                      min_length: int = 5, max_samples: int = 0, allow_pipe: bool = False,
                      keys: MemberKeys = EVAL_KEYS, progress: bool = True) -> list[dict]:
    """One row per sample: key, caption (generated), references (the sample's captions), label (its `cls`)."""
    captioner = captioner_for(model)
    model.eval()
    rows: list[dict] = []
    bar = tqdm(total=max_samples or None, unit="captions", disable=not progress)
    for names, images, references, labels in sample_batches(urls, transform, batch_size, allow_pipe, keys):
        if max_samples:
            keep = max_samples - len(rows)
            names, images, references, labels = names[:keep], images[:keep], references[:keep], labels[:keep]
        images = images.to(device)
        if num_beams > 1:
            ids = beam_search(captioner, images, num_beams, max_length, min_length)
        else:
            ids = greedy(captioner, images, max_length, min_length)
        for name, caption, refs, label in zip(names, decode(ids.cpu()), references, labels):
            rows.append({"key": name, "caption": caption, "references": refs, "label": label})
        bar.update(len(names))
        if max_samples and len(rows) >= max_samples:
            break
    bar.close()
    return rows


def write_captions(rows: list[dict], out: str | Path) -> Path:
    """(key, caption) rows to `out`: Parquet (.parquet) or JSON lines (.jsonl), by the suffix."""
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: expected a {' or '.join(OUTPUT_SUFFIXES)} file")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {"key": [r["key"] for r in rows], "caption": [r["caption"] for r in rows]}
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(table), tmp)
    else:
        tmp.write_text("".join(json.dumps({"key": k, "caption": c}) + "\n" for k, c in zip(*table.values())))
    tmp.replace(out)
    return out


# ---- metrics -----------------------------------------------------------------------------------------------------
def _words(text: str) -> str:
    """Lower case, punctuation dropped: what the COCO caption evaluation's PTB tokenizer (a Java program) does to
    plain English captions, done in Python."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def names_class(caption: str, classname: str) -> bool:
    """Whether the caption holds the class name as whole words."""
    name = _words(classname)
    return bool(name) and f" {name} " in f" {_words(caption)} "


def caption_metrics(rows: list[dict], classnames: Sequence[str] = ()) -> dict:
    """BLEU-4 and CIDEr (pycocoevalcap's scorers) of the generated captions against each sample's references,
    over the samples that have references; with class names and labels, the share of captions naming the class."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    scored = [r for r in rows if r["references"]]
    out: dict = {"num_samples": len(rows), "num_with_references": len(scored)}
    if scored:
        refs = {i: [_words(c) for c in r["references"]] for i, r in enumerate(scored)}
        hyps = {i: [_words(r["caption"]) or "."] for i, r in enumerate(scored)}
        out["bleu_4"] = float(Bleu(4).compute_score(refs, hyps, verbose=0)[0][3])
        out["cider"] = float(Cider().compute_score(refs, hyps)[0])
    labelled = [r for r in rows if r["label"] is not None and 0 <= r["label"] < len(classnames)]
    if labelled:
        out["names_true_class"] = sum(names_class(r["caption"], classnames[r["label"]]) for r in labelled) / len(
            labelled)
    out["examples"] = [{"key": r["key"], "caption": r["caption"]} for r in rows[:5]]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait caption", description=(
        "Generate one caption per sample of a shard set with an exported captioner (a run trained with "
        "objective.caption, exported with plait export --format open_clip)."))
    parser.add_argument("model", help="the export directory (open_clip CoCa)")
    parser.add_argument("--data", required=True, help="shard spec (dir/{00000..00009}.tar, a::b) or a folder of shards")
    parser.add_argument("--out", required=True, help="output file: .parquet or .jsonl (columns key, caption)")
    parser.add_argument("--beams", type=int, default=1, help="beam search width; 1: greedy (default)")
    parser.add_argument("--max-length", type=int, default=0, help=(
        "tokens per caption, start and end included (default: open_clip's 30, or the model's text context if "
        "shorter)"))
    parser.add_argument("--min-length", type=int, default=5,
                        help="no end of text before this many tokens (open_clip's min_seq_len; default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, default=0, help="0: all (default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--image-keys", default=IMAGE_KEYS, metavar="KEYS", help="image members, tried in order")
    parser.add_argument("--caption-keys", default=CAPTION_KEYS, metavar="KEYS",
                        help="caption members (read for the references of plait eval --task caption)")
    parser.add_argument("--allow-pipe", action="store_true", help="accept `pipe:CMD` shard specs (see plait eval)")
    return parser


def check_decoding(beams: int, max_length: int, min_length: int, batch_size: int, context_length: int) -> None:
    if beams < 1:
        raise ValueError(f"--beams must be >= 1, got {beams}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    if not 2 <= max_length <= context_length:
        raise ValueError(f"--max-length {max_length}: must lie in [2, {context_length}] (the model's text context)")
    if not 1 <= min_length < max_length:
        raise ValueError(f"--min-length {min_length}: must lie in [1, --max-length)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.artifacts.load import load_model

    args = build_parser().parse_args(argv)
    if Path(args.out).suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {args.out}: expected a {' or '.join(OUTPUT_SUFFIXES)} file")
    keys = MemberKeys.parse(args.image_keys, args.caption_keys, ("--image-keys", "--caption-keys"))
    data = resolve(args.data, allow_pipe=args.allow_pipe, flag="--allow-pipe")
    loaded = load_model(args.model)
    captioner_for(loaded.model)  # a model without a decoder fails here, before the shards are read
    context = loaded.model_cfg["text_cfg"].get("context_length", 77)
    max_length = args.max_length or min(30, context)
    check_decoding(args.beams, max_length, args.min_length, args.batch_size, context)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rows = generate_captions(loaded.model.to(device), data.urls, loaded.transform, args.batch_size, device,
                             args.beams, max_length, args.min_length, args.max_samples, args.allow_pipe, keys)
    out = write_captions(rows, args.out)
    print(f"captioned {len(rows)} samples -> {out}")
    return 0
