"""The model card every export carries: `README.md` for people, `plait_metadata.json` for programs.

Metadata: the open_clip model config, preprocess and tokenizer settings, the training config, the enabled
objectives, steps and samples seen, the training datasets' manifest hashes, eval results and the export's
self-check. Everything is read tolerantly: a missing piece is left out, never invented.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import webdataset as wds

from data_prep.layout import CONTENT_FILES as MANIFEST_FILES

METADATA_FILE = "plait_metadata.json"
OBJECTIVE_WEIGHTS = ("contrastive", "siglip", "mae", "mlm", "autoencoder", "adversarial")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_manifests(train_shards: str) -> list[dict]:
    """For each `::`-joined part of a shard spec: the spec and the sha256 of its folder's manifest files."""
    out = []
    for part in filter(None, train_shards.split("::")):
        spec = part.rsplit("@", 1)[0] if "@" in part.rsplit("/", 1)[-1] else part
        entry: dict = {"shards": spec, "manifests": {}}
        urls = wds.shardlists.expand_urls(spec) if spec else []
        folders = sorted({str(Path(u).parent) for u in urls if "://" not in u})
        for folder in folders:
            for name in MANIFEST_FILES:
                path = Path(folder) / name
                if path.is_file():
                    entry["manifests"][str(path)] = sha256_file(path)
        out.append(entry)
    return out


def training_metadata(trainer: dict, run_dir: Path | None) -> dict:
    """What a checkpoint's `trainer.pt` (and its run dir's report.json) say about how the model was trained."""
    meta: dict = {"step": trainer.get("step"), "samples_seen": trainer.get("samples_seen")}
    config = {}
    if isinstance(trainer.get("config"), str):
        try:
            config = tomllib.loads(trainer["config"])
        except tomllib.TOMLDecodeError:
            config = {}
    meta["config"] = config
    objective = config.get("objective", {})
    meta["objectives"] = {k: objective[k] for k in OBJECTIVE_WEIGHTS if objective.get(k)}
    # The training helper may record the manifests it read; otherwise hash what is on disk now.
    if trainer.get("datasets"):
        datasets = trainer["datasets"]
        meta["datasets"] = json.loads(datasets) if isinstance(datasets, str) else datasets
    elif config.get("data", {}).get("train_shards"):
        try:
            meta["datasets"] = dataset_manifests(config["data"]["train_shards"])
        except (ValueError, OSError):
            meta["datasets"] = [{"shards": config["data"]["train_shards"], "manifests": {}}]
    report = run_dir / "report.json" if run_dir else None
    if report is not None and report.is_file():
        try:
            result = json.loads(report.read_text())
            meta["eval"] = {k: v for k, v in result.items() if k in ("zeroshot", "retrieval", "linear_probe", "eval")}
        except json.JSONDecodeError:
            pass
    return meta


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _eval_lines(results: dict, prefix: str = "") -> list[str]:
    lines = []
    for key, value in results.items():
        if key in ("per_class", "probe_sweep"):
            continue
        if isinstance(value, dict):
            lines += _eval_lines(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)):
            lines.append(f"| {prefix}{key} | {_fmt(value)} |")
    return lines


def render_readme(meta: dict) -> str:
    """A human-readable card built only from `meta`."""
    fmt, training = meta["format"], meta.get("training", {})
    model_cfg = meta["model_cfg"]
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    lines = [f"# {meta['name']}", "",
             f"Image-text model trained with plait, exported as **{fmt}** ({meta['dtype']} weights).", "",
             "## Architecture", "",
             f"- image tower: ViT, {vision.get('layers')} layers, width {vision.get('width')}, patch "
             f"{vision.get('patch_size')}, input {vision.get('image_size')} px",
             f"- text tower: {text.get('layers')} layers, width {text.get('width')}, context "
             f"{text.get('context_length')} tokens, CLIP BPE vocabulary {text.get('vocab_size')}",
             f"- embedding dim {model_cfg.get('embed_dim')}; activation "
             f"{'quick_gelu' if model_cfg.get('quick_gelu') else 'gelu'}"
             + (f"; sigmoid loss bias init {model_cfg['init_logit_bias']}" if "init_logit_bias" in model_cfg else ""),
             "", "## Training", "",
             "| | |", "|---|---|",
             f"| steps | {_fmt(training.get('step'))} |",
             f"| samples seen | {_fmt(training.get('samples_seen'))} |",
             f"| objectives | {', '.join(f'{k}={v}' for k, v in training.get('objectives', {}).items()) or 'n/a'} |"]
    if meta.get("finetune"):
        ft = meta["finetune"]
        lines.append(f"| fine-tuned | {ft.get('mode')} on {ft.get('train_shards')}, {ft.get('epochs')} epoch(s) |")
    for ds in training.get("datasets", []):
        hashes = "; ".join(f"{Path(p).name} sha256 {h[:16]}…" for p, h in ds.get("manifests", {}).items())
        lines.append(f"| dataset | `{ds.get('shards')}` {hashes} |")
    lines += ["", "## Evaluation", ""]
    evals = _eval_lines(meta.get("eval", {}))
    lines += (["| metric | value |", "|---|---|"] + evals) if evals else ["No evaluation results were recorded."]
    pre = meta["preprocess_cfg"]
    lines += ["", "## Preprocessing and tokenizer", "",
              f"- images: RGB, resize shortest side to {pre['size']} ({pre['interpolation']}), centre crop, "
              f"mean {pre['mean']}, std {pre['std']}",
              f"- text: {meta['tokenizer']['type']}, context length {meta['tokenizer']['context_length']}, "
              "lower-cased, padded with id 0", "",
              "## Loading", "", "```python", *meta["usage"], "```", "",
              f"Self-check at export: {meta['self_check']['compared']} reproduced within "
              f"{meta['self_check']['max_abs_error']:.1e} (tolerance {meta['self_check']['tolerance']:.0e})"
              + (f"; the {meta['dtype']} cast itself moves embeddings by up to {meta['self_check']['dtype_error']:.1e}"
                 if "dtype_error" in meta["self_check"] else "") + ".", "",
              f"Machine-readable metadata: `{METADATA_FILE}`.", ""]
    return "\n".join(lines)


def write_card(out_dir: Path, meta: dict) -> None:
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    (out_dir / "README.md").write_text(render_readme(meta))
