"""Typed options of a sharding job, one frozen dataclass per stage, validated once when built.

The CLI (`data_prep/cli.py`) is the only place that turns flags into these; every stage receives only its own
section. `JobOptions.to_dict` is written to `_plan.json` in the output folder so that a rerun, a task of a job array,
`merge` and `repair` all work from the same settings (a rerun with different settings is refused).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from data_prep.shards.layout import ENCODE_FORMATS
from pipeline.options import option, validate

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
RESAMPLE_FILTERS = ("bicubic", "lanczos", "bilinear", "box")
INPUT_FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "json", "txt", "folder", "yfcc100m", "webvid",
                 "howto100m", "clips", "fashion-mnist")
TABLE_FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")
"""Formats of the video table under --input-format howto100m and clips (told from the file name)."""
FRAME_SAMPLING = ("uniform", "fps", "keyframes")
CLIP_FORMATS = ("frames", "mp4")
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")



@dataclass(frozen=True)
class SegmentOptions:
    """How videos are cut into segments, each one sample (see `data_prep.input.segments`)."""
    caption_json: str | None = option(None, metavar="FILE")
    """howto100m: the caption file, a JSON object mapping each video id to parallel lists start, end, text
    (seconds, seconds, ASR text), one segment each; streamed (ijson) into a temporary index of the table's videos,
    so memory holds one video's entry (at most --max-caption-json-bytes)"""
    video_id_col: str = "video_id"
    """howto100m: the video table's column with the id the caption file is keyed by"""
    subtitles: bool = False
    """cut each video by the subtitle file beside it (VIDEO.vtt or VIDEO.srt, same folder and name), one segment
    per cue; a video without one is rejected"""
    subtitle_col: str | None = option(None, metavar="COL")
    """column naming each video's subtitle file (.vtt or .srt; local paths under the same rules as the videos)"""
    segment: str | None = option(None, metavar="stride=SECONDS|scenes")
    """cut videos without captions: stride=SECONDS (fixed length, the last one shorter) or scenes (PySceneDetect's
    content detector, --scene-threshold); each segment takes the row's --caption-col text, or none with
    --caption-col none (then only image-side objectives learn from it). Local videos only"""
    min_clip_s: float = option(0.0, ge=0, metavar="SECONDS")
    """merge consecutive segments of a video (texts joined) until a clip lasts at least this long (HowTo100M's ASR
    segments are ~4 s and often shorter than what they describe); 0: every segment its own clip"""
    max_clip_s: float = option(math.inf, gt=0, inf=True, metavar="SECONDS")
    """a merge never makes a clip longer; a single longer segment is cut to its first SECONDS"""
    drop_non_speech: bool = True
    """reject (with a reason) segments whose text is empty or only non-speech markup: [Music], (applause), ♪
    (--no-drop-non-speech: keep them)"""
    scene_threshold: float = option(27.0, gt=0)
    """--segment scenes: ContentDetector threshold (mean HSV change between frames, 0-255 scale)"""
    max_segments: int = option(100_000, gt=0)
    """segments of one video at most; a caption entry or subtitle file with more rejects its video"""
    max_caption_json_bytes: int = option(4 * 2**30, gt=0, parse="size", metavar="SIZE")
    """largest --caption-json read"""
    max_subtitle_bytes: int = option(8 * 2**20, gt=0, parse="size", metavar="SIZE")
    """largest subtitle file read; a larger one rejects its video"""

    def __post_init__(self) -> None:
        validate(self)
        if self.segment is not None and self.segment != "scenes":
            kind, _, value = self.segment.partition("=")
            try:
                stride = float(value)
            except ValueError:
                stride = math.nan
            if kind != "stride" or not math.isfinite(stride) or stride <= 0:
                raise ValueError(f"--segment {self.segment!r}: expected stride=SECONDS (a number > 0) or scenes")
        if self.segment and (self.subtitles or self.subtitle_col or self.caption_json):
            raise ValueError(f"--segment {self.segment}: cuts videos without captions; not with --subtitles, "
                             "--subtitle-col or --caption-json")
        if self.min_clip_s > self.max_clip_s:
            raise ValueError(f"--min-clip-s {self.min_clip_s}: larger than --max-clip-s {self.max_clip_s}")

    @property
    def stride_s(self) -> float | None:
        return float(self.segment.split("=", 1)[1]) if self.segment and self.segment != "scenes" else None


@dataclass(frozen=True)
class SourceOptions:
    input: str = option(metavar="PATH")
    """table (parquet, csv/tsv[.gz], jsonl/json, txt of URLs), folder of images with sidecar .txt captions, or a
    named dataset folder; local path or fsspec URL. A resume or array task must name the same input, unchanged"""
    input_format: str = option("auto", choices=INPUT_FORMATS)
    """auto = from the file extension; tsv is unquoted (a '"' is text); csv quotes within one line;
    yfcc100m = the YFCC100M metadata dump (tab-separated, no header); webvid = WebVid CSV (videoid, contentUrl,
    duration, page_dir, name); howto100m = a video table (--video-id-col, --url-col) plus --caption-json;
    clips = a clip table, one row per clip: video, start, end, caption (as video2dataset's clip_col); the table's
    own format of both from its name; fashion-mnist = the idx gz files of --split (a JSON array input is loaded
    whole)"""
    url_col: str = "url"
    """column with the URL or path (webvid: contentUrl)"""
    caption_col: str | None = option("caption", parse="caption_col")
    """column with the caption; 'none' for no caption (webvid: name)"""
    extra_cols: tuple[str, ...] = ()
    """comma-separated columns kept in {key}.json"""
    split: str = option("train", choices=("train", "test"))
    """fashion-mnist split"""
    yfcc_caption: tuple[str, ...] = ("title", "description")
    """yfcc100m caption parts, in order: title, description, tags"""
    start_col: str | None = None
    """video: column with the window start in seconds"""
    end_col: str | None = None
    """video: column with the window end in seconds"""
    local_root: tuple[str, ...] = option((), repeat=True, metavar="DIR")
    """folder that local paths in the table (no scheme, or file://) may point into, after symlinks are resolved;
    repeatable. Default: the table's own folder (none for a table that is not local: its local paths are
    refused). Relative paths start from the table's folder. Rows pointing elsewhere are rejected"""

    segments: SegmentOptions = field(default_factory=SegmentOptions)
    label_col: str | None = option(None, metavar="COL")
    """column with each row's class: integer ids are written as they are; class names are mapped to ids in
    sorted order (or the order of --classnames), the same in every array task, and the list is written to
    classnames.txt beside the shards, where plait eval and plait finetune find it. Writes {key}.cls (and the
    name as "label" in {key}.json); a row without a label is rejected"""
    classnames: str | None = option(None, metavar="FILE")
    """with --label-col: one class name per line, in id order; a name not in it rejects its row (default: the
    sorted unique names of the column, found in one pass over the input when the job starts)"""

    def __post_init__(self) -> None:
        validate(self)
        if self.classnames and not self.label_col:
            raise ValueError(f"--classnames {self.classnames!r}: needs --label-col (the column to map)")
        if self.input_format == "howto100m" and not self.segments.caption_json:
            raise ValueError("--input-format howto100m: needs --caption-json FILE (the captions by video id)")
        if self.segments.caption_json and self.input_format != "howto100m":
            raise ValueError(f"--caption-json {self.segments.caption_json!r}: needs --input-format howto100m")
        if self.label_col and self.input_format in ("folder", "txt", "yfcc100m", "fashion-mnist"):
            raise ValueError(f"--label-col {self.label_col!r}: needs a table input, not {self.input_format}")
        bad = set(self.yfcc_caption) - {"title", "description", "tags"}
        if bad:
            raise ValueError(f"--yfcc-caption {','.join(sorted(bad))!r}: expected title, description and/or tags")
        for root in self.local_root:
            if "://" in root and not root.startswith("file://"):
                raise ValueError(f"--local-root {root!r}: must be a local folder")
            if not os.path.isdir(root.removeprefix("file://")):
                raise ValueError(f"--local-root {root!r}: no such folder")


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float = option(10.0, gt=0, aliases=("--timeout",))
    """seconds for one attempt at an http(s) URL, all of it: connect, TLS, headers, redirects, error page, body"""
    retries: int = option(2, ge=0)
    """retries of timeouts, 429, 5xx, connection errors"""
    backoff_s: float = option(0.5, ge=0, aliases=("--backoff",))
    """first retry delay in seconds, doubled each time"""
    max_retry_after_s: float = option(30.0, ge=0, aliases=("--max-retry-after",))
    """longest Retry-After (seconds) to wait for; a longer one fails the row as transient"""
    max_per_host: int = option(8, gt=0)
    """concurrent requests per host and process: a host sees up to processes x this (see "sizing" below)"""
    threads: int = option(16, gt=0)
    """download threads per process; each process also keeps max(128, 4 x threads) rows fetching ahead, across
    shard boundaries (see "sizing" below)"""
    max_bytes: int = option(64 * 2**20, gt=0, parse="size", metavar="SIZE")
    """reject larger downloads (bytes, or 64MiB, 1GB ...)"""
    max_redirects: int = option(5, ge=0)
    """redirects followed at most"""
    user_agent_token: str | None = None
    """contact info appended to the user agent"""
    allow_private: bool = option(False, aliases=("--allow-private-addresses",))
    """allow loopback/private/link-local addresses (local test servers only: refused by default)"""
    respect_optouts: bool = option(True, negative=("--ignore-opt-outs",))
    """drop samples whose server sends X-Robots-Tag noai/noimageai/noindex/noimageindex (--ignore-opt-outs:
    keep them)"""
    allow_schemes: tuple[str, ...] = option((), metavar="SCHEMES")
    """object stores the table's URLs may name besides http(s), comma-separated: s3, gs, az ... (their endpoint
    must be a public address unless --allow-private-addresses); any other scheme and chained fsspec URLs
    (simplecache::...) are rejected per row"""

    def __post_init__(self) -> None:
        validate(self)
        bad = sorted(set(self.allow_schemes) - set(OBJECT_STORE_SCHEMES))
        if bad:
            raise ValueError(f"--allow-schemes {','.join(bad)}: expected some of {', '.join(OBJECT_STORE_SCHEMES)} "
                             "(http and https are always allowed; local paths are not URLs)")


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = option(256, gt=0)
    """target size in pixels (see --resize-mode)"""
    resize_mode: str = option("keep_ratio", choices=RESIZE_MODES)
    """keep_ratio: shorter side to --image-size; keep_ratio_largest: longer side; center_crop: shorter side then
    a centred square; border: longer side then padded to a square; no: as is"""
    resample: str = option("bicubic", choices=RESAMPLE_FILTERS)
    """resampling filter when resizing (after JPEG draft decoding at 1/2, 1/4 or 1/8 size); bicubic is open_clip's
    and torchvision's CLIP preprocessing filter"""
    upscale: bool = False
    """also enlarge images smaller than the target (default: never upscale)"""
    encode_format: str = option("jpg", choices=ENCODE_FORMATS)
    """image format in the shards"""
    encode_quality: int = option(95, ge=1, le=100)
    """jpg/webp quality"""
    background: tuple[int, int, int] = option((255, 255, 255), parse="rgb", metavar="R,G,B")
    """colour behind transparent pixels (alpha, transparent palette entries, PNG colour keys) and border padding"""
    min_image_size: int = option(0, ge=0)
    """reject images whose shorter side is smaller (pixels)"""
    max_aspect_ratio: float = option(math.inf, ge=1, inf=True)
    """reject images with a larger long/short side ratio"""
    max_pixels: int = option(89_478_485, gt=0)
    """reject larger images (decompression bombs) before decoding them, and resized (upscaled) images larger
    than this; the default is Pillow's own decompression-bomb threshold"""
    max_decode_bytes: int = option(512 * 2**20, gt=0, parse="size", metavar="SIZE")
    """reject images whose decoded pixels would take more memory (width x height x bytes per pixel of the
    decoded mode, after JPEG draft scaling); a worker's decode memory stays near this bound"""
    keep_original_jpeg: bool = option(True, negative=("--no-keep-original",))
    """keep the original bytes of JPEGs that already fit and are upright RGB (--no-keep-original-jpeg:
    re-encode them)"""
    max_caption_length: int = option(4096, gt=0)
    """reject longer captions (characters)"""
    allow_empty_caption: bool = False
    """keep rows whose caption is empty"""

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class VideoOptions:
    video: bool = False
    """rows are videos: sample frames with PyAV (implied by --input-format webvid)"""
    frame_sampling: str = option("uniform", choices=FRAME_SAMPLING)
    """uniform: --num-frames spread over the video; fps: --fps frames per second; keyframes: keyframes only"""
    num_frames: int = option(8, gt=0)
    """frames per video (uniform)"""
    fps: float = option(1.0, gt=0)
    """frames per second (fps sampling)"""
    max_duration_s: float = option(math.inf, gt=0, inf=True, aliases=("--max-duration",))
    """seconds of video read at most"""
    max_frames: int = option(256, gt=0)
    """frames per video at most (fps, keyframes)"""
    frames_as_samples: bool = False
    """write one image-text sample per frame (caption, frame index, timestamp) instead of one per video"""
    clip_format: str = option("frames", choices=CLIP_FORMATS)
    """frames: the sampled frames only; mp4: also the clip itself as a {key}.mp4 member, cut from the source
    without re-encoding, from the keyframe at or before the segment's start (recorded as clip_start in
    {key}.json, with clip_end and clip_audio); a codec mp4 cannot hold rejects the row"""
    clip_audio: bool = True
    """--clip-format mp4: keep the first audio stream in the clip (--no-clip-audio: video only)"""

    def __post_init__(self) -> None:
        if self.clip_format == "mp4" and self.frames_as_samples:
            raise ValueError("--clip-format mp4 needs one sample per video: drop --frames-as-samples")
        validate(self)


@dataclass(frozen=True)
class JobOptions:
    output: str = option(metavar="PATH")
    """output folder, local path or fsspec URL"""
    source: SourceOptions = option(no_flag=True)
    fetch: FetchOptions = field(default_factory=FetchOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    video: VideoOptions = field(default_factory=VideoOptions)
    samples_per_shard: int | None = option(10_000, gt=0, cli_default=None)
    """input rows per shard; with --shard-bytes the most rows per shard (default: 10000, no limit with
    --shard-bytes)"""
    dedup: bool = True
    """drop exact duplicates (same sha256 of the bytes); --no-dedup keeps them"""
    dedup_against: str | None = option(None, metavar="PARQUET")
    """samples.parquet of an earlier dataset: drop its images"""
    shard_bytes: int | None = option(None, gt=0, parse="size", metavar="SIZE")
    """target tar size, e.g. 500MB, 1GiB or bytes: a pilot builds the first 64 input rows (16 videos) in a
    temporary folder to measure bytes per row, and the rows per shard it derives are kept in _plan.json for
    resumes and every array task (default: off, shards sized by --samples-per-shard)"""
    sizing: dict[str, Any] | None = option(None, no_flag=True)
    """With shard_bytes: the pilot's result (see `run.resolve_sizing`), recorded in `_plan.json` so that resumes
    and array tasks reuse it; derived, not a setting, so never compared between runs."""
    class_names: tuple[str, ...] | None = option(None, no_flag=True)
    """With --label-col: the class names in id order (see `labels.plan_labels`), recorded in `_plan.json` by the
    task that writes it, so that every task maps a name to the same id; derived, never compared."""
    input_fingerprint: dict[str, Any] | None = option(None, no_flag=True)
    """The input's size and modification time (see `sources.input_fingerprint`), recorded in `_plan.json` when
    the job starts: a resume or array task that finds another is refused."""

    def __post_init__(self) -> None:
        if self.samples_per_shard is None and self.shard_bytes is None:
            raise ValueError("--samples-per-shard or --shard-bytes is needed to size the shards")
        validate(self)

    @property
    def rows_per_shard(self) -> int:
        """Input rows per shard as the plan uses them: the pilot's value once sized by bytes."""
        if self.shard_bytes is None:
            return self.samples_per_shard
        assert self.sizing is not None, "shard_bytes set but sizing not resolved (run.resolve_sizing)"
        return self.sizing["samples_per_shard"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # json has no infinity; keep the file strict JSON
        def finite(section: dict[str, Any]) -> None:
            for k, v in section.items():
                if isinstance(v, float) and math.isinf(v):
                    section[k] = None
                elif isinstance(v, dict):
                    finite(v)
        for section in out.values():
            if isinstance(section, dict):
                finite(section)
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "JobOptions":
        def build(cls, values):
            values = {_RENAMED.get(k, k): v for k, v in values.items()}
            kw = {}
            for f in dataclasses.fields(cls):
                if f.name not in values:
                    continue
                v = values[f.name]
                if v is None and f.default is not dataclasses.MISSING and isinstance(f.default, float):
                    v = math.inf
                if isinstance(v, list):
                    v = tuple(v)
                if f.name == "segments" and isinstance(v, dict):
                    v = build(SegmentOptions, v)
                kw[f.name] = v
            return cls(**kw)

        return JobOptions(
            output=d["output"], source=build(SourceOptions, d["source"]), fetch=build(FetchOptions, d["fetch"]),
            image=build(ImageOptions, d["image"]), video=build(VideoOptions, d.get("video", {})),
            samples_per_shard=d["samples_per_shard"], dedup=d["dedup"], dedup_against=d.get("dedup_against"),
            shard_bytes=d.get("shard_bytes"), sizing=d.get("sizing"), input_fingerprint=d.get("input_fingerprint"),
            class_names=tuple(d["class_names"]) if d.get("class_names") else None)


@dataclass(frozen=True)
class RunOptions:
    """How this process runs the job; not part of `_plan.json` (a resume may change them)."""
    processes: int = option(max(1, os.cpu_count() or 1), ge=1)
    """worker processes, each building whole shards (default: the number of CPUs)"""
    task_index: int | None = option(None, ge=0)
    """this task of a job array (default: SLURM_ARRAY_TASK_ID, else a single local run that also merges)"""
    num_tasks: int | None = option(None, gt=0)
    """tasks in the job array (default: SLURM_ARRAY_TASK_COUNT)"""
    progress: bool = True
    """progress bar on stderr (--no-progress: none)"""

    def __post_init__(self) -> None:
        validate(self)


# fields renamed so that each flag equals its field name; plans written before still load
_RENAMED = {"enabled": "video", "sampling": "frame_sampling", "per_frame_samples": "frames_as_samples"}
