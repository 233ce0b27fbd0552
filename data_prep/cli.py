"""`plait prep`: shard image-text or video-text corpora into WebDataset tars, then verify, repair, merge.

Only parses flags into `data_prep.options` and calls the stage functions. User mistakes raise ValueError or
FileNotFoundError with a one-line message; `plait` turns them into `plait: error: ...` (exit 2).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from data_prep.options import (ENCODE_FORMATS, FRAME_SAMPLING, INPUT_FORMATS, RESAMPLE_FILTERS, RESIZE_MODES,
                               FetchOptions, ImageOptions, JobOptions, SourceOptions, VideoOptions, parse_size)

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


class _Help(argparse.RawDescriptionHelpFormatter):
    """Defaults printed after each option that has a meaningful one; epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS, "") and action.option_strings:
            text += " (default: %(default)s)"
        return text


EXAMPLES = """\
examples:
  plait prep shard --input laion.parquet --url-col URL --caption-col TEXT --output shards/
  plait prep shard --input /usr/share/datasets/fashion-mnist --input-format fashion-mnist --split test --output fm/
  plait prep shard --input cc3m.tsv --shard-bytes 500MB --output cc3m/       # rows per shard from a pilot
  plait prep shard --input yfcc100m_dataset.bz2 --input-format yfcc100m --yfcc-caption title,tags --output yfcc/
  plait prep shard --input webvid.csv --input-format webvid --num-frames 8 --output videos/
  plait prep index i2d/               # shards from img2dataset or webdataset: sizes.json + offset index
  plait prep verify shards/           # exit status 1 with a report if anything is wrong
  plait prep repair shards/           # retry timeouts, 429/5xx and connection errors into new shards
  jid=$(sbatch --parsable --array=0-15 --wrap 'plait prep shard ... --output shards/')   # one task each
  sbatch --dependency=afterok:$jid --wrap 'plait prep merge shards/'
Run `plait prep shard --help` for every option and the output layout."""


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
                       description="Turn image-text (or video-text) rows into WebDataset shards.", epilog=LAYOUT)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="table (parquet, csv/tsv[.gz], jsonl/json, txt of URLs), folder "
                   "of images with sidecar .txt captions, or a named dataset folder; local path or fsspec URL")
    g.add_argument("--input-format", default="auto", choices=INPUT_FORMATS,
                   help="auto = from the file extension; yfcc100m = the YFCC100M metadata dump (tab-separated, "
                   "no header); webvid = WebVid CSV (videoid, contentUrl, duration, page_dir, name); "
                   "fashion-mnist = the idx gz files of --split (a JSON array input is loaded whole)")
    g.add_argument("--url-col", default="url", help="column with the URL or path (webvid: contentUrl)")
    g.add_argument("--caption-col", default="caption", help="column with the caption; 'none' for no caption "
                   "(webvid: name)")
    g.add_argument("--extra-cols", type=_csv_list, default="", help="comma-separated columns kept in {key}.json")
    g.add_argument("--split", default="train", choices=("train", "test"), help="fashion-mnist split")
    g.add_argument("--yfcc-caption", type=_csv_list, default="title,description",
                   help="yfcc100m caption parts, in order: title, description, tags")
    g.add_argument("--start-col", default=None, help="video: column with the window start in seconds")
    g.add_argument("--end-col", default=None, help="video: column with the window end in seconds")

    g = p.add_argument_group("image processing")
    g.add_argument("--image-size", type=int, default=256, help="target size in pixels (see --resize-mode)")
    g.add_argument("--resize-mode", default="keep_ratio", choices=RESIZE_MODES,
                   help="keep_ratio: shorter side to --image-size; keep_ratio_largest: longer side; center_crop: "
                   "shorter side then a centred square; border: longer side then padded to a square; no: as is")
    g.add_argument("--resample", default="bicubic", choices=RESAMPLE_FILTERS, help="resampling filter when "
                   "resizing (after JPEG draft decoding at 1/2, 1/4 or 1/8 size)")
    g.add_argument("--upscale", action="store_true", help="also enlarge images smaller than the target "
                   "(default: never upscale)")
    g.add_argument("--encode-format", default="jpg", choices=ENCODE_FORMATS, help="image format in the shards")
    g.add_argument("--encode-quality", type=int, default=95, help="jpg/webp quality")
    g.add_argument("--no-keep-original", action="store_true", help="re-encode even JPEGs that already fit "
                   "(default: their original bytes are kept untouched)")
    g.add_argument("--background", type=_rgb, default="255,255,255",
                   help="R,G,B behind transparent pixels and border padding")
    g.add_argument("--min-image-size", type=int, default=0, help="reject images whose shorter side is smaller")
    g.add_argument("--max-aspect-ratio", type=float, default=math.inf, help="reject images with a larger "
                   "long/short side ratio")
    g.add_argument("--max-pixels", type=int, default=ImageOptions.max_pixels, help="reject larger images "
                   "(decompression bombs) before decoding them")
    g.add_argument("--max-caption-length", type=int, default=4096, help="reject longer captions (characters)")
    g.add_argument("--allow-empty-caption", action="store_true", help="keep rows whose caption is empty")

    g = p.add_argument_group("fetching")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds for one whole http transfer")
    g.add_argument("--retries", type=int, default=2, help="retries of timeouts, 429, 5xx, connection errors")
    g.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds, doubled each time")
    g.add_argument("--max-retry-after", type=float, default=30.0, help="longest Retry-After (s) to wait for")
    g.add_argument("--max-per-host", type=int, default=8, help="concurrent requests per host and process")
    g.add_argument("--threads", type=int, default=16, help="download threads per process")
    g.add_argument("--max-bytes", type=int, default=64 << 20, help="reject larger downloads")
    g.add_argument("--user-agent-token", default=None, help="contact info appended to the user agent")
    g.add_argument("--allow-private-addresses", action="store_true", help="allow loopback/private/link-local "
                   "addresses (local test servers only: refused by default)")
    g.add_argument("--allow-schemes", type=_csv_list, default="", metavar="SCHEMES", help="object stores the "
                   "table's URLs may name besides http(s), comma-separated: s3, gs, az ... (their endpoint must "
                   "be a public address unless --allow-private-addresses); any other scheme and chained fsspec "
                   "URLs (simplecache::...) are rejected per row")
    g.add_argument("--ignore-opt-outs", action="store_true", help="do not drop samples whose server sends "
                   "X-Robots-Tag noai/noimageai/noindex/noimageindex")

    g = p.add_argument_group("video (implied by --input-format webvid)")
    g.add_argument("--video", action="store_true", help="rows are videos: sample frames with PyAV")
    g.add_argument("--frame-sampling", default="uniform", choices=FRAME_SAMPLING,
                   help="uniform: --num-frames spread over the video; fps: --fps frames per second; "
                   "keyframes: keyframes only")
    g.add_argument("--num-frames", type=int, default=8, help="frames per video (uniform)")
    g.add_argument("--fps", type=float, default=1.0, help="frames per second (fps sampling)")
    g.add_argument("--max-duration", type=float, default=math.inf, help="seconds of video read at most")
    g.add_argument("--max-frames", type=int, default=256, help="frames per video at most (fps, keyframes)")
    g.add_argument("--frames-as-samples", action="store_true", help="write one image-text sample per frame "
                   "(caption, frame index, timestamp) instead of one sample per video")

    g = p.add_argument_group("output and distribution")
    g.add_argument("--output", required=True, help="output folder, local path or fsspec URL")
    g.add_argument("--samples-per-shard", type=int, default=None, help="input rows per shard; with "
                   "--shard-bytes the most rows per shard (default: 10000, no limit with --shard-bytes)")
    g.add_argument("--shard-bytes", default=None, metavar="SIZE", help="target tar size, e.g. 500MB, 1GiB or "
                   "bytes: a pilot builds the first 64 input rows (16 videos) in a temporary folder to measure "
                   "bytes per row, and the rows per shard it derives are kept in _plan.json for resumes and every "
                   "array task (default: off, shards sized by --samples-per-shard)")
    g.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (same sha256 of the bytes)")
    g.add_argument("--dedup-against", default=None, help="samples.parquet of an earlier dataset: drop its images")
    g.add_argument("--processes", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    g.add_argument("--task-index", type=int, default=None, help="this task of a job array (default: "
                   "SLURM_ARRAY_TASK_ID, else a single local run that also merges)")
    g.add_argument("--num-tasks", type=int, default=None, help="tasks in the job array (default: "
                   "SLURM_ARRAY_TASK_COUNT)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

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
    p.add_argument("dataset", help="source plait dataset folder")
    p.add_argument("--output", required=True, help="folder of the new dataset")
    p.add_argument("--scores", default=None, help="score folder (default: DATASET/scores)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--min-score", type=float, default=None, help="keep samples whose score is at least S (-1..1)")
    g.add_argument("--top-fraction", type=float, default=None, help="keep the best-scored fraction F (0..1] of "
                   "the scored samples")
    p.add_argument("--dedup-embeddings", type=float, default=None, metavar="THRESH", help="drop samples whose image "
                   "embedding has cosine >= THRESH to a kept, better-scored one (needs `prep score --embeddings`)")
    p.add_argument("--min-image-size", type=int, default=0, help="drop samples whose stored image's shorter side "
                   "is smaller (pixels)")
    p.add_argument("--caption-rule", action="append", default=None, metavar="RULE", help="min-words=N, max-words=N, "
                   "min-chars=N, max-chars=N or exclude=REGEX (repeatable)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the near-duplicate search runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _filter_epilog() -> str:
    from data_prep import filter as filter_mod
    return "\n\n".join(filter_mod.__doc__.split("\n\n")[1:])


def job_options(a: argparse.Namespace) -> JobOptions:
    caption_col = None if (a.caption_col or "").lower() in ("", "none") else a.caption_col
    from data_prep.sources import detect_format
    # resolved once here so that _plan.json, every task and `repair` agree on it
    fmt = detect_format(a.input) if a.input_format == "auto" else a.input_format
    source = SourceOptions(input=a.input, input_format=fmt, url_col=a.url_col, caption_col=caption_col,
                           extra_cols=a.extra_cols, split=a.split, yfcc_caption=a.yfcc_caption,
                           start_col=a.start_col, end_col=a.end_col)
    fetch = FetchOptions(timeout_s=a.timeout, retries=a.retries, backoff_s=a.backoff,
                         max_retry_after_s=a.max_retry_after, max_per_host=a.max_per_host, threads=a.threads,
                         max_bytes=a.max_bytes, user_agent_token=a.user_agent_token,
                         allow_private=a.allow_private_addresses, respect_optouts=not a.ignore_opt_outs,
                         allow_schemes=a.allow_schemes)
    image = ImageOptions(image_size=a.image_size, resize_mode=a.resize_mode, resample=a.resample, upscale=a.upscale,
                         encode_format=a.encode_format, encode_quality=a.encode_quality, background=a.background,
                         min_image_size=a.min_image_size, max_aspect_ratio=a.max_aspect_ratio,
                         max_pixels=a.max_pixels, keep_original_jpeg=not a.no_keep_original,
                         max_caption_length=a.max_caption_length, allow_empty_caption=a.allow_empty_caption)
    video = VideoOptions(enabled=a.video or fmt == "webvid", sampling=a.frame_sampling, num_frames=a.num_frames,
                         fps=a.fps, max_duration_s=a.max_duration, max_frames=a.max_frames,
                         per_frame_samples=a.frames_as_samples)
    shard_bytes = None if a.shard_bytes is None else parse_size(a.shard_bytes)
    samples_per_shard = a.samples_per_shard
    if samples_per_shard is None and shard_bytes is None:
        samples_per_shard = 10_000
    return JobOptions(output=a.output, source=source, fetch=fetch, image=image, video=video,
                      samples_per_shard=samples_per_shard, dedup=not a.no_dedup, dedup_against=a.dedup_against,
                      shard_bytes=shard_bytes)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "shard":
        from data_prep.plan import resolve_task
        from data_prep.run import run_local, run_task
        if a.processes < 1:
            raise ValueError(f"--processes {a.processes}: must be >= 1")
        opts = job_options(a)
        task_index, num_tasks = resolve_task(a.task_index, a.num_tasks, os.environ)
        explicit = a.task_index is not None or "SLURM_ARRAY_TASK_ID" in os.environ
        if explicit:
            run_task(opts, a.processes, task_index, num_tasks, progress=not a.no_progress)
        else:
            run_local(opts, a.processes, progress=not a.no_progress)
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
        opts = filter_mod.FilterOptions(
            dataset=a.dataset, output=a.output, scores=a.scores, min_score=a.min_score, top_fraction=a.top_fraction,
            dedup_embeddings=a.dedup_embeddings, min_image_size=a.min_image_size,
            caption_rules=tuple(a.caption_rule or ()), device=a.device, progress=not a.no_progress)
        print(filter_mod.format_summary(filter_mod.filter_dataset(opts)))
        return 0
    if a.command == "repair":
        from data_prep.repair import repair
        repair(a.output, processes=a.processes, progress=not a.no_progress)
        return 0
    raise AssertionError(a.command)


if __name__ == "__main__":
    sys.exit(main())
