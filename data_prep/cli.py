"""`plait prep`: shard image-text or video-text corpora into WebDataset tars, then verify, repair, merge.

Only parses flags into `data_prep.options` and calls the stage functions. User mistakes raise ValueError or
FileNotFoundError with a one-line message; `plait` turns them into `plait: error: ...` (exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from typing import Any

from data_prep.options import (FetchOptions, ImageOptions, JobOptions, RunOptions, SourceOptions, VideoOptions,
                               flag_of, parse_size)
from pipeline.config import field_docs

LAYOUT = """\
output layout (S = shard number, {S:05d}):
  S.tar            per sample: {key}.jpg|png|webp, {key}.txt (caption), {key}.json (caption, url, key, status,
                   width, height, original_width, original_height, sha256, kept columns), {key}.cls if labelled;
                   video: {key}.f0000.jpg, {key}.f0001.jpg, ... in time order, {key}.txt, {key}.json (fps,
                   duration, frame timestamps, original size, sha256, status). Keys = input position (9 digits).
  S.idx.json       byte offset of each sample's first tar member (O(1) resume inside a shard)
  S.parquet        one record per input row: status ok/rejected, reason, key, shard, url, sha256, sizes
  S_stats.json     counts and reasons; written last = the shard is done (resume skips it)
  sizes.json       {"S.tar": num_samples} (open_clip convention); manifest.json (shards, bytes, sha256, totals)
  samples.parquet  every input row once: ok + rejected == input rows
  _plan.json       the job's settings (a rerun with others is refused) and, with --shard-bytes, the rows per
                   shard its pilot derived: resumes and array tasks reuse them, never measure again
Every file is written under a temporary name and renamed when complete: kill -9 never leaves a partial shard.
Rerun the same command to resume. On SLURM: one array task per --task-index (or SLURM_ARRAY_TASK_ID), then
`plait prep merge OUTPUT`."""


def _csv_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _rgb(value: str) -> tuple[int, int, int]:
    parts = _csv_list(value)
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r}: expected R,G,B with values 0..255")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _finite(value: str) -> float:
    """float() that keeps 'inf' (a documented 'no limit') but leaves nan and the range to `options.validate`."""
    return float(value)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Epilogs kept as written; defaults are part of each generated help text (see `_default_text`)."""


EXAMPLES = """\
examples:
  plait prep shard --input laion.parquet --url-col URL --caption-col TEXT --output shards/
  plait prep shard --input /usr/share/datasets/fashion-mnist --input-format fashion-mnist --split test --output fm/
  plait prep shard --input cc3m.tsv --shard-bytes 500MB --output cc3m/       # rows per shard from a pilot
  plait prep shard --input yfcc100m_dataset.bz2 --input-format yfcc100m --yfcc-caption title,tags --output yfcc/
  plait prep shard --input webvid.csv --input-format webvid --num-frames 8 --output videos/
  plait prep shard --input /data/list.csv --local-root /data/images --output shards/   # paths under /data/images
  plait prep index i2d/               # shards from img2dataset or webdataset: sizes.json + offset index
  plait prep verify shards/           # exit status 1 with a report if anything is wrong
  plait prep repair shards/           # retry timeouts, 429/5xx and connection errors into new shards
  jid=$(sbatch --parsable --array=0-15 --wrap 'plait prep shard ... --output shards/')   # one task each
  sbatch --dependency=afterok:$jid --wrap 'plait prep merge shards/'
Run `plait prep shard --help` for every option and the output layout."""

# flag groups of `plait prep shard`, in help order: each is generated from the dataclass' fields and their docs
SECTIONS = (("input", SourceOptions), ("image processing", ImageOptions), ("fetching", FetchOptions),
            ("video (implied by --input-format webvid)", VideoOptions), ("output and distribution", JobOptions),
            ("running", RunOptions))


def _default_text(f: dataclasses.Field, default: Any) -> str:
    if default is None or default is False or default == () or f.metadata.get("cli_default", 0) is None:
        return ""
    if isinstance(default, bool):
        return " (default: on)"
    if isinstance(default, tuple):
        return f" (default: {','.join(map(str, default))})"
    if f.metadata.get("parse") == "size":
        return f" (default: {default // 2**20}MiB)" if default % 2**20 == 0 else f" (default: {default} bytes)"
    if isinstance(default, float) and math.isinf(default):
        return " (default: inf, no limit)"
    return f" (default: {default})"


def _metavar(name: str, base: type) -> str:
    if name.endswith("_col"):
        return "COL"
    if name.endswith("_s"):
        return "SECONDS"
    return {int: "N", float: "X"}.get(base, "TEXT")


def add_options(group: argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of `cls`: `--field-name`, typed, its docstring as help, choices and bounds from
    `options.option`, older spellings as aliases. The dataclass is the only place that states a default."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m, hint = f.metadata, hints[f.name]
        if m.get("no_flag") or dataclasses.is_dataclass(hint):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [flag_of(f.name), *m.get("aliases", ())]
        text = " ".join(docs.get(f.name, "").split()) + _default_text(f, default)
        kw: dict[str, Any] = {"dest": f.name, "help": text}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
            base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
            parse = m.get("parse")
            if parse == "size":
                kw["type"] = str  # parsed in `from_args`, so that a bad size is a one-line ValueError
            elif parse == "rgb":
                kw["type"] = _rgb
            elif m.get("repeat"):
                kw["action"] = "append"
            elif typing.get_origin(base) is tuple:
                kw["type"] = _csv_list
            elif base in (int, float):
                kw["type"] = _finite if base is float else int
            kw["choices"] = m.get("choices")
            kw["metavar"] = m.get("metavar") or (None if kw["choices"] else _metavar(f.name, base))
            kw["required"] = required
        kw["default"] = m["cli_default"] if "cli_default" in m else None if m.get("repeat") else default
        group.add_argument(*flags, **kw)
        for neg in m.get("negative", ()):
            group.add_argument(neg, dest=f.name, action="store_false", help=f"same as --no-{flag_of(f.name)[2:]}")


def from_args(cls: type, a: argparse.Namespace, **overrides: Any) -> Any:
    """The dataclass `cls` from the parsed flags (its fields that have one) and `overrides`."""
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if hasattr(a, f.name)}
    for f in dataclasses.fields(cls):
        if f.metadata.get("parse") == "size" and isinstance(kw.get(f.name), str):
            kw[f.name] = parse_size(kw[f.name], flag_of(f.name))
    kw.update(overrides)
    return cls(**kw)


def _index_doc() -> str:
    from data_prep import index
    return index.__doc__


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = argparse.ArgumentParser(prog="plait prep", description=__doc__.split("\n")[0], formatter_class=fmt,
                                     epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{shard,index,verify,repair,merge,score,filter}")

    p = sub.add_parser("shard", help="turn a table, folder or named dataset into shards", formatter_class=_Help,
                       description="Turn image-text (or video-text) rows into WebDataset shards. Every flag is "
                       "a field of data_prep/options.py (same name, dashes for underscores).", epilog=LAYOUT)
    for title, cls in SECTIONS:
        add_options(p.add_argument_group(title), cls)

    p = sub.add_parser("index", help="make a foreign WebDataset folder (img2dataset, ShardWriter) usable: "
                       "sizes.json, offset index, stats", formatter_class=fmt, description=_index_doc())
    from data_prep.index import add_arguments as add_index_arguments
    add_index_arguments(p)
    p = sub.add_parser("verify", help="check any WebDataset folder: tars, members, counts, decodable images; "
                       "plait's: also sha256 and row accounting",
                       formatter_class=fmt)
    p.add_argument("output", help="dataset folder (plait's or any WebDataset folder) or shard pattern")
    p.add_argument("--decode-fraction", type=float, default=0.05, help="fraction of images to decode")
    p.add_argument("--threads", type=int, default=4, help="shards checked at once")
    p.add_argument("--fix", action="store_true", help="plait datasets: rebuild damaged shards from the input "
                   "(as `plait prep repair` does), then verify again")
    p.add_argument("--processes", type=int, default=max(1, os.cpu_count() or 1), help="worker processes for --fix")
    p = sub.add_parser("repair", help="retry transient failures (timeouts, 429/5xx, connection errors) into new "
                       "shards", formatter_class=fmt)
    p.add_argument("output", help="dataset folder")
    p.add_argument("--processes", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("merge", help="write sizes.json and manifests once every array task is done (a folder "
                       "plait did not write: what `index` writes)",
                       formatter_class=fmt)
    p.add_argument("output", help="dataset folder")
    _add_score_filter(sub)
    return parser


def _add_score_filter(sub) -> None:
    from data_prep import score
    p = sub.add_parser("score", help="image-text cosine of every sample under an exported model (CLIP score)",
                       formatter_class=_Help, description=score.__doc__.split("\n\n")[0], epilog="\n\n".join(
                           score.__doc__.split("\n\n")[1:]))
    score.add_arguments(p)
    p = sub.add_parser("filter", help="a new dataset of the samples that pass score, dedup and rule thresholds",
                       formatter_class=_Help, description="Write a new dataset of the selected samples of a plait "
                       "dataset, copying their tar members (no refetch, no re-encode).",
                       epilog=_filter_epilog())
    from data_prep.filter import FilterOptions
    p.add_argument("dataset", help=" ".join(field_docs(FilterOptions)["dataset"].split()))
    add_options(p, FilterOptions)


def _filter_epilog() -> str:
    from data_prep import filter as filter_mod
    return "\n\n".join(filter_mod.__doc__.split("\n\n")[1:])


def job_options(a: argparse.Namespace) -> JobOptions:
    from data_prep.sources import detect_format
    # resolved once here so that _plan.json, every task and `repair` agree on them
    fmt = detect_format(a.input) if a.input_format == "auto" else a.input_format
    local = "://" not in a.input or a.input.startswith("file://")
    caption_col = None if (a.caption_col or "").lower() in ("", "none") else a.caption_col
    source = from_args(SourceOptions, a, input=os.path.abspath(a.input) if local else a.input, input_format=fmt,
                       caption_col=caption_col,
                       local_root=tuple(os.path.abspath(r.removeprefix("file://")) for r in a.local_root or ()))
    samples_per_shard = a.samples_per_shard
    if samples_per_shard is None and a.shard_bytes is None:
        samples_per_shard = JobOptions.__dataclass_fields__["samples_per_shard"].default
    return from_args(JobOptions, a, source=source, fetch=from_args(FetchOptions, a),
                     image=from_args(ImageOptions, a),
                     video=from_args(VideoOptions, a, video=a.video or fmt == "webvid"),
                     samples_per_shard=samples_per_shard)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "shard":
        from data_prep.plan import resolve_task
        from data_prep.run import run_local, run_task
        run = from_args(RunOptions, a)
        opts = job_options(a)
        task_index, num_tasks = resolve_task(run.task_index, run.num_tasks, os.environ)
        explicit = run.task_index is not None or "SLURM_ARRAY_TASK_ID" in os.environ
        if explicit:
            run_task(opts, run.processes, task_index, num_tasks, progress=run.progress)
        else:
            run_local(opts, run.processes, progress=run.progress)
        return 0
    if a.command == "merge":
        from data_prep.merge import merge
        from data_prep.run import format_summary
        from data_prep.writer import OutputDir
        if not OutputDir(a.output).exists("_plan.json"):  # shards from elsewhere: their sizes.json is the index's
            from data_prep.index import IndexOptions, index
            print(f"{a.output}: not a plait dataset (no _plan.json): writing sizes.json with `plait prep index`")
            return 1 if any(s.error for s in index(IndexOptions(a.output, progress=False))) else 0
        print(format_summary(merge(a.output)))
        return 0
    if a.command == "index":
        from data_prep.index import main_args
        return main_args(a)
    if a.command == "verify":
        from data_prep.verify import print_report, verify
        if not 0 <= a.decode_fraction <= 1:  # also refuses nan
            raise ValueError(f"--decode-fraction {a.decode_fraction!r}: must be in [0, 1]")
        report = verify(a.output, decode_fraction=a.decode_fraction, threads=a.threads)
        if a.fix and report.bad_shards:
            from data_prep.repair import rebuild_shards
            print_report(report)
            rebuild_shards(a.output, report.bad_shards, processes=a.processes, progress=False)
            report = verify(a.output, decode_fraction=a.decode_fraction, threads=a.threads)
        print_report(report)
        return 0 if report.ok else 1
    if a.command == "score":
        from data_prep import score
        summary = score.score(score.options(a))
        if summary:
            print(score.format_summary(summary))
        return 0
    if a.command == "filter":
        from data_prep import filter as filter_mod
        opts = from_args(filter_mod.FilterOptions, a, caption_rules=tuple(a.caption_rules or ()))
        print(filter_mod.format_summary(filter_mod.filter_dataset(opts)))
        return 0
    if a.command == "repair":
        from data_prep.repair import repair
        if a.processes < 1:
            raise ValueError(f"--processes {a.processes}: must be >= 1")
        repair(a.output, processes=a.processes, progress=not a.no_progress)
        return 0
    raise AssertionError(a.command)


if __name__ == "__main__":
    sys.exit(main())
