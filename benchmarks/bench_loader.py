"""Loader throughput: plait's TrainStream vs open_clip_train's get_wds_dataset vs a bare webdataset pipeline.

Same shards (real photos from opencv-doc and mate-backgrounds, sharded by `plait prep` at 512 px shortest side,
i.e. stored larger than the 224 px training input), same open_clip train transform and tokenizer, batch 64,
2 DataLoader workers, one process. Prints samples/s of train-ready batches and the ratios, then plait's time to
first batch when resuming deep into an epoch versus a fresh start, and the data-wait fraction of a short
`plait train` run on the same shards.

open_clip_train imports pandas (not a plait dependency); install it for this benchmark only:
    .venv/bin/pip install pandas braceexpand
open_clip_train 3.x also crashes with webdataset 1.x (its tar expander meets wds's end-of-shard `{}` marker):
this script patches that in memory (eof_value=None), never in the installed package.

Usage: .venv/bin/python benchmarks/bench_loader.py [--work DIR] [--samples 2000] [--batches 25] [--repeats 2]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import open_clip
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import cli as prep_cli  # noqa: E402
from pipeline.config import DataConfig, load_config  # noqa: E402
from pipeline.data.loader import TrainStream  # noqa: E402
from pipeline.train.distributed import World  # noqa: E402

PHOTO_DIRS = [Path("/usr/share/doc/opencv-doc/examples/data"), Path("/usr/share/backgrounds/mate")]
BATCH, WORKERS, SIZE, SHUFFLE = 64, 2, 224, 1000


def photo_folder(work: Path, num_samples: int) -> Path:
    """`num_samples` image+caption pairs (a folder source for `plait prep`) cycling over the real photos whose
    short side is >= 512 px; huge ones are first reduced to 1024 px on the long side to keep prep quick."""
    unique = work / "unique"
    unique.mkdir(parents=True, exist_ok=True)
    photos = []
    for path in sorted(p for d in PHOTO_DIRS for p in d.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        with Image.open(path) as img:
            if min(img.size) < 512:
                continue
            img = img.convert("RGB")
            img.thumbnail((1024, 1024))
            if min(img.size) < 512:
                img = Image.open(path).convert("RGB")
            out = unique / f"{len(photos):03d}.jpg"
            img.save(out, quality=92)
            photos.append((out, path.stem.replace("_", " ").replace("-", " ")))
    if not photos:
        raise FileNotFoundError("no photo >= 512 px in opencv-doc or mate-backgrounds: apt-get install opencv-doc "
                                "mate-backgrounds")
    src = work / "src"
    src.mkdir(exist_ok=True)
    for i in range(num_samples):
        photo, name = photos[i % len(photos)]
        os.link(photo, src / f"{i:06d}.jpg")  # a hard link: prep refuses symlinks that leave --input's folder
        (src / f"{i:06d}.txt").write_text(f"a photo of {name}, copy {i // len(photos)}")
    print(f"{len(photos)} distinct photos >= 512 px, {num_samples} samples")
    return src


def build_shards(work: Path, num_samples: int) -> str:
    out = work / "shards"
    if not (out / "sizes.json").exists():
        src = photo_folder(work, num_samples)
        t = time.perf_counter()
        prep_cli.main(["shard", "--input", str(src), "--input-format", "folder", "--image-size", "512",
                       "--output", str(out), "--samples-per-shard", "125", "--processes", "2", "--no-dedup",
                       "--no-progress"])
        print(f"plait prep: {num_samples} samples in {time.perf_counter() - t:.1f}s")
    shards = sorted(out.glob("*.tar"))
    return f"{out}/{{00000..{len(shards) - 1:05d}}}.tar"


def plait_loader(spec, transform, tokenizer, draft=True, workers=WORKERS):
    cfg = DataConfig(train_shards=spec, batch_size=BATCH, num_workers=workers, shuffle_buffer=SHUFFLE, draft=draft)
    return iter(TrainStream(cfg, World(), transform, tokenizer))


def open_clip_loader(spec, transform, tokenizer, workers=WORKERS):
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander
    # the documented wds 1.x incompatibility: no end-of-shard marker for open_clip's own group_by_keys
    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    args = Namespace(train_data=spec, train_num_samples=None, train_data_upsampling_factors=None,
                     dataset_resampled=False, seed=0, batch_size=BATCH, workers=workers, world_size=1, rank=0)
    info = ocd.get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    return iter(info.dataloader)


def bare_loader(spec, transform, tokenizer, workers=WORKERS):
    urls = wds.shardlists.expand_urls(spec)
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
               .shuffle(SHUFFLE).decode("pilrgb").to_tuple("jpg", "txt")
               .map_tuple(transform, lambda text: tokenizer([text])[0]).batched(BATCH, partial=False))
    return iter(wds.WebLoader(dataset, batch_size=None, num_workers=workers))


def measure(make, batches: int, clock=time.perf_counter) -> tuple[float, float]:
    """(seconds to the first batch, samples/s over the next `batches` batches) on `clock`."""
    t0 = clock()
    it = make()
    first = next(it)
    t1 = clock()
    for _ in range(batches):
        batch = next(it)
    t2 = clock()
    images = batch["image"] if isinstance(batch, dict) else batch[0]
    assert images.shape == (BATCH, 3, SIZE, SIZE), images.shape
    del first, it
    return t1 - t0, batches * BATCH / (t2 - t1)


def resume_shards(work: Path) -> str:
    """A dataset with a long epoch for the resume timing: Fashion-MNIST's 60k training images in 12 shards
    (a ready copy at /tmp/fm/train when present, else `plait prep` writes one into the work folder)."""
    ready = Path("/tmp/fm/train")
    if (ready / "sizes.json").exists():
        folder = ready
    else:
        folder = work / "fm"
        if not (folder / "sizes.json").exists():
            prep_cli.main(["shard", "--input", "/usr/share/datasets/fashion-mnist", "--input-format",
                           "fashion-mnist", "--split", "train", "--output", str(folder), "--samples-per-shard",
                           "5000", "--processes", "2", "--no-progress"])
    count = len(json.loads((folder / "sizes.json").read_text()))
    return f"{folder}/{{00000..{count - 1:05d}}}.tar"


def resume_times(spec, transform, tokenizer, points) -> list[tuple[int, float]]:
    out = []
    for consumed in points:
        stream = TrainStream(DataConfig(train_shards=spec, batch_size=BATCH, num_workers=WORKERS,
                                        shuffle_buffer=SHUFFLE), World(), transform, tokenizer)
        stream.load_state_dict({**stream.state_dict(), "consumed": consumed})
        t = time.perf_counter()
        next(iter(stream))
        out.append((consumed, time.perf_counter() - t))
    return out


def elastic_resume_time(spec, transform, tokenizer, fraction: float = 0.75) -> tuple[int, float]:
    """(batches consumed, seconds to the first batch) of a resume on 1 rank from the state of 2 ranks that
    were `fraction` through the epoch: the topology changes, the rest of the epoch is a new segment."""
    def stream(world):
        return TrainStream(DataConfig(train_shards=spec, batch_size=BATCH, num_workers=WORKERS,
                                      shuffle_buffer=SHUFFLE), world, transform, tokenizer)
    old = [stream(World(rank=r, world_size=2)) for r in range(2)]
    deep = int(old[0].batches_per_epoch * fraction)
    states = [{**s.state_dict(), "consumed": deep} for s in old]
    t = time.perf_counter()
    moved = stream(World())
    moved.load_elastic(states)
    next(iter(moved))
    seconds = time.perf_counter() - t
    moved.close()
    return deep, seconds


def data_wait_fraction(spec: str, work: Path, steps: int) -> dict | None:
    """A short `plait train` on the benchmark shards; the loop logs the data-wait fraction itself."""
    from pipeline.train import loop as train
    run_dir = work / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data.train_shards={json.dumps(spec)}", f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}",
                 "model.name=tiny-bench", f"train.steps={steps}", "train.log_every=5", "train.device=cpu",
                 f"train.run_dir={json.dumps(str(run_dir))}", "optim.warmup_steps=1"]
    try:
        train.run(load_config(None, overrides))
    except Exception as exn:  # the loop belongs to another module; report rather than hide the loader numbers
        print(f"training run failed: {type(exn).__name__}: {exn}")
        return None
    records = [json.loads(line) for p in run_dir.rglob("*.jsonl") for line in p.read_text().splitlines() if line]
    waits = [r["data_wait_fraction"] for r in records if "data_wait_fraction" in r][1:]  # skip warm-up window
    return {"windows": len(waits), "data_wait_fraction": sum(waits) / max(1, len(waits))}


def report_resume(work: Path, transform, tokenizer, rate: float | None) -> None:
    """Time to the first batch: fresh, resumed deep in the epoch, and resumed on another topology."""
    long_spec = resume_shards(work)
    per_epoch = TrainStream(DataConfig(train_shards=long_spec, batch_size=BATCH, num_workers=WORKERS), World(),
                            transform, tokenizer).batches_per_epoch
    points = [0, per_epoch // 4, per_epoch // 2, per_epoch - 2, 0]  # fresh twice: before and after
    print(f"\nresume on {long_spec} (epoch of {per_epoch} batches of {BATCH}): time to first batch")
    timings = resume_times(long_spec, transform, tokenizer, points)
    for consumed, seconds in timings:
        print(f"  after {consumed:5d} batches: {seconds:.2f}s")
    fresh = min(timings[0][1], timings[-1][1])
    deepest = timings[-2]
    print(f"  deepest / fresh = {deepest[1] / fresh:.2f}x (target <= 2x)"
          + (f"; decoding the {deepest[0]} skipped batches instead (skip_first_batches) would take "
             f"~{deepest[0] * BATCH / rate:.0f}s at the 224 px rate measured above" if rate else ""))
    deep, seconds = elastic_resume_time(long_spec, transform, tokenizer)
    print(f"  after a topology change (2 ranks x {WORKERS} workers {deep} batches into the epoch, resumed on 1 "
          f"rank): {seconds:.2f}s = {seconds / fresh:.2f}x fresh (target <= 2x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="folder for photos and shards (default: a fresh temp dir, removed after)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=25, help="timed batches after the first one")
    parser.add_argument("--repeats", type=int, default=2, help="runs per loader; the best is reported")
    parser.add_argument("--train-steps", type=int, default=30, help="steps of the data-wait run (0: skip)")
    parser.add_argument("--resume-only", action="store_true",
                        help="only the resume timings (fresh, deep in the epoch, after a topology change)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        transform = open_clip.image_transform(SIZE, is_train=True)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        if args.resume_only:
            report_resume(work, transform, tokenizer, rate=None)
            return 0
        spec = build_shards(work, args.samples)
        loaders = {"plait": plait_loader, "plait (no draft)": functools.partial(plait_loader, draft=False),
                   "open_clip_train": open_clip_loader, "bare webdataset": bare_loader}
        results = {name: [] for name in loaders}
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            for name, make in loaders.items():
                results[name].append(measure(lambda: make(spec, transform, tokenizer), args.batches))
        print(f"\n{'loader':18s} {'first batch s':>13s} {'samples/s':>10s}")
        best = {}
        for name, runs in results.items():
            first, rate = min(r[0] for r in runs), max(r[1] for r in runs)
            best[name] = rate
            print(f"{name:18s} {first:13.2f} {rate:10.1f}")
        print(f"\nplait / open_clip_train = {best['plait'] / best['open_clip_train']:.2f}x (target >= 1.5x)")
        print(f"plait / bare webdataset = {best['plait'] / best['bare webdataset']:.2f}x (target >= 1.0x)")
        print(f"draft decode alone      = {best['plait'] / best['plait (no draft)']:.2f}x")

        # Wall-clock rates swing with whatever else runs on the machine; the CPU time of the whole pipeline run
        # in this one process (workers=0) does not, and it is what bounds throughput on a busy node.
        print("\nin-process (0 workers), CPU time of this process only: samples per CPU-second")
        cpu = {}
        for name, make in loaders.items():
            rates = [measure(lambda: make(spec, transform, tokenizer, workers=0), max(4, args.batches // 3),
                             clock=time.process_time)[1] for _ in range(args.repeats)]
            cpu[name] = max(rates)
            print(f"{name:18s} {cpu[name]:10.1f}")
        print(f"plait / open_clip_train = {cpu['plait'] / cpu['open_clip_train']:.2f}x, "
              f"plait / bare webdataset = {cpu['plait'] / cpu['bare webdataset']:.2f}x (CPU-time based)")

        report_resume(work, transform, tokenizer, rate=best["plait"])
        if args.train_steps:
            wait = data_wait_fraction(spec, work, args.train_steps)
            if wait:
                print(f"\nplait train (model tiny-bench, batch {BATCH}, {WORKERS} workers): data-wait fraction "
                      f"{wait['data_wait_fraction']:.2f} over {wait['windows']} log windows")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
