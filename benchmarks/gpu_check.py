"""The GPU measurement in one script (< 8 minutes on one GPU with 16 CPU cores): one JSON line and a short table.

1. `plait train` (ViT-B-32, bf16, real loading from shards stored at 256 px, 16 workers) for contrastive,
   + FLIP 50%, and + FLIP + MAE + MLM, each against a hand-written open_clip loop on the same model, batch and
   shards in the same run (open_clip's own patch dropout for FLIP; MAE + MLM have no open_clip loop, so that
   row is set against the hand-written FLIP loop). samples/s from medians of per-step times after warm-up,
   MFU against the measured bf16 matmul peak, peak GPU memory.
2. The loader alone at 224 px, 16 workers: plait's TrainStream vs open_clip_train's get_wds_dataset.
3. The text tower on packed captions (block-diagonal mask) vs padded-and-trimmed captions (plain causal mask,
   fused attention), forward + backward: if packing loses on the GPU, the summary says so.

Shards are built by `plait prep` from the photos of opencv-doc / mate-backgrounds where installed, else from
synthetic JPEGs (smooth noise), so the script needs nothing beyond plait's own dependencies. open_clip_train
needs pandas and braceexpand: without them the loader comparison is skipped and says so.

    python benchmarks/gpu_check.py [--work DIR] [--out FILE.json]
    python benchmarks/gpu_check.py --smoke     # tiny model on CPU, a few steps: what the test suite runs
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from open_clip.loss import ClipLoss
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep import cli as prep_cli  # noqa: E402
from pipeline.config import DataConfig, load_config  # noqa: E402
from pipeline.data.loader import TrainStream  # noqa: E402
from pipeline.train.distributed import World  # noqa: E402
from pipeline.models.sizes import model_config  # noqa: E402
from pipeline.models.towers import encode_text_packed, encode_text_tokens, trimmed_text_length  # noqa: E402
from pipeline.train.loop import run as plait_run  # noqa: E402

PHOTO_DIRS = [Path("/usr/share/doc/opencv-doc/examples/data"), Path("/usr/share/backgrounds/mate")]
WORDS = ("red", "small", "old", "bright", "wooden", "city", "street", "dog", "cat", "car", "tree", "house", "river",
         "mountain", "person", "table", "chair", "window", "sky", "night", "beach", "flower", "book", "phone")

# (row name, plait config overrides, patch dropout of the hand-written open_clip loop it is set against)
OBJECTIVES = (("contrastive", [], 0.0),
              ("flip50", ["objective.flip.mask_ratio=0.5"], 0.5),
              ("flip50+mae+mlm", ["objective.flip.mask_ratio=0.5", "objective.mae.weight=0.5",
                                  "objective.mlm.weight=0.5"], 0.5))


@dataclass(frozen=True)
class Setup:
    """One scale of the check: the GPU run, or the CPU smoke run of the test suite."""

    model: str
    device: str
    precision: str      # "bf16" or "fp32"
    batch: int
    steps: int          # per training run; the first `warmup` are not timed
    warmup: int
    workers: int
    samples: int        # shards hold this many samples
    stored_px: int      # shortest side as stored by prep
    loader_batches: int


GPU = Setup("ViT-B-32", "cuda", "bf16", 256, 40, 10, 16, 16384, 256, 40)
SMOKE = Setup("tiny-bench", "cpu", "fp32", 16, 4, 1, 1, 128, 72, 2)


# ---------------------------------------------------------------------------------------------------- shards
def source_images(folder: Path, count: int) -> list[Path]:
    """Up to `count` distinct JPEGs: the Debian photos where present, else smooth synthetic ones."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for d in PHOTO_DIRS if d.exists() for p in d.rglob("*")
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = []
    for i, path in enumerate(photos[:count]):
        with Image.open(path) as img:
            img = img.convert("RGB")
            if min(img.size) < 64:
                continue
            img.thumbnail((768, 768))
            img.save(folder / f"photo{i:04d}.jpg", quality=90)
            out.append(folder / f"photo{i:04d}.jpg")
    rng = np.random.default_rng(0)
    while len(out) < min(count, 64):  # no photos installed (e.g. a bare GPU machine): smooth noise images
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((rng.integers(320, 640), rng.integers(320, 640)), Image.BICUBIC)
        path = folder / f"synthetic{len(out):04d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


def build_shards(work: Path, setup: Setup, processes: int) -> str:
    """`setup.samples` image-caption pairs cycling over the source images, sharded by `plait prep` (no dedup:
    the cycle repeats images on purpose). Fails loudly if prep kept nothing."""
    out = work / f"shards-{setup.stored_px}-{setup.samples}"
    if not (out / "sizes.json").exists():
        images = source_images(work / "images", 200)
        folder = work / f"pairs-{setup.samples}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for i in range(setup.samples):
            target = folder / f"{i:06d}.jpg"
            if not target.exists():  # a hard link, not a symlink: prep refuses links that leave its input folder
                try:
                    os.link(images[i % len(images)], target)
                except OSError:
                    shutil.copyfile(images[i % len(images)], target)
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 18)))
            (folder / f"{i:06d}.txt").write_text(f"a photo of a {words}")
        prep_cli.main(["shard", "--input", str(folder), "--input-format", "folder", "--image-size",
                       str(setup.stored_px), "--output", str(out), "--samples-per-shard",
                       str(max(32, setup.samples // 64)), "--processes", str(processes), "--no-dedup",
                       "--no-progress"])
    sizes = json.loads((out / "sizes.json").read_text())
    if sum(sizes.values()) < setup.samples:
        raise RuntimeError(f"plait prep kept {sum(sizes.values())} of {setup.samples} pairs in {out}: see its summary")
    return f"{out}/{{00000..{len(sizes) - 1:05d}}}.tar"


# -------------------------------------------------------------------------------------------------- training
def plait_step_times(setup: Setup, shards: str, overrides: list[str], run_dir: Path) -> tuple[list[float], float]:
    """Seconds per step after warm-up from the run's metrics log (a record every step), and peak GPU memory."""
    cfg = load_config(None, [f"model.name={setup.model}", f"data.train_shards={json.dumps(shards)}",
                             f"data.batch_size={setup.batch}", f"data.num_workers={setup.workers}",
                             f"train.device={setup.device}", f"train.precision={setup.precision}",
                             f"train.steps={setup.steps}", "train.log_every=1",
                             f"train.run_dir={json.dumps(str(run_dir))}", "optim.warmup_steps=2", *overrides])
    _reset_memory(setup)
    plait_run(cfg)
    elapsed = [json.loads(x)["elapsed_s"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
               if json.loads(x).get("kind") == "train"]
    return [b - a for a, b in zip(elapsed[setup.warmup - 1:], elapsed[setup.warmup:])], _peak_memory_gb(setup)


def hand_model(setup: Setup, patch_dropout: float) -> torch.nn.Module:
    cfg = model_config(setup.model)
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "patch_dropout": patch_dropout}}
    return open_clip.CLIP(**cfg, output_dict=True)


def hand_step_times(setup: Setup, shards: str, patch_dropout: float) -> tuple[list[float], float]:
    """The loop a user writes with open_clip: a webdataset pipeline, autocast, ClipLoss, fused AdamW."""
    torch.manual_seed(0)
    device = torch.device(setup.device)
    model = hand_model(setup, patch_dropout).to(device)
    size = model.visual.image_size[0]
    transform = open_clip.image_transform(size, is_train=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards), wds.split_by_worker, wds.tarfile_to_samples(), wds.shuffle(1000),
        wds.decode("pilrgb"), wds.to_tuple("jpg", "txt"), wds.map_tuple(transform, lambda t: tokenizer([t])[0]),
        wds.batched(setup.batch, partial=False))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=setup.workers,
                           pin_memory=device.type == "cuda", persistent_workers=True).repeat(100)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")
    batches = iter(loader)
    _reset_memory(setup)
    times, last = [], time.perf_counter()
    for step in range(setup.steps):
        images, texts = next(batches)
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        with autocast:
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        loss.item()  # a host sync per step, as the plait run's per-step log has
        now = time.perf_counter()
        if step >= setup.warmup:
            times.append(now - last)
        last = now
    return times, _peak_memory_gb(setup)


def flops_per_step(setup: Setup, patch_dropout: float) -> float:
    """Model FLOPs of one forward + backward of the hand-written model at the batch (text at full context)."""
    device = torch.device(setup.device)
    model = hand_model(setup, patch_dropout).to(device)
    size = model.visual.image_size[0]
    batch = min(setup.batch, 32)  # FLOPs are linear in the batch: count a slice, scale up
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(1, 49000, (batch, model.context_length), device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return float(counter.get_total_flops()) * setup.batch / batch


def matmul_peak_flops(setup: Setup) -> float:
    """Best of 20 square matmuls in the training dtype: the denominator of MFU."""
    n = 8192 if setup.device == "cuda" else 2048
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=setup.device, dtype=dtype)
    b = torch.randn(n, n, device=setup.device, dtype=dtype)
    best = float("inf")
    for _ in range(20):
        _sync(setup)
        t = time.perf_counter()
        a @ b
        _sync(setup)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------------------------------------------- loader
def loader_rates(setup: Setup, shards: str) -> dict:
    """Train-ready batches/s at the model's input size: plait's TrainStream vs open_clip_train's loader."""
    cfg = model_config(setup.model)
    size = cfg["vision_cfg"]["image_size"]
    transform = open_clip.image_transform(size, is_train=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))

    def plait():
        data = DataConfig(train_shards=shards, batch_size=setup.batch, num_workers=setup.workers)
        return iter(TrainStream(data, World(), transform, tokenizer))

    def open_clip_wds():
        import open_clip_train.data as ocd
        from webdataset.tariterators import tar_file_expander
        # open_clip_train 3.x with webdataset 1.x meets wds's end-of-shard {} marker: off, patched here only
        ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
        args = Namespace(train_data=shards, train_num_samples=None, train_data_upsampling_factors=None,
                         dataset_resampled=False, seed=0, batch_size=setup.batch, workers=setup.workers,
                         world_size=1, rank=0)
        return iter(ocd.get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer).dataloader)

    out = {"plait": _samples_per_s(plait, setup)}
    try:
        out["open_clip"] = _samples_per_s(open_clip_wds, setup)
    except ImportError as exc:
        out["open_clip_skipped"] = f"open_clip_train cannot be imported ({exc}): pip install pandas braceexpand"
    return out


def _samples_per_s(make, setup: Setup) -> float:
    it = make()
    next(it)  # workers started, first batch in
    started = time.perf_counter()
    for _ in range(setup.loader_batches):
        next(it)
    return setup.loader_batches * setup.batch / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------ text tower
def text_tower_times(setup: Setup) -> dict:
    """Forward + backward of the text tower over web-like captions: packed rows vs padded (trimmed) rows."""
    device = torch.device(setup.device)
    clip = hand_model(setup, 0.0).to(device)
    tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
    rng = random.Random(0)
    captions = ["a photo of " + " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(2.2, 0.6))))
                for _ in range(setup.batch)]
    text = tokenizer(captions).to(device)                          # [B, L]
    trimmed = text[:, :trimmed_text_length(clip, text)]            # [B, L']
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")

    def step(encode, tokens):
        with autocast:
            pooled, _ = encode(clip, tokens)
        pooled.float().sum().backward()

    times = {"packed": [], "padded": []}
    for _ in range(3):
        step(encode_text_packed, trimmed), step(encode_text_tokens, trimmed)  # warm-up (kernels, allocator)
    for _ in range(20 if setup.device == "cuda" else 3):
        for name, encode in (("packed", encode_text_packed), ("padded", encode_text_tokens)):
            _sync(setup)
            t = time.perf_counter()
            step(encode, trimmed)
            _sync(setup)
            times[name].append(time.perf_counter() - t)
    packed, padded = statistics.median(times["packed"]), statistics.median(times["padded"])
    return {"packed_ms": packed * 1e3, "padded_ms": padded * 1e3, "packed_over_padded": packed / padded,
            "trimmed_length": int(trimmed.shape[1]), "mean_tokens": float((text.argmax(-1) + 1).float().mean())}


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def _reset_memory(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gb(setup: Setup) -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if setup.device == "cuda" else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="", help="folder for shards and runs (default: a temporary one)")
    parser.add_argument("--out", default="", help="also write the JSON result to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps (the test suite)")
    args = parser.parse_args(argv)
    setup = SMOKE if args.smoke else GPU
    if setup.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --smoke for the CPU check")
    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="plait-gpu-check-"))
    result: dict = {"setup": setup.__dict__, "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"}
    shards = build_shards(work, setup, processes=1 if args.smoke else min(16, torch.multiprocessing.cpu_count()))
    result["prep_s"] = time.perf_counter() - started
    peak = matmul_peak_flops(setup)
    result["matmul_peak_tflops"] = peak / 1e12
    rows, hand_cache = [], {}
    for name, overrides, dropout in OBJECTIVES:
        plait_times, plait_mem = plait_step_times(setup, shards, overrides, work / f"run-{name}")
        if dropout not in hand_cache:
            hand_cache[dropout] = (*hand_step_times(setup, shards, dropout), flops_per_step(setup, dropout))
        hand_times, hand_mem, flops = hand_cache[dropout]
        plait_sps = setup.batch / statistics.median(plait_times)
        hand_sps = setup.batch / statistics.median(hand_times)
        rows.append({"objective": name, "plait_samples_per_s": plait_sps, "open_clip_samples_per_s": hand_sps,
                     "ratio": plait_sps / hand_sps, "plait_mfu": plait_sps / setup.batch * flops / peak,
                     "open_clip_mfu": hand_sps / setup.batch * flops / peak, "plait_peak_gb": plait_mem,
                     "open_clip_peak_gb": hand_mem})
        print(json.dumps(rows[-1]), flush=True)
    # Measured again after the training rows, the best of both: a peak taken while the machine was busy (a shared
    # node, a CPU that clocks up under load) would understate the denominator and give an MFU above 100%.
    again = matmul_peak_flops(setup)
    if again > peak:
        for row in rows:
            row["plait_mfu"], row["open_clip_mfu"] = row["plait_mfu"] * peak / again, row["open_clip_mfu"] * peak / again
        peak = again
        result["matmul_peak_tflops"] = peak / 1e12
    result["train"] = rows
    result["loader"] = loader_rates(setup, shards)
    result["text_tower"] = text_tower_times(setup)
    if result["text_tower"]["packed_over_padded"] > 1.0:
        result["text_tower"]["verdict"] = ("packing loses to padding here: set the packed path off on this device "
                                           "(PlaitModel(pack_text=False))")
    else:
        result["text_tower"]["verdict"] = "packing wins or ties: keep it on"
    result["wall_s"] = time.perf_counter() - started

    print(f"\n{result['device_name']}, {setup.model}, batch {setup.batch}, {setup.precision}, "
          f"{setup.workers} workers; matmul peak {result['matmul_peak_tflops']:.1f} TFLOP/s")
    print("| objective | plait samples/s | open_clip loop samples/s | ratio | plait MFU | peak GB plait / open_clip |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['plait_samples_per_s']:.4g} | {r['open_clip_samples_per_s']:.4g} | "
              f"{r['ratio']:.2f} | {r['plait_mfu']:.1%} | {r['plait_peak_gb']:.1f} / {r['open_clip_peak_gb']:.1f} |")
    loader = result["loader"]
    print(f"loader alone: plait {loader['plait']:.4g} samples/s, open_clip "
          + (f"{loader['open_clip']:.4g} samples/s (ratio {loader['plait'] / loader['open_clip']:.2f})"
             if "open_clip" in loader else loader["open_clip_skipped"]))
    tt = result["text_tower"]
    print(f"text tower fwd+bwd: packed {tt['packed_ms']:.2f} ms vs padded {tt['padded_ms']:.2f} ms "
          f"({tt['packed_over_padded']:.2f}x; {tt['verdict']})")
    print(f"wall {result['wall_s']:.0f} s")
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
