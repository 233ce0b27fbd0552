"""Runs an exported model over a dataset's shards for `plait prep score` (what it writes, and the options:
score_set.py, whose docstring is the command's --help).

Shards stream through the model in batches: DataLoader workers read whole shards (raw bytes, data_prep/shards/tarwalk.py:
only the image and caption members are ever decoded, with PIL and UTF-8), run the model's own eval preprocess up to
a uint8 image, and the main process normalises once per batch and encodes. Several processes or GPUs through
Accelerate (`torchrun --nproc_per_node N -m data_prep.curate.score ...`): rank r scores every N-th unfinished shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.curate import score_set
from data_prep.curate.score_set import PLAN, PRECISION_NAMES, Dataset, ScoreOptions, add_arguments, open_dataset, options
from data_prep.shards import manifest
from data_prep.shards.members import MemberKeys
from data_prep.shards.tarwalk import TarFormatError, iter_samples
from data_prep.shards.writer import OutputDir, reason_kind

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16)))  # --precision -> autocast dtype


def model_fingerprint(path: str) -> dict[str, Any]:
    """What identifies the model: the sha256 of its weight files (and of its config) and where it was read."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.suffix in (
        ".safetensors", ".bin", ".pt", ".json") and f.name != "README.md") if p.is_dir() else []
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return {"path": str(p.resolve()), "sha256": digest.hexdigest()}


def load_scorer(path: str):
    """The model behind `path` (`local-dir:` prefix accepted), checked: its preprocessing must make the images its
    image tower takes, and image and text embeddings must have the same size."""
    from pipeline.artifacts.load import load_model

    path = path.removeprefix("local-dir:")
    if not Path(path).exists():
        raise FileNotFoundError(f"--model {path!r}: no such file or folder")
    config = Path(path) / "open_clip_config.json"
    if config.is_file():
        # open_clip would quietly resize to the tower's size: an export whose two halves disagree is refused
        cfg = json.loads(config.read_text())
        size = cfg.get("model_cfg", {}).get("vision_cfg", {}).get("image_size")
        pre = cfg.get("preprocess_cfg", {})
        if "size" in pre and size is not None and _pair(pre["size"]) != _pair(size):
            raise ValueError(f"--model {path!r}: preprocess_cfg size {pre['size']} does not match the image tower's "
                             f"image_size {size} (open_clip_config.json)")
        for k in ("mean", "std"):
            if k in pre and len(pre[k]) != 3:
                raise ValueError(f"--model {path!r}: preprocess_cfg {k} has {len(pre[k])} values, RGB needs 3")
    try:
        loaded = load_model(path)
    except RuntimeError as e:  # strict loading: weights of another shape than the config says
        raise ValueError(f"--model {path!r}: its weights do not match its config: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None
    from PIL import Image
    probe = loaded.transform(Image.new("RGB", (61, 47), (128, 128, 128)))  # [3, H, W]
    with torch.inference_mode():
        try:
            image = loaded.model.encode_image(probe[None].float())  # [1, E]
        except RuntimeError as e:
            raise ValueError(f"--model {path!r}: the image tower rejects its own preprocessing's output "
                             f"{tuple(probe.shape)}: {e}") from None
        text = loaded.model.encode_text(loaded.tokenize(["a photo"]))  # [1, E]
    if image.shape[-1] != text.shape[-1]:
        raise ValueError(f"--model {path!r}: image embeddings have {image.shape[-1]} dimensions, text embeddings "
                         f"{text.shape[-1]}: not an image-text model with a shared embedding space")
    return loaded, int(image.shape[-1])


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


# ------------------------------------------------------------------------------------------------ reading (workers)
class ShardBatches(IterableDataset):
    """Batches of decoded samples of whole shards; worker w of W reads shards w, w+W, ... of `shards`.

    Each batch: shard (tar name), keys, image uint8 [B, 3, H, W], text [B, L] for the decodable samples; bad
    [(key, reason)] for the others; done (last batch of the shard), error (why the shard ended early)."""

    def __init__(self, dataset: str, shards: list[str], transform, tokenize, batch_size: int,
                 keys: MemberKeys | None = None):
        from pipeline.data.transforms import decode_min_side, split_transform
        self.dataset, self.shards, self.tokenize, self.batch_size = dataset, shards, tokenize, batch_size
        self.keys = keys or MemberKeys.parse()
        self.head, self.normalize = split_transform(transform)
        self.min_side = decode_min_side(transform)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard in self.shards[worker::workers]:
            yield from self.shard_batches(shard)

    def _decode(self, members: dict[str, bytes]) -> tuple[torch.Tensor, str]:
        from pipeline.data.transforms import decode_image, to_uint8
        caption = self.keys.caption_of(members)  # KeyError / UnicodeDecodeError: the sample's reason
        media, _ = self.keys.image_members(members)  # the loader's rule (shards/members)
        if not media:
            raise KeyError(self.keys.missing_image(members))
        ext = media[len(media) // 2]  # a video sample: its middle frame
        image = self.head(decode_image(members[ext], self.min_side))
        tensor = to_uint8(image) if self.normalize is not None else image  # [3, H, W]
        return tensor, caption

    def shard_batches(self, shard: str) -> Iterator[dict]:
        import fsspec
        keys, images, captions, bad = [], [], [], []
        error = None

        def batch(done: bool) -> dict:
            out = {"shard": shard, "keys": list(keys), "bad": list(bad), "done": done, "error": error,
                   "image": torch.stack(images) if images else torch.zeros(0),  # [B, 3, H, W]
                   "text": self.tokenize(captions) if captions else torch.zeros(0, dtype=torch.long)}  # [B, L]
            keys.clear(), images.clear(), captions.clear(), bad.clear()
            return out

        wanted = self.keys.wants
        try:
            with fsspec.open(f"{self.dataset.rstrip('/')}/{shard}", "rb") as f:
                for sample in iter_samples(f, wanted):
                    try:
                        image, caption = self._decode({e: p for e, p in sample.members if p is not None})
                    except Exception as e:  # PIL raises many types for corrupt images: each is a reason
                        bad.append((sample.key, f"undecodable ({type(e).__name__}: {e})"))
                    else:
                        keys.append(sample.key), images.append(image), captions.append(caption)
                    if len(keys) == self.batch_size:
                        yield batch(False)
        except (TarFormatError, OSError, EOFError) as e:
            error = f"unreadable shard ({type(e).__name__}: {e})"
        yield batch(True)


# ------------------------------------------------------------------------------------------------ writing
def _embedding_array(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    values = np.zeros((len(rows), dim), np.float16)
    mask = np.array([r is None for r in rows])
    for i, r in enumerate(rows):
        if r is not None:
            values[i] = r
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(mask))


def score_schema(dim: int | None) -> pa.Schema:
    fields = [("key", pa.string()), ("shard", pa.string()), ("score", pa.float32()), ("reason", pa.string())]
    if dim:
        fields += [("image_embedding", pa.list_(pa.float16(), dim)), ("text_embedding", pa.list_(pa.float16(), dim))]
    return pa.schema(fields)


class ShardResult:
    """The rows of one shard as its batches arrive (batches of one shard may interleave with others')."""

    def __init__(self, shard: str):
        self.shard, self.rows, self.started = shard, [], time.monotonic()

    def write(self, out: OutputDir, dim: int | None, expected: list[str] | None, error: str | None) -> dict:
        seen = {r[0] for r in self.rows}
        # Keys the index promised that an unreadable tar did not deliver: recorded, never silently lost.
        for key in expected or []:
            if key not in seen:
                self.rows.append((key, None, error or "missing from the tar", None, None))
        self.rows.sort(key=lambda r: r[0])
        cols = list(zip(*self.rows)) if self.rows else [[]] * 5
        arrays = [pa.array(cols[0], pa.string()), pa.array([self.shard] * len(self.rows), pa.string()),
                  pa.array(cols[1], pa.float32()), pa.array(cols[2], pa.string())]
        if dim:
            arrays += [_embedding_array(list(cols[3]), dim), _embedding_array(list(cols[4]), dim)]
        table = pa.Table.from_arrays(arrays, schema=score_schema(dim))
        stem = self.shard.removesuffix(".tar")
        with out.open_atomic(f"{stem}.parquet") as f:
            pq.write_table(table, f)
        reasons = Counter(reason_kind(r[2]) for r in self.rows if r[1] is None)
        stats = {"format": "plait-scores/1", "shard": self.shard, "num_samples": len(self.rows),
                 "num_scored": len(self.rows) - sum(reasons.values()), "num_null": sum(reasons.values()),
                 "reasons": dict(sorted(reasons.items())), "error": error,
                 "seconds": round(time.monotonic() - self.started, 3)}
        out.write_json(f"{stem}_stats.json", stats)
        return stats


def expected_keys(dataset: Dataset, shard: str) -> list[str] | None:
    """The keys a plait shard holds, from its member index (None for other tars)."""
    import fsspec
    if not dataset.plait:
        return None
    try:
        with fsspec.open(f"{dataset.url.rstrip('/')}/{shard.removesuffix('.tar')}.idx.json", "rb") as f:
            return list(json.loads(f.read())["keys"])
    except (OSError, ValueError, KeyError):
        return None


# ------------------------------------------------------------------------------------------------ the run
def check_plan(out: OutputDir, plan: dict[str, Any]) -> None:
    """Refuses to mix: a score folder holds the scores of one dataset under one model with one setting."""
    if not out.exists(PLAN):
        return
    have = out.read_json(PLAN)
    diffs = [k for k in ("dataset_fingerprint", "model", "embeddings", "precision")
             if have.get(k) != plan.get(k)]
    if diffs:
        what = ", ".join(f"{k}: {have.get(k)!r} then, {plan.get(k)!r} now" for k in diffs)
        raise ValueError(f"--out {out.url!r} holds scores of another run ({what}): use another --out")


def score(opts: ScoreOptions) -> dict[str, Any]:
    """Scores every unfinished shard of `opts.dataset` (this rank's share of them); returns the summary."""
    from accelerate import Accelerator

    started = time.monotonic()
    dataset = open_dataset(opts.dataset)
    loaded, dim = load_scorer(opts.model)
    # cpu=True also on a machine without GPUs: only then does Accelerate set up gloo for several CPU processes
    accelerator = Accelerator(cpu=opts.device == "cpu" or (opts.device == "auto" and not torch.cuda.is_available()))
    if opts.device == "cuda" and accelerator.device.type != "cuda":
        raise ValueError("--device cuda: no GPU visible")
    rank, world = accelerator.process_index, accelerator.num_processes
    out = OutputDir(opts.out_dir)
    out.claim("--out", PLAN, lambda p: isinstance(p, dict) and p.get("format") == "plait-score-plan/1",
              "plait prep score")
    plan = {"format": "plait-score-plan/1", "dataset": dataset.url, "dataset_fingerprint": dataset.fingerprint,
            "model": model_fingerprint(opts.model.removeprefix("local-dir:")), "embedding_dim": dim,
            "embeddings": opts.embeddings, "precision": opts.precision, "shards": dataset.shards}
    check_plan(out, plan)
    n = len(dataset.shards)
    task_shards = dataset.shards[opts.task_index * n // opts.num_tasks:(opts.task_index + 1) * n // opts.num_tasks]
    pending = [s for s in task_shards if not out.exists(f"{s.removesuffix('.tar')}_stats.json")]
    accelerator.wait_for_everyone()  # every rank has listed the unfinished shards before any is written
    if accelerator.is_main_process and not out.exists(PLAN):
        out.write_json(PLAN, plan)
    mine = pending[rank::world]
    model = loaded.model.to(accelerator.device).eval()
    stream = ShardBatches(dataset.url, mine, loaded.transform, loaded.tokenize, opts.batch_size,
                          MemberKeys.parse(opts.image_keys, opts.caption_keys, names=("--image-keys", "--caption-keys")))
    workers = min(opts.num_workers, len(mine))
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=False) if workers else stream
    bar = _bar(opts.progress and accelerator.is_main_process, dataset, mine, world)
    results: dict[str, ShardResult] = {}
    num_done = 0
    dtype = PRECISIONS[opts.precision]
    for batch in loader:
        res = results.setdefault(batch["shard"], ShardResult(batch["shard"]))
        if batch["keys"]:
            scores, fi, ft = encode_batch(model, batch["image"], batch["text"], stream.normalize,
                                          accelerator.device, dtype)
            for i, key in enumerate(batch["keys"]):
                res.rows.append((key, float(scores[i]), None, fi[i] if opts.embeddings else None,
                                 ft[i] if opts.embeddings else None))
        res.rows += [(key, None, reason, None, None) for key, reason in batch["bad"]]
        if bar is not None:
            bar.update((len(batch["keys"]) + len(batch["bad"])) * world)
        if batch["done"]:
            shard = batch["shard"]
            results.pop(shard).write(out, dim if opts.embeddings else None, expected_keys(dataset, shard),
                                     batch["error"])
            num_done += 1
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        summary = summarize(out, dataset, time.monotonic() - started, pending)
        out.write_json("summary.json", summary)
    accelerator.wait_for_everyone()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


@torch.inference_mode()
def encode_batch(model, images: torch.Tensor, text: torch.Tensor, normalize, device: torch.device,
                 dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine [B], image embeddings [B, E], text embeddings [B, E]) as numpy, embeddings float16."""
    from pipeline.models.towers import encode_text_tokens, padding_is_inert, trimmed_text_length

    images = images.to(device, non_blocking=True)
    if normalize is not None:
        images = normalize(images)  # uint8 [B, 3, H, W] -> normalised float
    text = text.to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        fi = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)  # [B, E]
        if padding_is_inert(model):
            # the causal tower pools at end-of-text: the all-padding tail columns change nothing, so they are cut
            # (a 77-token context holding ~15-token captions is 5x less text compute)
            pooled, _ = encode_text_tokens(model, text[:, :trimmed_text_length(model, text)])  # [B, E]
        else:
            pooled = model.encode_text(text)  # [B, E]
        ft = torch.nn.functional.normalize(pooled.float(), dim=-1)  # [B, E]
    scores = (fi * ft).sum(-1)  # [B]
    return scores.cpu().numpy(), fi.half().cpu().numpy(), ft.half().cpu().numpy()


def _bar(enabled: bool, dataset: Dataset, mine: list[str], world: int):
    if not enabled:
        return None
    from tqdm import tqdm
    total = sum(dataset.sizes.get(s, 0) for s in mine) * world if dataset.sizes else None
    # rank 0 counts its own samples times the ranks: the others score equal shares of the shards
    return tqdm(total=total, unit=" samples", file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                desc="scoring" if world == 1 else f"scoring ({world} ranks, estimated from rank 0)")


def summarize(out: OutputDir, dataset: Dataset, seconds: float, scored_now: list[str]) -> dict[str, Any]:
    """Quantiles over every score in the folder; samples/s over the shards this run scored."""
    missing = [s for s in dataset.shards if not out.exists(f"{s.removesuffix('.tar')}_stats.json")]
    stats = [out.read_json(f"{s.removesuffix('.tar')}_stats.json") for s in dataset.shards if s not in missing]
    scores = []
    for s in dataset.shards:
        if s not in missing:
            with out.fs.open(out.path(f"{s.removesuffix('.tar')}.parquet"), "rb") as f:
                col = manifest.read_parquet(f, ["score"]).column("score")
            scores.append(col.drop_null().to_numpy())
    scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    reasons: Counter[str] = Counter()
    for st in stats:
        reasons.update(st["reasons"])
    now = sum(st["num_samples"] for st in stats if st["shard"] in set(scored_now))
    qs = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    return {"format": "plait-score-summary/1", "num_shards": len(stats), "shards_missing": missing,
            "num_samples": sum(st["num_samples"] for st in stats), "num_scored": int(scores.size),
            "num_null": sum(reasons.values()), "null_reasons": dict(reasons.most_common()),
            "shard_errors": {st["shard"]: st["error"] for st in stats if st["error"]},
            "samples_this_run": now, "seconds_this_run": round(seconds, 3),
            "samples_per_s": round(now / seconds, 1) if seconds > 0 else None,
            "quantiles": {f"q{int(q * 100):02d}": float(np.quantile(scores, q)) for q in qs} if scores.size else {},
            "mean": float(scores.mean()) if scores.size else None}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"scored {summary['num_scored']} of {summary['num_samples']} samples in {summary['num_shards']} "
             f"shard(s); this run {summary['samples_this_run']} samples in {summary['seconds_this_run']:.1f} s "
             f"({summary['samples_per_s'] or 0:.0f} samples/s)"]
    if summary["quantiles"]:
        lines.append("score quantiles: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["quantiles"].items()))
    for reason, n in summary["null_reasons"].items():
        lines.append(f"  {n:>8}  null: {reason}")
    for shard, error in summary["shard_errors"].items():
        lines.append(f"  {shard}: {error}")
    if summary["shards_missing"]:
        lines.append(f"not yet scored: {len(summary['shards_missing'])} shard(s) (run again to finish)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry for several processes: `torchrun --nproc_per_node N -m data_prep.curate.score DATASET --model M`."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.curate.score", description=score_set.__doc__.split("\n\n")[0])
    add_arguments(parser)
    summary = score(options(parser.parse_args(argv)))
    if summary:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"plait prep score: error: {e}", file=sys.stderr)
        sys.exit(2)
