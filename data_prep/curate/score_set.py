"""`plait prep score DATASET --model EXPORT`: the image-text cosine similarity of every sample under a trained
model, the first half of CLIP-score filtering (LAION, DataComp, Data Filtering Networks); `filter.py` the second.

Output folder (default DATASET/scores), per shard S (the tar's stem):
  S.parquet        key, shard (tar name), score (float32 cosine, null if the sample could not be scored), reason
                   (why null), with --embeddings image_embedding / text_embedding (L2-normalised, float16)
  S_stats.json     counts and seconds; written last = the shard is done (a rerun skips it)
  _score_plan.json the dataset's and the model's fingerprints and the settings: a rerun into the same folder with
                   another dataset, model or settings is refused, and `plait prep filter` checks it
  summary.json     samples/s of the last run, score quantiles, null reasons
"""
# Apart from score.py, which runs the model, so that `plait prep` builds its parser and `plait prep filter` reads
# score folders without importing torch (5 s of start-up).
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass

from pipeline.options import option
from data_prep.shards import remote
from data_prep.shards.members import CAPTION_KEYS, IMAGE_KEYS, MemberKeys
from data_prep.shards.manifest import read_manifest
from data_prep.shards.scan import validate_sizes
from data_prep.shards.writer import OutputDir

PLAN = "_score_plan.json"
PRECISION_NAMES = ("fp32", "bf16", "fp16")
"""`--precision` values; score.py maps them to autocast dtypes."""


@dataclass(frozen=True)
class ScoreOptions:
    dataset: str = option(no_flag=True)
    """dataset folder: a plait dataset or any folder of WebDataset tars (local path or fsspec URL)"""
    model: str = option(metavar="EXPORT")
    """exported model: a `plait export --format open_clip` folder, an open_clip `local-dir:` folder, or anything
    `plait eval` loads (Hugging Face CLIP folder, safetensors export, checkpoint)"""
    out: str | None = option(None, metavar="DIR")
    """score folder (default: DATASET/scores)"""
    batch_size: int = 256
    """samples per forward pass"""
    num_workers: int = 2
    """DataLoader worker processes per rank that read and decode shards (0: in the main process)"""
    embeddings: bool = False
    """also keep the image and text embeddings (float16), needed by `plait prep filter --dedup-embeddings`"""
    precision: str = option("fp32", choices=PRECISION_NAMES)
    """fp32, or bf16 / fp16 autocast (GPUs)"""
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    """auto: a GPU per rank when there is one"""
    image_keys: str = IMAGE_KEYS
    """image members, tried in order (';'-separated extensions; as training's data.image_keys)"""
    caption_keys: str = CAPTION_KEYS
    """caption members, tried in order: extensions or json:FIELD (as training's data.caption_keys)"""
    progress: bool = True
    """progress bar (rank 0)"""
    task_index: int = option(0, cli_default=None)
    """this task of a job array: scores the TASK_INDEX-th of --num-tasks contiguous shard ranges (default:
    SLURM_ARRAY_TASK_ID, else all shards)"""
    num_tasks: int = option(1, cli_default=None)
    """tasks in the job array (default: SLURM_ARRAY_TASK_COUNT; `plait launch score` submits one per range)"""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 1")
        MemberKeys.parse(self.image_keys, self.caption_keys, names=("--image-keys", "--caption-keys"))
        if self.num_workers < 0:
            raise ValueError(f"--num-workers {self.num_workers}: must be >= 0")
        if self.precision not in PRECISION_NAMES:
            raise ValueError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISION_NAMES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: expected auto, cpu or cuda")
        if self.num_tasks < 1 or not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"--task-index {self.task_index}: must be in [0, --num-tasks={self.num_tasks})")

    @property
    def out_dir(self) -> str:
        return self.out or f"{self.dataset.rstrip('/')}/scores"


@dataclass
class Dataset:
    url: str
    shards: list[str]
    """Tar names in order."""
    sizes: dict[str, int] | None
    """Samples per tar when the folder says (plait's / open_clip's sizes.json)."""
    fingerprint: str
    plait: bool


def open_dataset(url: str) -> Dataset:
    """The shards of a plait dataset (its manifest) or of any folder of WebDataset tars; refuses anything else."""
    import fsspec
    remote.trust(url)
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):  # checked first: OutputDir would create it
        raise FileNotFoundError(f"dataset {url!r}: no such folder")
    src = OutputDir(url)
    if src.exists("manifest.json"):
        manifest = read_manifest(src)  # every name a plain tar of this folder: nothing is read or written elsewhere
        shards = [s["name"] for s in manifest["shards"]]
        sizes = {s["name"]: s["num_samples"] for s in manifest["shards"]}
        ident = [(s["name"], s["sha256"]) for s in manifest["shards"]]
        plait = True
    else:
        shards = src.glob("*.tar")
        if not shards:
            raise ValueError(f"dataset {url!r}: not a WebDataset folder (no .tar shards and no plait manifest.json)")
        sizes = (validate_sizes(src.read_bytes("sizes.json"), src.path("sizes.json"))
                 if src.exists("sizes.json") else None)
        ident = [(n, src.fs.size(src.path(n))) for n in shards]
        plait = False
    fingerprint = hashlib.sha256(json.dumps(ident).encode()).hexdigest()
    return Dataset(url, shards, sizes, fingerprint, plait)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ScoreOptions, generated from its fields (types, defaults, docstrings as help)."""
    from pipeline.flags import add_options
    from pipeline.options import field_docs

    p.add_argument("dataset", help=" ".join(field_docs(ScoreOptions)["dataset"].split()))
    add_options(p, ScoreOptions)


def options(a: argparse.Namespace) -> ScoreOptions:
    from pipeline.flags import from_args
    from data_prep.job.plan import resolve_task
    task_index, num_tasks = resolve_task(a.task_index, a.num_tasks, os.environ)
    return from_args(ScoreOptions, a, task_index=task_index, num_tasks=num_tasks)
