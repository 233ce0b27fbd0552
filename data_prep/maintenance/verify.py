"""`plait prep verify DIR`: checks any WebDataset folder, and plait's own datasets against their manifests.

Every folder (plait's, img2dataset's, webdataset.ShardWriter's, hand-made): each tar reads to its end; it holds
regular files only (directories and links are reported: webdataset skips them silently); every member name has
a key and an extension; no sample repeats an extension or reappears later in its shard; every sample has an
image-like and a text-like member; a deterministic fraction of the images decodes, and every caption is UTF-8
and every .json parses; no key appears in two shards; sizes.json, the per-shard stats files' counts and the
S.idx.json offset indexes, where present, agree with the tars; no temporary files are left over.

Only members the loader uses are decoded, each with an explicit decoder (PIL restricted to image formats, UTF-8,
json); nothing is unpickled (webdataset's default decoders would unpickle .pyd/.pth members).

A plait dataset (one with `_plan.json`) is also checked against its manifests: it was merged; every listed shard
has the recorded bytes and sha256 and sample count, in key order, with a .json per sample; the per-sample
manifest has every input row exactly once and ok + rejected == input rows; no unlisted tars. In other folders
that row accounting does not exist: the report says it was skipped, not that it failed.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_prep.shards import manifest
from data_prep.shards import layout, remote
from data_prep.maintenance.index import find_shards
from data_prep.shards.scan import scan_shard, validate_sizes
from data_prep.shards.layout import IMAGE_EXTS
from data_prep.shards.members import IMAGE_FORMATS, IMAGE_LIKE_EXTS, TEXT_EXTS, MemberKeys, open_image, split_name
from data_prep.shards.tarwalk import MEMBER_KINDS, Member, TarWalk
from data_prep.shards.writer import OutputDir

MAX_LISTED = 20  # per kind of repeated finding (duplicate keys, samples without a member): the rest are counted


@dataclass
class ShardResult:
    """One tar's findings."""

    name: str
    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    size_bytes: int = 0
    sha256: str = ""
    readable: bool = True
    key_set: set[str] = field(default_factory=set)
    untrainable: int = 0
    """Image members of a format training does not read (.bmp, .gif, .tiff...)."""
    num_samples: int = 0
    key_hashes: np.ndarray | None = None
    """64-bit hashes of the keys, kept once the shard is checked (its keys are not: a dataset's keys as Python
    strings would not fit in memory at web scale)."""


@dataclass
class VerifyReport:
    """What `verify` found; `problems` empty means the dataset is fine to train on."""

    target: str
    plait_dataset: bool = False
    num_shards: int = 0
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)
    bad_shards: list[str] = field(default_factory=list)
    """Tars that are themselves damaged (missing, unreadable, bytes or sha256 differ): what `repair` rebuilds."""
    notes: list[str] = field(default_factory=list)
    rows: dict[str, Any] | None = None
    """plait datasets: input rows, ok, rejected and the top reject reasons (manifest.json)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, top: int = 5) -> list[str]:
        lines = [f"{self.num_samples} samples in {self.num_shards} shard(s)"]
        if self.rows is not None:
            r = self.rows
            line = f"{r['num_input_rows']} input rows: {r['num_ok']} ok, {r['num_rejected']} rejected"
            reasons = list(r.get("reasons", {}).items())[:top]
            if reasons:
                line += "; top reject reasons: " + ", ".join(f"{k} ({n})" for k, n in reasons)
            lines.append(line)
        lines += self.notes
        lines.append("ok" if self.ok else f"{len(self.problems)} problem(s)")
        return lines


def verify(target: str, decode_fraction: float = 0.05, threads: int = 4,
           keys: MemberKeys | None = None) -> VerifyReport:
    """Checks the WebDataset folder (or shard pattern) `target`; see the module docstring for what. A sample
    passes when training with the same member `keys` (data.image_keys / data.caption_keys) can read it."""
    keys = keys or MemberKeys.parse()
    remote.trust(target)
    if not 0 <= decode_fraction <= 1:
        raise ValueError(f"--decode-fraction {decode_fraction}: must be within [0, 1]")
    every = max(1, round(1 / decode_fraction)) if decode_fraction > 0 else 0
    is_folder = "{" not in target and not target.endswith(".tar") and not any(c in target for c in "*?[")
    out = OutputDir(target) if is_folder else None
    report = VerifyReport(target, plait_dataset=out is not None and out.exists(layout.PLAN_FILE))
    if report.plait_dataset:
        if not out.exists(layout.MANIFEST_FILE):
            report.problems.append(f"{target}: no manifest.json (run `plait prep merge {target}` once all tasks "
                                   "are done)")
            return report
        try:
            summary = manifest.read_manifest(out)
        except ValueError as exn:
            report.problems.append(str(exn))
            return report
        entries = {s["name"]: s for s in summary["shards"]}
        urls = [out.path(n) if "://" not in target else f"{target.rstrip('/')}/{n}" for n in entries]
        report.rows = {k: summary[k] for k in ("num_input_rows", "num_ok", "num_rejected")}
        report.rows["reasons"] = summary.get("reasons", {})
        report.problems += [f"{n}: tar not listed in manifest.json" for n in out.glob("*.tar") if n not in entries]
    else:
        entries = {}
        urls = find_shards(target)
        report.notes.append("not a plait dataset (no _plan.json): row accounting skipped")
    folders = sorted({posixpath.dirname(u) for u in urls})
    for folder in folders:
        report.problems += [f"leftover temporary file {n}" for n in OutputDir(folder or ".").glob("*.tmp")]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(lambda u: check_shard(u, every, entries.get(posixpath.basename(u)), keys), urls))
    sizes = {f: _sizes(OutputDir(f or "."), report) for f in folders}
    for url, res in zip(urls, results):
        report.problems += res.problems
        if not res.readable or any(_damage(p) for p in res.problems):
            report.bad_shards.append(res.name)
        report.num_samples += res.num_samples
        table = sizes[posixpath.dirname(url)]
        if table is not None and res.readable:
            if res.name not in table:
                report.problems.append(f"{res.name}: not listed in sizes.json")
            elif table[res.name] != res.num_samples:
                report.problems.append(f"{res.name}: sizes.json says {table[res.name]}, the tar holds "
                                       f"{res.num_samples} samples")
        if res.readable:
            report.problems += _check_stats_count(url, res)
    report.problems += _cross_shard_duplicates(urls, results)
    report.num_shards = len(urls)
    if report.plait_dataset:
        report.problems += _check_records(out, summary)
    if report.num_samples == 0:
        why = f" (all {report.rows['num_input_rows']} input rows rejected)" if report.rows else ""
        report.problems.append(f"{target}: the dataset holds no samples{why}")
    return report


def _key_hashes(keys: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


def _cross_shard_duplicates(urls: list[str], results: list[ShardResult]) -> list[str]:
    """Keys found in two shards, from the sorted key hashes (16 bytes per sample); the keys named in the report
    are read again from the headers of the shards involved."""
    hashes = [r.key_hashes if r.key_hashes is not None else np.zeros(0, np.uint64) for r in results]
    if not hashes or sum(len(h) for h in hashes) == 0:
        return []
    flat = np.concatenate(hashes)
    shard = np.concatenate([np.full(len(h), i, np.int64) for i, h in enumerate(hashes)])
    position = np.concatenate([np.arange(len(h), dtype=np.int64) for h in hashes])
    order = np.argsort(flat, kind="stable")
    flat, shard, position = flat[order], shard[order], position[order]
    first = np.maximum.accumulate(np.where(np.r_[True, flat[1:] != flat[:-1]], np.arange(len(flat)), 0))
    dup = np.flatnonzero(shard != shard[first])  # same key as an earlier shard's (repeats inside one shard apart)
    problems = []
    keys_of: dict[int, list[str]] = {}
    for i in dup[:MAX_LISTED]:
        a, b = int(shard[first[i]]), int(shard[i])
        for s in (a, b):
            if s not in keys_of:
                keys_of[s] = scan_shard(urls[s]).keys
        problems.append(f"{results[b].name}: key {keys_of[b][int(position[i])]} also in {results[a].name}")
    if len(dup) > MAX_LISTED:
        problems.append(f"... {len(dup) - MAX_LISTED} more keys in two shards")
    return problems


def _check_stats_count(url: str, res: ShardResult) -> list[str]:
    """The loader falls back on a shard's own stats file (plait: num_samples, img2dataset: successes) for its
    count when sizes.json lacks it, so that count must be the tar's too."""
    import fsspec
    stats_url = layout.sibling(url, layout.STATS_SUFFIX)
    fs, path = fsspec.core.url_to_fs(stats_url)
    try:
        stats = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return []
    except ValueError as exn:
        return [f"{posixpath.basename(stats_url)}: not valid JSON ({exn})"]
    key = next((k for k in ("num_samples", "successes") if isinstance(stats, dict) and k in stats), None)
    if key is not None and stats[key] != res.num_samples:
        return [f"{posixpath.basename(stats_url)}: {key} {stats[key]!r}, the tar holds {res.num_samples} samples"]
    return []


def _damage(problem: str) -> bool:
    return any(s in problem for s in (": missing", "unreadable tar", "truncated tar", "sha256 differs",
                                         " bytes, manifest says"))


def _sizes(out: OutputDir, report: VerifyReport) -> dict[str, int] | None:
    if not out.exists(layout.SIZES_FILE):
        return None
    try:
        return validate_sizes(out.read_bytes(layout.SIZES_FILE), out.path(layout.SIZES_FILE))
    except ValueError as exn:
        report.problems.append(str(exn))
        return None


class _HashingReader:
    """A read-only file wrapper that hashes and counts the bytes read through it (read start to end, never seeked)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def seek(self, *_) -> int:  # every byte goes through the hash: the tar walk reads past what it skips
        raise io.UnsupportedOperation("seek")


def check_shard(url: str, every: int, entry: dict | None = None, keys: MemberKeys | None = None) -> ShardResult:
    """Reads the tar at `url` once, start to end; `entry` (plait manifests) adds bytes/sha256/count checks."""
    import fsspec
    name = posixpath.basename(url)
    res = ShardResult(name)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        res.readable = False
        res.problems.append(f"{name}: missing")
        return res
    samples: list[dict[str, bytes | None]] = []
    try:
        with fs.open(path, "rb") as raw:
            reader = _HashingReader(raw)
            walk = TarWalk(reader, want=lambda member: _wanted(member, res, every))
            for member in walk:
                _read_member(member, res, samples)
            while reader.read(1 << 20):  # the tail after the end-of-archive blocks counts for bytes and sha256
                pass
        res.size_bytes, res.sha256 = reader.size, reader.sha.hexdigest()
        if res.size_bytes < walk.end + 1024:
            res.problems.append(f"{name}: truncated tar (no end-of-archive blocks after its last member)")
    except (OSError, EOFError, ValueError) as exn:  # TarFormatError is a ValueError
        res.readable = False
        res.problems.append(f"{name}: unreadable tar after {len(res.keys)} samples ({type(exn).__name__}: {exn})")
    missing, keys = 0, keys or MemberKeys.parse()
    for key, members in zip(res.keys, samples):
        lacks = [kind for kind, has in (("an image", keys.image_members(members)[0]),
                                        ("a text", keys.caption_member(members))) if not has]
        reasons = keys.problems(members)  # the loader's own rule: what passes here, training reads
        if entry is not None and "json" not in members:
            lacks.append("a json")
        if lacks:
            missing += 1
            if missing <= MAX_LISTED:
                why = f" ({'; '.join(reasons)})" if reasons else f" (has {', '.join(sorted(members)) or 'nothing'})"
                res.problems.append(f"{name}: sample {key} lacks {' and '.join(lacks)} member{why}")
    if missing > MAX_LISTED:
        res.problems.append(f"{name}: ... {missing - MAX_LISTED} more samples lacking a member")
    if res.untrainable > MAX_LISTED:
        res.problems.append(f"{name}: ... {res.untrainable - MAX_LISTED} more image members plait does not read")
    if entry is not None and res.readable:
        _check_against_manifest(res, entry)
    _check_index(url, res)
    res.num_samples, res.key_hashes = len(res.keys), _key_hashes(res.keys)
    res.keys, res.offsets, res.key_set = [], [], set()
    return res


def _wanted(member_name: str, res: ShardResult, every: int) -> bool:
    """Whether verify decodes this member: every caption and json, and the images of every `every`-th sample
    (the walker reads only these payloads; the others are read past for the hash, not kept)."""
    parts = split_name(member_name)
    if parts is None:
        return False
    key, ext = parts
    position = len(res.keys) - 1 if res.keys and res.keys[-1] == key else len(res.keys)  # of its sample
    return (ext == "json" or ext in TEXT_EXTS or ext.endswith(".txt")
            or bool(every and position % every == 0 and ext.rsplit(".", 1)[-1] in IMAGE_EXTS))


def _read_member(member: Member, res: ShardResult, samples: list) -> None:
    name = res.name
    if not member.is_file:
        kind = MEMBER_KINDS.get(member.kind, f"of tar type {member.kind.decode('latin-1')!r}")
        res.problems.append(f"{name}: member {member.name!r} is {kind}, not a file (webdataset skips it)")
        return
    parts = split_name(member.name)
    base = member.name.rpartition("/")[2]
    if parts is None:
        if not (base.startswith("__") and base.endswith("__")):  # webdataset's metadata members are fine
            res.problems.append(f"{name}: member {member.name!r} has no key.extension name (no reader uses it)")
        return
    key, ext = parts
    if not res.keys or res.keys[-1] != key:
        if key in res.key_set:
            res.problems.append(f"{name}: key {key} appears again after other samples (webdataset yields "
                                "two samples with one key)")
        res.key_set.add(key)
        res.keys.append(key)
        res.offsets.append(member.offset)
        samples.append({})
    members = samples[-1]
    if ext in members:
        res.problems.append(f"{name}: sample {key} has two {ext} members (webdataset raises on it)")
    members[ext] = None
    base = ext.rsplit(".", 1)[-1]
    if base in IMAGE_LIKE_EXTS and base not in IMAGE_EXTS:  # every one, decoded or not: training skips them
        res.untrainable += 1
        if res.untrainable <= MAX_LISTED:
            res.problems.append(f"{name}: {key}.{ext} {_not_trainable(base)}")
    elif member.payload is not None:
        error = decode_member(ext, member.payload)
        if error:
            res.problems.append(f"{name}: {key}.{ext} {error}")


def _not_trainable(base: str) -> str:
    return f"is a .{base} image: not trainable (plait reads {', '.join(IMAGE_FORMATS)} images)"


def decode_member(ext: str, data: bytes) -> str | None:
    """None if member `ext` decodes as training decodes it, else why not. Images are opened by the format's one
    decoder (members.open_image: JPEG, PNG and WebP only, under the pixel cap); other image extensions are
    reported as not trainable without being decoded; text and json are decoded; any other extension (.pyd,
    .pth, .npy...) is never looked at."""
    base = ext.rsplit(".", 1)[-1]
    if base in IMAGE_LIKE_EXTS and base not in IMAGE_EXTS:
        return _not_trainable(base)
    try:
        if base in IMAGE_EXTS:
            with open_image(data) as im:
                im.load()
        elif base == "json":
            json.loads(data)
        elif base in TEXT_EXTS or base == "txt":
            data.decode("utf-8")
    except Exception as exn:  # any decoder failure is a finding about the data, not a crash of verify
        return f"does not decode as {base} ({type(exn).__name__}: {exn})"
    return None


def _check_against_manifest(res: ShardResult, entry: dict) -> None:
    name = res.name
    if res.size_bytes != entry["bytes"]:
        res.problems.append(f"{name}: {res.size_bytes} bytes, manifest says {entry['bytes']}")
    if res.sha256 != entry["sha256"]:
        res.problems.append(f"{name}: sha256 differs from manifest.json")
    if len(res.keys) != entry["num_samples"]:
        res.problems.append(f"{name}: {len(res.keys)} samples, manifest says {entry['num_samples']}")
    if res.keys != sorted(res.keys):
        res.problems.append(f"{name}: samples not in key order")


def _check_index(url: str, res: ShardResult) -> None:
    import fsspec
    idx_url = layout.sibling(url, layout.INDEX_SUFFIX)
    fs, path = fsspec.core.url_to_fs(idx_url)
    if not res.readable or not fs.exists(path):
        return
    try:
        idx = json.loads(fs.cat_file(path))
        same = idx["keys"] == res.keys and idx["offsets"] == res.offsets
    except (ValueError, KeyError, TypeError):
        same = False
    if not same:
        res.problems.append(f"{posixpath.basename(idx_url)}: keys or offsets do not match the tar "
                            f"(rerun `plait prep index`)")


def _check_records(out: OutputDir, summary: dict) -> list[str]:
    if not out.exists(layout.RECORDS_FILE):
        return ["samples.parquet: missing"]
    table = manifest.read_records(out, layout.RECORDS_FILE, ["row", "status", "num_samples"])
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


def print_report(report: VerifyReport, file=None) -> None:
    for line in report.problems:
        print(line, file=file)
    for line in report.summary():
        print(line, file=file)
