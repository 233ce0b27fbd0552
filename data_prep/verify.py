"""`plait prep verify DIR`: everything a reader relies on, checked against the manifests; returns the problems.

Checks: the dataset was merged; no leftover temporary files; every listed shard exists with the recorded bytes
and sha256, parses as a tar to the end, holds the recorded number of samples in key order, each with media, txt
and json, at the offsets of its index; sizes.json agrees; a deterministic fraction of the images decodes; the
per-sample manifest has each input row exactly once and ok + rejected == input rows; no unlisted tars.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict

from PIL import Image

from data_prep import manifest
from data_prep.writer import OutputDir

_MEDIA = ("jpg", "png", "webp")


def verify(output: str, decode_fraction: float = 0.05) -> list[str]:
    out = OutputDir(output)
    if not out.exists("_plan.json"):
        raise FileNotFoundError(f"{output!r}: not a plait dataset folder (no _plan.json)")
    problems: list[str] = []
    if not out.exists("manifest.json"):
        return [f"{output}: no manifest.json (run `plait prep merge {output}` once all tasks are done)"]
    summary = out.read_json("manifest.json")
    sizes = out.read_json("sizes.json") if out.exists("sizes.json") else {}
    problems += [f"leftover temporary file {n}" for n in out.glob("*.tmp")]
    listed = {s["name"] for s in summary["shards"]}
    problems += [f"{n}: tar not listed in manifest.json" for n in out.glob("*.tar") if n not in listed]
    every = max(1, round(1 / decode_fraction)) if decode_fraction > 0 else 0
    for entry in summary["shards"]:
        problems += _check_shard(out, entry, sizes.get(entry["name"]), every)
    problems += _check_records(out, summary)
    return problems


def _check_shard(out: OutputDir, entry: dict, size_entry: int | None, every: int) -> list[str]:
    name = entry["name"]
    if not out.exists(name):
        return [f"{name}: missing"]
    data = out.read_bytes(name)
    problems = []
    if len(data) != entry["bytes"]:
        problems.append(f"{name}: {len(data)} bytes, manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from manifest.json")
    if size_entry != entry["num_samples"]:
        problems.append(f"{name}: sizes.json says {size_entry}, manifest.json says {entry['num_samples']}")
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    offsets: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                offsets.setdefault(key, info.offset)
                members[key][ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, ValueError) as e:
        return problems + [f"{name}: unreadable tar ({e})"]
    keys = list(members)
    if len(keys) != entry["num_samples"]:
        problems.append(f"{name}: {len(keys)} samples, manifest says {entry['num_samples']}")
    if keys != sorted(keys):
        problems.append(f"{name}: samples not in key order")
    stem = name.removesuffix(".tar")
    if out.exists(f"{stem}.idx.json"):
        idx = out.read_json(f"{stem}.idx.json")
        if idx["keys"] != keys or idx["offsets"] != [offsets[k] for k in keys]:
            problems.append(f"{stem}.idx.json: keys or offsets do not match the tar")
    for i, key in enumerate(keys):
        exts = members[key]
        media = [e for e in exts if e.rsplit(".", 1)[-1] in _MEDIA]
        if not media or "txt" not in exts or "json" not in exts:
            problems.append(f"{name}: sample {key} lacks media, txt or json ({', '.join(sorted(exts))})")
            continue
        try:
            json.loads(exts["json"])
        except ValueError:
            problems.append(f"{name}: sample {key} has invalid json")
        if every and i % every == 0:
            for ext in media:
                try:
                    with Image.open(io.BytesIO(exts[ext])) as im:
                        im.load()
                except Exception as e:  # any decoder failure is a finding, not a crash
                    problems.append(f"{name}: {key}.{ext} does not decode ({type(e).__name__}: {e})")
    return problems


def _check_records(out: OutputDir, summary: dict) -> list[str]:
    if not out.exists("samples.parquet"):
        return ["samples.parquet: missing"]
    table = manifest.read_records(out, "samples.parquet", ["row", "status", "num_samples"])
    rows, status = table.column("row").to_pylist(), table.column("status").to_pylist()
    problems = []
    if len(rows) != len(set(rows)):
        problems.append("samples.parquet: some input rows appear more than once")
    if set(rows) != set(range(len(rows))):
        problems.append("samples.parquet: input row positions are not 0..n-1")
    num_ok = sum(s == "ok" for s in status)
    if len(rows) != summary["num_input_rows"] or num_ok != summary["num_ok"]:
        problems.append(f"samples.parquet: {len(rows)} rows / {num_ok} ok, manifest.json says "
                        f"{summary['num_input_rows']} / {summary['num_ok']}")
    in_tars = sum(n for s, n in zip(status, table.column("num_samples").to_pylist()) if s == "ok")
    if in_tars != sum(s["num_samples"] for s in summary["shards"]):
        problems.append("samples.parquet: ok rows differ from the samples in the shards")
    return problems
