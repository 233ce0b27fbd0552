"""The model card every export carries: `README.md` for people, `plait_metadata.json` for programs.

Metadata: the open_clip model config, preprocess and tokenizer settings, the training config, the enabled
objectives, steps and samples seen, the training datasets' manifest hashes and how `plait prep` made their images
(size, resize, the background transparent pixels were composited onto), the evaluations and the export's
self-check. Everything is read tolerantly: a missing piece is left out, never invented.

Every export path (`plait export`, `plait demo`, `plait finetune`) builds the card's history with
`card_metadata` from what the run dir holds: the checkpoint's `trainer.pt` (steps, samples seen, the resolved
config), the datasets' files, and the evaluations the run recorded in `metrics.jsonl` and `report.json`, each with
the step of the weights it measured (`recorded_evals`; later steps than the exported checkpoint's are left out and
counted). A run that recorded none says so.

The card says what reproducing the training view takes: the preprocessing at shard time, at training time and
for inference, the background for transparent images, the constructor and config that build the model from the
weights, and the formula of a fine-tuned classifier head. Its loading code names files relative to the export
folder (`EXPORT = "."`), never the path the export was written to.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import webdataset as wds

from data_prep.shards.layout import CONTENT_FILES as MANIFEST_FILES
from pipeline.objectives.registry import objective_cards, objective_weights

METADATA_FILE = "plait_metadata.json"


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


# The `plait prep` image settings (data_prep/options.py ImageOptions, recorded in `_plan.json`) that shape what
# the model saw; the input's path or URL is not copied (it may hold credentials).
PREP_IMAGE_KEYS = ("image_size", "resize_mode", "resample", "upscale", "background", "encode_format",
                   "encode_quality", "keep_original_jpeg")


def dataset_prep(train_shards: str) -> list[dict]:
    """For each local folder of a shard spec: the image settings its `_plan.json` records, or `made_by` other
    when the shards were not made by `plait prep` (their preprocessing is then unknown)."""
    out = []
    for part in filter(None, train_shards.split("::")):
        spec = part.rsplit("@", 1)[0] if "@" in part.rsplit("/", 1)[-1] else part
        urls = wds.shardlists.expand_urls(spec) if spec else []
        for folder in sorted({str(Path(u).parent) for u in urls if "://" not in u}):
            plan = Path(folder) / "_plan.json"
            entry: dict = {"folder": folder}
            try:
                image = json.loads(plan.read_text()).get("image", {})
                entry.update(made_by="plait prep", **{k: image[k] for k in PREP_IMAGE_KEYS if k in image})
            except (OSError, ValueError, AttributeError):
                entry["made_by"] = "other (no _plan.json)"
            out.append(entry)
    return out


# Evaluations a run recorded: `kind: eval` records of metrics.jsonl (train_eval.log_fields names them
# `eval/zeroshot/top1`, `eval/retrieval/image_to_text_R@1`, ...) and report.json (train's `zeroshot`/`retrieval`
# results and `evals` list, the demo's `zero_shot_top1`, `plait eval`'s `linear_probe`), whatever their key names.
EVAL_WORDS = ("eval", "zeroshot", "zero_shot", "retrieval", "probe", "top1", "top5", "recall", "r@", "accuracy")
# tables inside an eval result that are not one metric each (per-class accuracies, the probe's C sweep)
EVAL_SKIP = ("per_class", "probe_sweep")


def _is_eval_name(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in EVAL_WORDS)


def _metric_key(name: str) -> str:
    """The same metric under the names train, report.json and the demo give it: `eval/zeroshot/top1`,
    `zeroshot/top1` and `zero_shot_top1` are one key."""
    low = name.lower()
    for prefix in ("eval/", "eval.", "eval_"):
        low = low.removeprefix(prefix)
    return "".join(ch for ch in low if ch.isalnum() or ch == "@")


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(results: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in results.items():
        if isinstance(value, dict):
            if str(key) not in EVAL_SKIP and not str(key).endswith("_per_class"):
                out += _flatten(value, f"{prefix}{key}/")
        elif _numeric(value) and str(key) != "C":
            out.append((f"{prefix}{key}", value))
    return out


def eval_entries(results: dict, step, source: str, prefix: str = "") -> list[dict]:
    """`results` (nested dicts of numbers, e.g. a `plait eval` or fine-tune result) as card entries: metric,
    value, the step (or stage) the evaluated weights belong to, and where the figure was recorded."""
    return [{"metric": name, "value": value, "step": step, "source": source}
            for name, value in _flatten(results, prefix)]


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a preemption
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def recorded_evals(run_dir: Path | None, up_to_step: int | None = None) -> tuple[list[dict], int]:
    """The run's recorded evaluations as card entries (metric, value, step, source), sorted by step, each metric
    once per step; and how many were left out for being later than `up_to_step` (not of the exported weights)."""
    if run_dir is None:
        return [], 0
    found: dict[tuple[str, object], dict] = {}
    # metrics.jsonl first: a resumed segment repeats steps after its checkpoint, so a later record wins
    for record in _read_jsonl(run_dir / "metrics.jsonl"):
        if record.get("kind") != "eval" or not _numeric(record.get("step")):
            continue
        for name, value in record.items():
            if name not in ("kind", "step") and _numeric(value) and _is_eval_name(name):
                found[(_metric_key(name), record["step"])] = {"metric": name, "value": value, "step": record["step"],
                                                              "source": "metrics.jsonl"}
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        report = {}
    if not isinstance(report, dict):
        report = {}
    entries = []
    for record in report.get("evals", []) if isinstance(report.get("evals"), list) else []:
        if isinstance(record, dict) and _numeric(record.get("step")):
            entries += [(name, value, record["step"]) for name, value in _flatten(record)
                        if name not in ("kind", "step") and _is_eval_name(name)]
    final_step = report.get("steps") if _numeric(report.get("steps")) else None
    # the other results (train's `zeroshot`, the demo's `zero_shot_top1`) belong to the step the run ended at
    entries += [(name, value, final_step) for name, value in _flatten({k: v for k, v in report.items()
                                                                       if k != "evals"}) if _is_eval_name(name)]
    for name, value, step in entries:
        found.setdefault((_metric_key(name), step), {"metric": name, "value": value, "step": step,
                                                     "source": "report.json"})
    evals = list(found.values())
    later = [e for e in evals if up_to_step is not None and e["step"] is not None and e["step"] > up_to_step]
    evals = [e for e in evals if e not in later]
    evals.sort(key=lambda e: (e["step"] is None, e["step"] if e["step"] is not None else 0))
    return evals, len(later)


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
    # stored configs hold the unit sections ([objective.mae] weight = ...) or, before units, flat keys (mae = ...)
    meta["objectives"] = objective_weights(objective)
    meta["objective_descriptions"] = objective_cards(objective)
    # The training helper may record the manifests it read; otherwise hash what is on disk now.
    if trainer.get("datasets"):
        datasets = trainer["datasets"]
        meta["datasets"] = json.loads(datasets) if isinstance(datasets, str) else datasets
    elif config.get("data", {}).get("train_shards"):
        try:
            meta["datasets"] = dataset_manifests(config["data"]["train_shards"])
        except (ValueError, OSError):
            meta["datasets"] = [{"shards": config["data"]["train_shards"], "manifests": {}}]
    if config.get("data", {}).get("train_shards"):
        try:
            meta["data_prep"] = dataset_prep(config["data"]["train_shards"])
        except (ValueError, OSError):
            pass
    step = meta["step"] if _numeric(meta["step"]) else None
    meta["evals"], meta["evals_left_out"] = recorded_evals(run_dir, step)
    return meta


def card_metadata(training: dict, checkpoint: str = "", evals: list[dict] = (), eval_results: dict | None = None,
                  extra: dict | None = None) -> dict:
    """The card's history for every export path (`plait export`, the demo, `plait finetune`): the training
    metadata (steps, samples seen, objectives, dataset fingerprints, the evaluations the run recorded, each with
    its step) plus evaluations of the exported weights made outside the run (`evals` entries, `eval_results`)."""
    return {"source_checkpoint": checkpoint, "training": training,
            "evals": [*training.get("evals", []), *evals],
            "eval": dict(eval_results or {}), **(extra or {})}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def evaluation_lines(meta: dict) -> list[str]:
    """Every evaluation the card's metadata holds, with the step of the weights it measured."""
    evals = meta.get("evals")
    if evals is None:  # metadata of an earlier card: nested results without steps
        evals = eval_entries(meta.get("eval", {}), None, "given")
    training = meta.get("training", {})
    lines = (["| metric | value | step | recorded in |", "|---|---|---|---|"]
             + [f"| {e.get('metric')} | {_fmt(e.get('value'))} | {_fmt(e.get('step'))} | {e.get('source')} |"
                for e in evals]) if evals else ["No evaluation results were recorded."]
    if training.get("evals_left_out"):
        lines += ["", f"{training['evals_left_out']} evaluation figure(s) of the run after step "
                      f"{_fmt(training.get('step'))} are left out: they measured later weights than these."]
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
    lines += [f"| objective | {line} |" for line in training.get("objective_descriptions", [])]
    if meta.get("finetune"):
        ft = meta["finetune"]
        lines.append(f"| fine-tuned | {ft.get('mode')} on {ft.get('train_shards')}, {ft.get('epochs')} epoch(s) |")
    for ds in training.get("datasets", []):
        hashes = "; ".join(f"{Path(p).name} sha256 {h[:16]}…" for p, h in ds.get("manifests", {}).items())
        lines.append(f"| dataset | `{ds.get('shards')}` {hashes} |")
    lines += ["", "## Evaluation", "", *evaluation_lines(meta)]
    lines += ["", "## Preprocessing and tokenizer", "", *preprocessing_lines(meta),
              f"- text: {meta['tokenizer']['type']}, context length {meta['tokenizer']['context_length']}, "
              "lower-cased, padded with id 0", "",
              "## Loading", "", "Paths are relative to this folder (`EXPORT`); run from here or set it to the "
              "folder's path.", "", "```python", *meta["usage"], "```", ""]
    if meta.get("finetune"):
        lines += classifier_lines(meta["finetune"])
    lines += [f"Self-check at export: {meta['self_check']['compared']} reproduced within "
              f"{meta['self_check']['max_abs_error']:.1e} (tolerance {meta['self_check']['tolerance']:.0e})"
              + (f"; the {meta['dtype']} cast itself moves embeddings by up to {meta['self_check']['dtype_error']:.1e}"
                 if "dtype_error" in meta["self_check"] else "") + ".", "",
              f"Machine-readable metadata: `{METADATA_FILE}`.", ""]
    return "\n".join(lines)


def preprocessing_lines(meta: dict) -> list[str]:
    """What the model saw, stage by stage, and what an inference image must go through to look the same."""
    pre, size = meta["preprocess_cfg"], meta["preprocess_cfg"]["size"]
    norm = f"ToTensor (0..1), Normalize(mean={pre['mean']}, std={pre['std']})"
    lines = []
    backgrounds = set()
    for ds in meta.get("training", {}).get("data_prep", []):
        if ds.get("made_by") == "plait prep":
            bg = tuple(ds.get("background", (255, 255, 255)))
            backgrounds.add(bg)
            lines.append(f"- shards `{Path(ds['folder']).name}/` (plait prep): resize {ds.get('resize_mode')} to "
                         f"{ds.get('image_size')} px ({ds.get('resample')}, upscale {ds.get('upscale')}), stored as "
                         f"{ds.get('encode_format')} (quality {ds.get('encode_quality')}, original JPEGs kept "
                         f"{ds.get('keep_original_jpeg')}); transparent pixels composited onto RGB {bg}")
        else:
            lines.append(f"- shards `{Path(ds['folder']).name}/`: not made by plait prep; their preprocessing is "
                         "not recorded, and an alpha channel was dropped at load time (PIL `convert('RGB')`)")
    lines += [f"- training: decode to RGB (JPEGs larger than needed at 1/2-1/8 scale, never below {size} px), "
              f"RandomResizedCrop({size}, scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic), {norm} (open_clip's train "
              "transform)",
              f"- inference (`preprocess`): RGB, Resize shortest side to {size} ({pre['interpolation']}), "
              f"CenterCrop({size}), {norm}"]
    if len(backgrounds) == 1:
        (bg,) = backgrounds
        lines.append(f"- transparent images: composite onto RGB {bg} first, as in training: "
                     f"`Image.alpha_composite(Image.new('RGBA', im.size, {(*bg, 255)}), im.convert('RGBA'))"
                     ".convert('RGB')` (`preprocess` alone drops the alpha channel)")
    elif backgrounds:
        lines.append(f"- transparent images: the training sets used different backgrounds {sorted(backgrounds)}")
    return lines


def usage_lines(meta: dict, files: set[str] = frozenset()) -> list[str]:
    """Loading code for the card, every path relative to the export folder `EXPORT` (holding `files`)."""
    fmt, name, model_cfg = meta["format"], meta["name"], meta["model_cfg"]
    lines = ['EXPORT = "."  # this folder']
    if fmt == "open_clip":
        lines += ["import open_clip",
                  "model, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{EXPORT}')",
                  "tokenizer = open_clip.get_tokenizer(f'local-dir:{EXPORT}')",
                  "# or: the single .pt with a registered config",
                  f"# open_clip.add_model_config(f'{{EXPORT}}/{name}.json')",
                  f"# model = open_clip.create_model('{name}', pretrained=f'{{EXPORT}}/open_clip_model.pt')"]
    elif fmt == "safetensors":
        cls = "CustomTextCLIP" if "hf_model_name" in model_cfg.get("text_cfg", {}) else "CLIP"
        lines += ["import json", "import open_clip", "from safetensors.torch import load_file",
                  "cfg = json.load(open(f'{EXPORT}/model_config.json'))  # embed_dim, vision_cfg, text_cfg, ...",
                  "cfg.pop('custom_text', None)",
                  f"model = open_clip.{cls}(**cfg).eval()  # the class plait trains; weights next line",
                  "model.load_state_dict(load_file(f'{EXPORT}/towers.safetensors'))  # open_clip key names",
                  "v = cfg['vision_cfg']",
                  "preprocess = open_clip.image_transform(v['image_size'], is_train=False, "
                  "mean=v.get('image_mean', open_clip.OPENAI_DATASET_MEAN), "
                  "std=v.get('image_std', open_clip.OPENAI_DATASET_STD))",
                  "tokenizer = open_clip.tokenizer.HFTokenizer(cfg['text_cfg']['hf_tokenizer_name'], "
                  "context_length=cfg['text_cfg']['context_length'])" if "hf_tokenizer_name" in
                  model_cfg.get("text_cfg", {}) else
                  "tokenizer = open_clip.SimpleTokenizer(context_length=cfg['text_cfg'].get('context_length', 77))"]
        if "heads.safetensors" in files:
            lines.append("heads = load_file(f'{EXPORT}/heads.safetensors')")
    else:
        lines += ["from transformers import CLIPModel, CLIPProcessor",
                  "model = CLIPModel.from_pretrained(EXPORT)",
                  "processor = CLIPProcessor.from_pretrained(EXPORT)"]
    return lines


def classifier_lines(finetune: dict) -> list[str]:
    """The fine-tuned head: what `classifier.safetensors` holds and the formula of its logits."""
    return ["## Classifier head", "",
            f"Fine-tuned ({finetune.get('mode')}) as an image classifier. `{finetune.get('classifier')}` holds "
            "`weight` [C, D], `bias` [C] and `scale` []; class i is line i of "
            f"`{finetune.get('classnames')}`:", "",
            "    logits = scale * (normalize(encode_image(preprocess(image))) @ weight.T + bias)    # [B, C]", "",
            "with `normalize` the L2 normalisation over D (the image embedding dimension).", "",
            "```python", "from PIL import Image", "from safetensors.torch import load_file",
            f"head = load_file(f'{{EXPORT}}/{finetune.get('classifier')}')",
            f"classnames = open(f'{{EXPORT}}/{finetune.get('classnames')}').read().splitlines()",
            "images = preprocess(Image.open('photo.jpg').convert('RGB')).unsqueeze(0)  # [1, 3, H, W]",
            "emb = model.encode_image(images, normalize=True)  # [1, D]",
            "logits = head['scale'] * (emb @ head['weight'].T + head['bias'])  # [1, C]",
            "print(classnames[int(logits.argmax())])", "```", ""]


def write_card(out_dir: Path, meta: dict) -> None:
    # relative to the export, whatever path the exporter was given
    meta = {**meta, "usage": usage_lines(meta, {p.name for p in out_dir.iterdir()})}
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    (out_dir / "README.md").write_text(render_readme(meta))
