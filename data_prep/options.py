"""Typed options of a sharding job, one frozen dataclass per stage, validated once when built.

The CLI (`data_prep/cli.py`) is the only place that turns flags into these; every stage receives only its own
section. `JobOptions.to_dict` is written to `_plan.json` in the output folder so that a rerun, a task of a job array,
`merge` and `repair` all work from the same settings (a rerun with different settings is refused).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
ENCODE_FORMATS = ("jpg", "png", "webp")
RESAMPLE_FILTERS = ("bicubic", "lanczos", "bilinear", "box")
INPUT_FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "json", "txt", "folder", "yfcc100m", "webvid",
                 "fashion-mnist")
FRAME_SAMPLING = ("uniform", "fps", "keyframes")
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str, flag: str = "--shard-bytes") -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '1.5 GB', plain integers; units are case-insensitive
    (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
    unit = m and _SIZE_UNITS.get(m.group(2).lower())
    if not unit:
        raise ValueError(f"{flag} {value!r}: expected a size like 500MB, 1GiB or a number of bytes "
                         "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{flag} {value!r}: must be positive")
    return size


def format_size(num_bytes: float) -> str:
    """Decimal units, 3 significant digits: 1234567 -> '1.23 MB'."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(num_bytes) < 1000:
            return f"{num_bytes:.3g} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.3g} TB"


@dataclass(frozen=True)
class SourceOptions:
    input: str
    input_format: str = "auto"
    url_col: str = "url"
    caption_col: str | None = "caption"
    extra_cols: tuple[str, ...] = ()
    split: str = "train"            # fashion-mnist only
    yfcc_caption: tuple[str, ...] = ("title", "description")
    start_col: str | None = None    # video: optional time window columns (seconds)
    end_col: str | None = None

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"--input-format {self.input_format!r}: expected one of {', '.join(INPUT_FORMATS)}")
        if self.split not in ("train", "test"):
            raise ValueError(f"--split {self.split!r}: expected train or test")
        bad = set(self.yfcc_caption) - {"title", "description", "tags"}
        if bad:
            raise ValueError(f"--yfcc-caption {','.join(sorted(bad))!r}: expected title, description and/or tags")


@dataclass(frozen=True)
class FetchOptions:
    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_retry_after_s: float = 30.0
    max_per_host: int = 8
    threads: int = 16
    max_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 5
    user_agent_token: str | None = None
    allow_private: bool = False
    respect_optouts: bool = True
    allow_schemes: tuple[str, ...] = ()
    """Object stores a table's URLs may name besides http/https (e.g. ("s3", "gs")); every other scheme, chained
    fsspec URLs (`simplecache::...`) included, is a per-row reject. Their endpoint is held to allow_private too."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "max_per_host", "threads", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be positive")
        if self.retries < 0:
            raise ValueError(f"--retries {self.retries}: must be >= 0")
        bad = sorted(set(self.allow_schemes) - set(OBJECT_STORE_SCHEMES))
        if bad:
            raise ValueError(f"--allow-schemes {','.join(bad)}: expected some of {', '.join(OBJECT_STORE_SCHEMES)} "
                             "(http and https are always allowed; local paths are not URLs)")


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resample: str = "bicubic"             # open_clip's and torchvision's CLIP preprocessing filter
    upscale: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    background: tuple[int, int, int] = (255, 255, 255)
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    max_pixels: int = 89_478_485          # Pillow's own default decompression-bomb threshold
    keep_original_jpeg: bool = True
    max_caption_length: int = 4096
    allow_empty_caption: bool = False

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"--resize-mode {self.resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"--resample {self.resample!r}: expected one of {', '.join(RESAMPLE_FILTERS)}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"--encode-format {self.encode_format!r}: expected one of {', '.join(ENCODE_FORMATS)}")
        if self.image_size <= 0:
            raise ValueError(f"--image-size {self.image_size}: must be positive")
        if not 1 <= self.encode_quality <= 100:
            raise ValueError(f"--encode-quality {self.encode_quality}: must be in 1..100")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"--max-aspect-ratio {self.max_aspect_ratio}: must be >= 1")


@dataclass(frozen=True)
class VideoOptions:
    enabled: bool = False
    sampling: str = "uniform"
    num_frames: int = 8
    fps: float = 1.0
    max_duration_s: float = math.inf
    max_frames: int = 256
    per_frame_samples: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in FRAME_SAMPLING:
            raise ValueError(f"--frame-sampling {self.sampling!r}: expected one of {', '.join(FRAME_SAMPLING)}")
        if self.num_frames <= 0 or self.fps <= 0 or self.max_frames <= 0:
            raise ValueError("--num-frames, --fps and --max-frames must be positive")


@dataclass(frozen=True)
class JobOptions:
    output: str
    source: SourceOptions
    fetch: FetchOptions = field(default_factory=FetchOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    video: VideoOptions = field(default_factory=VideoOptions)
    samples_per_shard: int | None = 10_000
    """Input rows per shard; with shard_bytes, the most rows per shard (None: no limit, only with shard_bytes)."""
    dedup: bool = True
    dedup_against: str | None = None
    shard_bytes: int | None = None
    """Target tar size; None = shards sized by samples_per_shard alone."""
    sizing: dict[str, Any] | None = None
    """With shard_bytes: the pilot's result (see `run.resolve_sizing`), recorded in `_plan.json` so that resumes
    and array tasks reuse it; derived, not a setting, so never compared between runs."""

    def __post_init__(self) -> None:
        if self.samples_per_shard is None and self.shard_bytes is None:
            raise ValueError("--samples-per-shard or --shard-bytes is needed to size the shards")
        if self.samples_per_shard is not None and self.samples_per_shard <= 0:
            raise ValueError(f"--samples-per-shard {self.samples_per_shard}: must be positive")
        if self.shard_bytes is not None and self.shard_bytes <= 0:
            raise ValueError(f"--shard-bytes {self.shard_bytes}: must be positive")

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
        for section in out.values():
            if isinstance(section, dict):
                for k, v in section.items():
                    if isinstance(v, float) and math.isinf(v):
                        section[k] = None
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "JobOptions":
        def build(cls, values):
            kw = {}
            for f in dataclasses.fields(cls):
                if f.name not in values:
                    continue
                v = values[f.name]
                if v is None and f.default is not dataclasses.MISSING and isinstance(f.default, float):
                    v = math.inf
                if isinstance(v, list):
                    v = tuple(v)
                kw[f.name] = v
            return cls(**kw)

        return JobOptions(
            output=d["output"], source=build(SourceOptions, d["source"]), fetch=build(FetchOptions, d["fetch"]),
            image=build(ImageOptions, d["image"]), video=build(VideoOptions, d.get("video", {})),
            samples_per_shard=d["samples_per_shard"], dedup=d["dedup"], dedup_against=d.get("dedup_against"),
            shard_bytes=d.get("shard_bytes"), sizing=d.get("sizing"))
