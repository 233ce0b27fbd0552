"""`plait prep`: shard image-text or video-text corpora into WebDataset tars, then verify, repair, merge.

Only parses flags into `data_prep.options` and calls the stage functions. User mistakes raise ValueError or
FileNotFoundError with a one-line message; `plait` turns them into `plait: error: ...` (exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.flags import add_member_key_flags, add_options, from_args
from data_prep.options import (FetchOptions, ImageOptions, JobOptions, RunOptions, SegmentOptions, SourceOptions,
                               VideoOptions)
from pipeline.options import field_docs

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


WEB_SIZING = """\
sizing for a web corpus (P = --processes, T = --threads, H = --max-per-host):
  P  the CPU cores: decoding and resizing is the work (about 60 photos/s per core on a 2-core VM); downloads
     are threads, not processes.
  T  downloads in flight per process: T / seconds per download >= photos/s one core processes, with room for
     jitter and retries. The default 16 covers ~150 ms per download; far or slow servers need 32-64.
  H  open requests per process to one host, so a host sees up to P x H. Many hosts (LAION, CC12M): the cap
     rarely binds, keep the default. One dominant host (YFCC100M's Flickr static hosts): that host alone feeds
     every core, so H / seconds per download must reach photos/s per core (8 at 100 ms allows 80/s); if the
     host's own limit is lower, the job runs at P x H / seconds per download, whatever T is.
  Measured (2 cores, 2 processes, 16 threads, H 8, one host with 86% of the rows, 100 ms +-50%, 2% 503/429):
  0.87 of the local-file speed; each process waited 0.23 s in 10 s for downloads, the rest is CPU.
  Each process keeps max(128, 4 x T) rows fetching ahead of its decoding, across shard boundaries, and decodes
  rows as they arrive, so a Retry-After of a second or a slow body does not idle its core; the shards are the
  same as with local files. Measured with benchmarks/bench_prep_web.py (docs/prep.md, "Prep over the web")."""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Epilogs kept as written; defaults are part of each generated help text (see `_default_text`)."""


EXAMPLES = """\
examples:
  plait prep shard --input laion.parquet --url-col URL --caption-col TEXT --output shards/
  plait prep shard --input /usr/share/datasets/fashion-mnist --input-format fashion-mnist --split test --output fm/
  plait prep shard --input cc3m.tsv --shard-bytes 500MB --output cc3m/       # rows per shard from a pilot
  plait prep shard --input yfcc100m_dataset.bz2 --input-format yfcc100m --yfcc-caption title,tags --output yfcc/
  plait prep shard --input webvid.csv --input-format webvid --num-frames 8 --output videos/
  plait prep shard --input videos.csv --input-format howto100m --caption-json caption.json --url-col path \
      --min-clip-s 8 --output howto/                # one sample per (merged) ASR segment
  plait prep shard --input videos.csv --url-col path --caption-col none --segment scenes --output scenes/
  plait prep shard --input /data/list.csv --local-root /data/images --output shards/   # paths under /data/images
  plait prep index i2d/               # shards from img2dataset or webdataset: sizes.json + offset index
  plait prep verify shards/           # exit status 1 with a report if anything is wrong
  plait prep repair shards/           # retry timeouts, 429/5xx and connection errors into new shards
  jid=$(sbatch --parsable --array=0-15 --wrap 'plait prep shard ... --output shards/')   # one task each
  sbatch --dependency=afterok:$jid --wrap 'plait prep merge shards/'
Run `plait prep shard --help` for every option and the output layout."""

# flag groups of `plait prep shard`, in help order: each is generated from the dataclass' fields and their docs
SECTIONS = (("input", SourceOptions), ("image processing", ImageOptions), ("fetching", FetchOptions),
            ("video (implied by --input-format webvid, howto100m, clips and the segment options)", VideoOptions),
            ("segments: long videos cut into clips, one sample each (docs/prep.md, \"Long videos\")",
             SegmentOptions), ("output and distribution", JobOptions),
            ("running", RunOptions))


def _index_doc() -> str:
    from data_prep.maintenance import index
    return index.__doc__


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = argparse.ArgumentParser(prog="plait prep", description=__doc__.split("\n")[0], formatter_class=fmt,
                                     epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{shard,index,verify,repair,merge,score,filter}")

    p = sub.add_parser("shard", help="turn a table, folder or named dataset into shards", formatter_class=_Help,
                       description="Turn image-text (or video-text) rows into WebDataset shards. Every flag is "
                       "a field of data_prep/options.py (same name, dashes for underscores).",
                       epilog=LAYOUT + "\n\n" + WEB_SIZING)
    for title, cls in SECTIONS:
        add_options(p.add_argument_group(title), cls)

    p = sub.add_parser("index", help="make a foreign WebDataset folder (img2dataset, ShardWriter) usable: "
                       "sizes.json, offset index, stats", formatter_class=fmt, description=_index_doc())
    from data_prep.maintenance.index import add_arguments as add_index_arguments
    add_index_arguments(p)
    p = sub.add_parser("verify", help="check any WebDataset folder: tars, members, counts, decodable images; "
                       "plait's: also sha256 and row accounting",
                       formatter_class=fmt)
    p.add_argument("output", help="dataset folder (plait's or any WebDataset folder) or shard pattern")
    p.add_argument("--decode-fraction", type=float, default=0.05, help="fraction of images to decode")
    p.add_argument("--threads", type=int, default=4, help="shards checked at once")
    add_member_key_flags(p)
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars for the cross-shard dedup")
    _add_score_filter(sub)
    return parser


def _add_score_filter(sub) -> None:
    from data_prep.curate import score_set
    p = sub.add_parser("score", help="image-text cosine of every sample under an exported model (CLIP score)",
                       formatter_class=_Help, description=score_set.__doc__.split("\n\n")[0], epilog="\n\n".join(
                           score_set.__doc__.split("\n\n")[1:]))
    score_set.add_arguments(p)
    p = sub.add_parser("filter", help="a new dataset of the samples that pass score, dedup and rule thresholds",
                       formatter_class=_Help, description="Write a new dataset of the selected samples of a plait "
                       "dataset, copying their tar members (no refetch, no re-encode).",
                       epilog=_filter_epilog())
    from data_prep.curate.filter import FilterOptions
    p.add_argument("dataset", help=" ".join(field_docs(FilterOptions)["dataset"].split()))
    add_options(p, FilterOptions)


def _filter_epilog() -> str:
    from data_prep.curate import filter as filter_mod
    return "\n\n".join(filter_mod.__doc__.split("\n\n")[1:])


def job_options(a: argparse.Namespace) -> JobOptions:
    from data_prep.input.sources import detect_format
    # resolved once here so that _plan.json, every task and `repair` agree on them
    fmt = detect_format(a.input) if a.input_format == "auto" else a.input_format
    local = "://" not in a.input or a.input.startswith("file://")
    caption_col = None if (a.caption_col or "").lower() in ("", "none") else a.caption_col
    if a.caption_json and not os.path.isfile(a.caption_json):
        raise FileNotFoundError(f"--caption-json {a.caption_json!r}: no such file")
    segments = from_args(SegmentOptions, a, caption_json=os.path.abspath(a.caption_json) if a.caption_json else None)
    segmented = fmt in ("howto100m", "clips") or segments.subtitles or segments.subtitle_col or segments.segment
    source = from_args(SourceOptions, a, input=os.path.abspath(a.input) if local else a.input, input_format=fmt,
                       caption_col=caption_col, segments=segments,
                       local_root=tuple(os.path.abspath(r.removeprefix("file://")) for r in a.local_root or ()))
    samples_per_shard = a.samples_per_shard
    if samples_per_shard is None and a.shard_bytes is None:
        samples_per_shard = JobOptions.__dataclass_fields__["samples_per_shard"].default
    return from_args(JobOptions, a, source=source, fetch=from_args(FetchOptions, a),
                     image=from_args(ImageOptions, a),
                     video=from_args(VideoOptions, a, video=bool(a.video or fmt == "webvid" or segmented)),
                     samples_per_shard=samples_per_shard)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "shard":
        from data_prep.job.plan import resolve_task
        from data_prep.job.run import run_local, run_task
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
        from data_prep.maintenance.merge import merge
        from data_prep.job.run import format_summary
        from data_prep.shards.writer import OutputDir
        if not OutputDir(a.output).exists("_plan.json"):  # shards from elsewhere: their sizes.json is the index's
            from data_prep.maintenance.index import IndexOptions, index
            print(f"{a.output}: not a plait dataset (no _plan.json): writing sizes.json with `plait prep index`")
            return 1 if any(s.error for s in index(IndexOptions(a.output, progress=False))) else 0
        print(format_summary(merge(a.output, progress=not a.no_progress)))
        return 0
    if a.command == "index":
        from data_prep.maintenance.index import main_args
        return main_args(a)
    if a.command == "verify":
        from data_prep.maintenance.verify import print_report, verify
        if not 0 <= a.decode_fraction <= 1:  # also refuses nan
            raise ValueError(f"--decode-fraction {a.decode_fraction!r}: must be in [0, 1]")
        from data_prep.shards.members import MemberKeys
        keys = MemberKeys.parse(a.image_keys, a.caption_keys, names=("--image-keys", "--caption-keys"))
        report = verify(a.output, decode_fraction=a.decode_fraction, threads=a.threads, keys=keys)
        if a.fix and report.bad_shards:
            from data_prep.maintenance.repair import rebuild_shards
            print_report(report)
            rebuild_shards(a.output, report.bad_shards, processes=a.processes, progress=False)
            report = verify(a.output, decode_fraction=a.decode_fraction, threads=a.threads, keys=keys)
        print_report(report)
        return 0 if report.ok else 1
    if a.command == "score":
        from data_prep.curate import score
        from data_prep.curate.score_set import options
        summary = score.score(options(a))
        if summary:
            print(score.format_summary(summary))
        return 0
    if a.command == "filter":
        from data_prep.curate import filter as filter_mod
        # a repeatable flag not given parses to None: the options hold ()
        opts = from_args(filter_mod.FilterOptions, a, **{name: tuple(getattr(a, name) or ()) for name in (
            "caption_rules", "image_rules", "decontaminate")})
        print(filter_mod.format_summary(filter_mod.filter_dataset(opts)))
        return 0
    if a.command == "repair":
        from data_prep.maintenance.repair import repair
        if a.processes < 1:
            raise ValueError(f"--processes {a.processes}: must be >= 1")
        repair(a.output, processes=a.processes, progress=not a.no_progress)
        return 0
    raise AssertionError(a.command)


if __name__ == "__main__":
    sys.exit(main())
