"""Benchmark `plait prep shard` against img2dataset 1.47.0 and a bare Pillow loop on the same real photos.

    .venv/bin/python benchmarks/bench_prep.py [--rows 1200] [--processes 2] [--memory-rows 10000,1000000]

Corpus: every JPEG of Debian's opencv-doc examples and mate-backgrounds, repeated to --rows rows, as file:// URLs in
a CSV. Same settings for all three: image size 256, keep_ratio, no upscaling, JPEG quality 95, 2 processes, 2 shards
per process for both tools, which parallelise over whole shards (resampling:
bicubic for plait and the bare loop, img2dataset's own INTER_AREA).
img2dataset runs in its own venv (benchmarks/.venv/img2dataset, created here if absent: it pins webdataset<0.3
and opencv<5, which must not enter the project's venv). The bare loop (decode with draft -> resize -> encode, in a
warm multiprocessing pool, timing only the map) is the ceiling. Then the peak memory of a job at each --memory-rows size (cheap
corpus, see memory_probe): it should stay flat.
Wall times include process start-up for plait and img2dataset alike.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
I2D_VENV = REPO / "benchmarks" / ".venv" / "img2dataset"
PHOTO_GLOBS = ("/usr/share/doc/opencv-doc/examples/**/*.jpg", "/usr/share/backgrounds/mate/**/*.jpg")


def photos() -> list[str]:
    paths = sorted({p for g in PHOTO_GLOBS for p in glob.glob(g, recursive=True)})
    if not paths:
        sys.exit("no photos: apt-get install opencv-doc mate-backgrounds")
    return paths


def write_corpus(path: Path, files: list[str], rows: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(rows):
            w.writerow([f"file://{files[i % len(files)]}", f"photo number {i}"])


def run_plait(corpus: Path, out: Path, processes: int, per_shard: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "data_prep", "shard", "--input", str(corpus), "--output", str(out),
           "--image-size", "256", "--resize-mode", "keep_ratio", "--encode-quality", "95", "--processes",
           str(processes), "--samples-per-shard", str(per_shard), "--no-dedup", "--no-progress",
           "--local-root", "/usr/share"]  # the photos' folders (opencv-doc, mate-backgrounds)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return wall, json.loads((out / "manifest.json").read_text())["num_samples"]


def ensure_img2dataset() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {I2D_VENV} with img2dataset==1.47.0 ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset==1.47.0"], check=True)
    return exe


def run_img2dataset(corpus: Path, out: Path, processes: int, per_shard: int) -> tuple[float, int]:
    cmd = [str(ensure_img2dataset()), "--url_list", str(corpus), "--input_format", "csv", "--url_col", "url",
           "--caption_col", "caption", "--output_folder", str(out), "--output_format", "webdataset",
           "--processes_count", str(processes), "--thread_count", "16", "--image_size", "256",
           "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True", "--encode_quality", "95",
           "--encode_format", "jpg", "--number_sample_per_shard", str(per_shard), "--distributor", "multiprocessing",
           "--enable_wandb", "False"]
    t = time.perf_counter()
    # albumentations (an img2dataset dependency) checks PyPI for updates at import: on an offline node that is a
    # network timeout, not img2dataset's work
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    ok = sum(json.loads(Path(p).read_text())["successes"] for p in glob.glob(str(out / "*_stats.json")))
    return wall, ok


def _bare_one(path: str) -> int:
    from PIL import Image
    with Image.open(path) as img:
        w, h = img.size
        scale = min(1.0, 256 / min(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if scale < 1:
            img.draft("RGB", size)
        img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        return len(buf.getvalue())


def run_bare(files: list[str], rows: int, processes: int) -> tuple[float, int]:
    work = [files[i % len(files)] for i in range(rows)]
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_bare_one, work[: 2 * processes])  # warm the workers
        t = time.perf_counter()
        pool.map(_bare_one, work, chunksize=8)
        return time.perf_counter() - t, len(work)


def memory_probe(rows: int, tmp: Path) -> dict[str, float]:
    """Peak RSS of one in-process job (reader, planner, worker, writer and merge all in one process) over a cheap
    corpus: one row in 100 is a tiny real JPEG, the others name missing files (rejected at the fetch stage after
    going through the reader, the plan, the per-row records and the manifests like any row)."""
    from PIL import Image
    tiny = tmp / "tiny.jpg"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tiny, quality=90)
    corpus = tmp / f"mem_{rows}.csv"
    with open(corpus, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in range(rows):
            w.writerow([f"file://{tiny}" if i % 100 == 0 else f"{tmp}/missing/{i}.jpg", f"row {i}"])
    out = tmp / f"mem_{rows}"
    probe = ("import json, resource, sys, time; from data_prep.cli import main; t = time.perf_counter(); "
             "main(sys.argv[1:]); print(json.dumps({'wall': time.perf_counter() - t, "
             "'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
    cmd = [sys.executable, "-c", probe, "shard", "--input", str(corpus), "--output", str(out), "--processes", "1",
           "--no-dedup", "--no-progress"]
    res = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    corpus.unlink()
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--memory-rows", default="10000,1000000", help="comma-separated sizes; empty to skip")
    ap.add_argument("--skip-img2dataset", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs; the best time of each side counts")
    a = ap.parse_args(argv)
    files = photos()
    with tempfile.TemporaryDirectory(prefix="bench_prep_") as d:
        tmp = Path(d)
        corpus = tmp / "corpus.csv"
        write_corpus(corpus, files, a.rows)
        print(f"corpus: {a.rows} rows over {len(files)} real JPEGs; 256 px keep_ratio, no upscale, q95, "
              f"{a.processes} processes, {math.ceil(a.rows / (2 * a.processes))} samples per shard, "
              f"{os.cpu_count()} cores", flush=True)
        # both tools parallelise over whole shards: 2 shards per process keeps every process busy
        per_shard = math.ceil(a.rows / (2 * a.processes))
        best: dict[str, tuple[float, int]] = {}
        for rep in range(a.repeat):  # interleaved, best of each: other jobs on the machine add noise
            runs = {"bare": lambda: run_bare(files, a.rows, a.processes),
                    "plait": lambda: run_plait(corpus, tmp / f"plait{rep}", a.processes, per_shard)}
            if not a.skip_img2dataset:
                runs["img2dataset"] = lambda: run_img2dataset(corpus, tmp / f"i2d{rep}", a.processes, per_shard)
            for name, fn in runs.items():
                wall, n = fn()
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, n)
        rate = {name: n / wall for name, (wall, n) in best.items()}
        for name, label in (("bare", "bare Pillow loop "), ("plait", "plait prep       "),
                            ("img2dataset", "img2dataset      ")):
            if name in best:
                print(f"{label}: {rate[name]:8.1f} samples/s ({best[name][1]} in {best[name][0]:.2f}s)")
        print(f"plait / bare     : {rate['plait'] / rate['bare']:8.2f}   (target >= 0.85; bare = warm pool, map only)")
        if "img2dataset" in rate:
            print(f"plait / img2data : {rate['plait'] / rate['img2dataset']:8.2f}   (target >= 2)")
        for rows in [int(r) for r in a.memory_rows.split(",") if r.strip()]:
            m = memory_probe(rows, tmp)
            print(f"peak memory at {rows:>8} input rows: {m['peak_mb']:.0f} MB (one process doing everything, "
                  f"{rows / m['wall']:.0f} rows/s)", flush=True)


if __name__ == "__main__":
    main()
