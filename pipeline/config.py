"""Typed run configuration: dataclass sections, TOML presets, `--set a.b=v` overrides, validated once.

Each field carries its documentation as a string literal right under it; `field_docs` reads those literals
from the source so that `plait train --help-config` and error messages show the same words as this file.
"""
from __future__ import annotations

import dataclasses
import math
import string
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

# re-exported: sections outside this module use them
from data_prep.shards.members import CAPTION_KEYS, IMAGE_KEYS, MemberKeys
from pipeline.options import choice, field_docs, parse_size, require  # noqa: F401
from pipeline.models.config import ModelConfig  # noqa: F401  (the model library owns its config)
from pipeline.objectives.registry import ObjectiveConfig  # each objective's section lives in its unit

# Seeds reach numpy's legacy seeding (below 2**32, via accelerate's set_seed) after adding the rank.
MAX_SEED = 2**31 - 1
# Integers travel into torch and numpy as int64.
MAX_INT = 2**63 - 1
# Accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS; tests/test_config.py checks they agree),
# spelled out so that reading a config imports no tracker code.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def check_template(template: str, key: str) -> str:
    """`template` when it holds exactly one `{}` (the class name) and no other placeholder; else ValueError naming
    `key` and the template. `{c}`, `{0}`, `{name}` or a second `{}` would fail in str.format only at evaluation."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exn:
        raise ValueError(f"{key}: template {template!r} is malformed: {exn}") from None
    if fields != [""]:
        found = ", ".join("{" + f + "}" for f in fields) or "none"
        raise ValueError(f"{key}: template {template!r} must hold exactly one {{}} for the class name "
                         f"and no other placeholder (found: {found})")
    return template


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""
    """Training shards: a brace-expanded path or fsspec URL (`data/{00000..00009}.tar`, `s3://b/{0..99}.tar`),
    several datasets joined with `::`, each optionally weighted as `spec@weight` (its share of the samples,
    resampled mode only). Sample counts come from sizes.json beside the shards (or per-shard *_stats.json);
    `plait prep index` writes them for shards from elsewhere, and resampled mode estimates missing ones."""
    mode: str = choice("exact", "exact", "resampled")
    """exact: every sample once per epoch across all ranks and workers. resampled: shards drawn with
    replacement, for huge datasets and short virtual epochs."""
    batch_size: int = 256
    """Samples per process per step (the global batch is batch_size x processes x accum_steps)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples each worker shuffles together: it reads a block of this many raw samples, permutes it by
    (seed, epoch, worker, block) and decodes in that order; 0 disables sample shuffling (shards are still
    shuffled). Resuming re-reads at most one block of raw bytes and decodes nothing it skips."""
    seed: int = 0
    """Seed of the data order: the order is a pure function of (seed, epoch, topology)."""
    epoch_samples: int = 0
    """Resampled mode only: samples per virtual epoch across all ranks (0: the dataset size)."""
    max_bad_fraction: float = 0.01
    """Fail the run when more than this fraction of samples cannot be decoded."""
    video_frames: int = 0
    """Video shards: 0 reads one random frame per video as an image; T>0 yields T frames per sample
    (`frames` [B,T,3,H,W], one random frame per equal segment, same crop for all frames of a clip)."""
    draft: bool = True
    """Decode JPEGs stored much larger than the model's input at 1/2, 1/4 or 1/8 scale (PIL Image.draft),
    never below the model's image size."""
    image_keys: str = IMAGE_KEYS
    """Image members of a sample, tried in order (webdataset style, `;`-separated extensions); video frames are
    `f0000.<key>`, `f0001.<key>`, ... Shards from other tools may say `jpeg;bmp`."""
    caption_keys: str = CAPTION_KEYS
    """Caption members, tried in order: extensions (`txt;caption`) or `json:FIELD` for a string field of the
    sample's .json member. `plait prep verify` names the key to set when a dataset uses another one."""
    resume_mismatch: str = choice("error", "error", "next_epoch")
    """When a checkpoint's data order cannot be continued (seed, batch size, processes, workers or dataset size
    changed): error, or next_epoch (continue at the start of the next epoch)."""
    log_keys: bool = False
    """Audit the data order: each process appends `step epoch key` for every sample it trains on to
    RUN_DIR/keys/rank-NNNNN.txt (a resumed run appends; lines after the checkpoint it resumed from were not kept)."""
    cache_dir: str = ""
    """Local folder that keeps remote shards (s3://, gs://, http(s)://) after their first read, so later epochs
    and resumed runs read them from disk; shared by the workers and ranks of a node. Empty: no cache."""
    cache_bytes: str = "100GB"
    """Bound on the cache's size (500GB, 1TiB, bytes); the least recently used shards leave first."""

    def __post_init__(self):
        require(self.batch_size > 0, "data.batch_size", f"must be positive, got {self.batch_size}")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", "must lie in [0, 1]")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        require(0 <= self.seed <= MAX_SEED, "data.seed", f"must lie in [0, {MAX_SEED}], got {self.seed}")
        require(self.epoch_samples >= 0, "data.epoch_samples", f"must be >= 0, got {self.epoch_samples}")
        require(self.video_frames >= 0, "data.video_frames", f"must be >= 0, got {self.video_frames}")
        MemberKeys.parse(self.image_keys, self.caption_keys)  # ValueError naming data.image_keys / caption_keys
        parse_size(self.cache_bytes, "config key 'data.cache_bytes':")
        require("::" not in self.cache_dir and not ("://" in self.cache_dir and not self.cache_dir.startswith(
            "file://")), "data.cache_dir", f"{self.cache_dir!r} must be a local folder")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to norms, biases, embeddings' scales or the logit scale."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warm-up steps before the schedule."""
    schedule: str = choice("cosine", "cosine", "constant")
    """Learning-rate schedule after warm-up, a pure function of the step."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool = True
    """torch's fused AdamW kernel (CPU and CUDA): one pass over all parameters instead of ~10 small ops per
    parameter; same update, 3-5x faster optimizer step on small models. false: the reference for-loop kernel."""

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.beta1 < 1, "optim.beta1", f"must lie in [0, 1), got {self.beta1}")
        require(0 <= self.beta2 < 1, "optim.beta2", f"must lie in [0, 1), got {self.beta2}")
        require(self.eps > 0, "optim.eps", f"must be positive, got {self.eps}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
        require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    """Local directory of the run: resolved config, checkpoints, metrics, report (object storage: remote_dir)."""
    remote_dir: str = ""
    """Object-storage URL (`s3://bucket/runs/r1`, any fsspec URL) that every checkpoint is copied to once it is
    complete locally, published there only after its last file (`--resume auto` takes the newest complete one
    of both places, `keep_last` prunes both); `plait export` and `plait finetune` read checkpoints from it.
    Empty: checkpoints stay in run_dir only."""
    report_to: tuple[str, ...] = ("tensorboard",)
    """Experiment trackers, through Accelerate (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive,
    swanlab, trackio); metrics.jsonl is always written. [] for none."""
    steps: int = 1000
    """Total optimizer steps; the LR schedule spans them."""
    max_time_s: float = 0.0
    """Stop (after a checkpoint) once training has run this many seconds; 0: no limit."""
    device: str = choice("auto", "auto", "cpu")
    """auto: the accelerator's choice (GPU when present); cpu: force CPU (gloo for several processes)."""
    strategy: str = choice("ddp", "ddp", "fsdp")
    """ddp: every process holds the whole model; fsdp: parameters, gradients and optimizer state sharded over
    the processes (Accelerate's FSDP2, one unit per transformer block), for models too large to replicate.
    An accelerate launch config asking for FSDP selects fsdp too. Checkpoints are the same either way."""
    precision: str = choice("fp32", "fp32", "bf16", "fp16")
    """fp32, bf16 autocast, or fp16 autocast with a gradient scaler (CPU and GPU; on CPU fp16 is for testing)."""
    accum_steps: int = 1
    """Micro-batches per optimizer step; contrastive negatives span the whole accumulated batch."""
    compile: bool = False
    """Wrap the model with torch.compile (checkpoints stay prefix-free)."""
    seed: int = 0
    """Seed of model initialisation and of every random choice in the loop."""
    log_every: int = 10
    """Steps between metric records (JSONL, TensorBoard)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0: only at the end, on preemption and on max_time_s."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are removed once a newer one is complete)."""
    eval_every: int = 0
    """Steps between evaluations on eval.* data; 0: only at the end."""
    timeout_s: float = 1800.0
    """Process-group timeout: a collective waiting longer than this fails the run instead of hanging."""

    def __post_init__(self):
        require(self.steps > 0, "train.steps", f"must be positive, got {self.steps}")
        require(self.max_time_s >= 0, "train.max_time_s", f"must be >= 0 (0: no limit), got {self.max_time_s}")
        require(self.accum_steps >= 1, "train.accum_steps", "must be >= 1")
        require(0 <= self.seed <= MAX_SEED, "train.seed", f"must lie in [0, {MAX_SEED}], got {self.seed}")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.eval_every >= 0, "train.eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        require(self.timeout_s > 0, "train.timeout_s", "must be positive")
        require("://" not in self.run_dir or self.run_dir.startswith("file://"), "train.run_dir",
                f"{self.run_dir!r} is not a local directory: checkpoints go to object storage through "
                "train.remote_dir (e.g. train.run_dir=runs/r1 train.remote_dir=s3://bucket/runs/r1)")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        require(not unknown, "train.report_to", f"{unknown[0]!r} is not a tracker Accelerate has "
                f"({', '.join(TRACKERS)})" if unknown else "")
        require(not (self.compile and self.strategy == "fsdp"), "train.compile",
                "not supported with train.strategy=fsdp (use ddp to compile)")


@dataclass(frozen=True)
class EvalConfig:
    zeroshot_shards: str = ""
    """Labelled shards for zero-shot classification (samples need a `cls` field)."""
    classnames: tuple[str, ...] = ()
    """Class names, indexed by the shards' `cls` label."""
    templates: tuple[str, ...] = ("a photo of a {}.",)
    """Prompt templates; `{}` is replaced by a class name; class embeddings average over templates."""
    retrieval_shards: str = ""
    """Shards for image<->text retrieval (R@1/5/10); empty disables retrieval."""
    batch_size: int = 512
    """Samples per batch during evaluation."""
    max_samples: int = 0
    """Evaluate at most this many samples per task; 0: all."""

    def __post_init__(self):
        require(self.batch_size > 0, "eval.batch_size", f"must be positive, got {self.batch_size}")
        require(self.max_samples >= 0, "eval.max_samples", f"must be >= 0, got {self.max_samples}")
        require(bool(self.templates) or not self.zeroshot_shards, "eval.templates",
                "needs at least one template with eval.zeroshot_shards")
        for t in self.templates:
            check_template(t, "config key 'eval.templates'")
        require(not self.zeroshot_shards or bool(self.classnames), "eval.classnames",
                "needed with eval.zeroshot_shards (one name per `cls` label)")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The towers and their size."""
    data: DataConfig = field(default_factory=DataConfig)
    """The streaming loader."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Which losses train, with which weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: steps, precision, checkpoints, logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during and after training."""

    def __post_init__(self):
        check_locks(self.model, self.objective)


def check_locks(model: ModelConfig, objective: ObjectiveConfig) -> None:
    """An objective that trains a tower cannot run on that tower fully locked (FLIP only masks: it may)."""
    image_locked = model.lock_image and not model.lock_image_unlocked_groups
    text_locked = model.lock_text and not model.lock_text_unlocked_layers
    require(not (image_locked and objective.mae.weight), "objective.mae",
            "MAE trains the image tower, which model.lock_image locks (unlock groups with "
            "model.lock_image_unlocked_groups, or drop one)")
    require(not (image_locked and objective.caption.weight and objective.caption.train_image),
            "objective.caption.train_image", "the caption loss would train the image tower, which model.lock_image "
            "locks (set objective.caption.train_image = false to caption from the locked tower's tokens)")
    require(not (text_locked and objective.mlm.weight), "objective.mlm",
            "MLM trains the text tower, which model.lock_text locks (unlock layers with "
            "model.lock_text_unlocked_layers, or drop one)")
    require(not (model.text_hf and (objective.mlm.weight or objective.autoencoder.weight)), "model.text_hf",
            "objective.mlm and objective.autoencoder need open_clip's own text tower, not an HF one")
    require(not (image_locked and text_locked and not model.text_hf), "model.lock_text",
            "with model.lock_image too, every tower parameter is locked: nothing to train but the temperature")


# --------------------------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = Config) -> Any:
    """Reads a TOML preset (optional), applies `a.b=value` overrides, validates, returns a frozen config."""
    data: dict[str, Any] = {}
    if path is not None:
        from pipeline.presets import resolve
        path = resolve(path)  # a preset name (`tiny`) or a file
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        apply_override(data, item)
    return from_dict(cls, data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b=v`: v is parsed as a TOML value (numbers, booleans, lists, quoted strings), else taken as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part} is a value, not a section")
    node[leaf] = value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested dicts; unknown keys and bad values raise ValueError naming the key."""
    if hasattr(cls, "translate_legacy"):  # sections that renamed keys read the old ones too (ObjectiveConfig)
        data, renamed = cls.translate_legacy(data, prefix)
        try:
            return _from_dict(cls, data, prefix)
        except ValueError as e:
            old = [f" (given as {old}, the key's name before {new})" for new, old in renamed.items() if new in str(e)]
            raise ValueError(f"{e}{old[0] if old else ''}") from None
    return _from_dict(cls, data, prefix)


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ValueError(f"unknown config key {prefix + unknown[0]!r} in {where}; known keys: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config key {key!r} is a section; got {value!r}")
            values[name] = from_dict(hint, value, key + ".")
            continue
        value = _coerce(key, hint, value)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}")
        values[name] = value
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} expects a list, got {value!r}")
        (item_type, _) = typing.get_args(hint)
        return tuple(_coerce(key, item_type, v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects true or false, got {value!r}")
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, hint)):
        raise ValueError(f"config key {key!r} expects {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):  # TOML's nan/inf parse as floats; no field means them
        raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
    if hint is int and abs(value) > MAX_INT:
        raise ValueError(f"config key {key!r}: {value} does not fit in 64 bits")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"config key {key!r} expects a string, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts (tuples as lists), ready for TOML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes the resolved config as TOML; `--config` on that file reproduces the run's settings."""
    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One help line per key: `section.key = default  (choices)  doc`."""
    lines, docs = [], field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"[{prefix}{f.name}]  {docs.get(f.name, '')}")
            lines += describe(hints[f.name], prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f"  (one of {', '.join(map(str, choices))})" if choices else ""
        doc = " ".join(docs.get(f.name, "").split())
        lines.append(f"  {prefix}{f.name} = {default!r}{extra}\n      {doc}")
    return lines
