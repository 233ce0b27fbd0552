"""`plait export`: model-only artifacts of a training checkpoint, checked against the training weights before
they are kept.

Formats: `open_clip` (local-dir files + a single .pt with a registrable config), `hf` (transformers CLIPModel,
export_hf.py) and `safetensors` (raw towers, optionally the objectives' heads). What the formats share (staging,
publication, self-check helpers, model card) lives in artifact.py: every export is written to a staging dir,
reloaded through the consumer's own loader, compared on a fixed batch, and only then renamed into place, into a
new or empty directory or over an earlier export.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import open_clip
import torch
from safetensors.torch import load_file, save_file

from pipeline.artifacts.staging import (DTYPES, cast_state, check_destination, embeddings, fixed_batch, max_error,
                               reference_model, require_close, staged, with_logit_bias, write_model_card)
from pipeline.train.checkpoint import Checkpointer, clean_state_dict
from pipeline.train.remote_store import fetch, is_url
from pipeline.artifacts.hf import export_hf
from pipeline.artifacts.model_card import METADATA_FILE, card_metadata, eval_entries, training_metadata
from pipeline.data.transforms import preprocess_cfg
from pipeline.models.caption_head import build_decoder, caption_logits
from pipeline.models.towers import encode_image_tokens, encode_text_tokens

__all__ = ["DTYPES", "Source", "checkpoint_dir", "embeddings", "export", "export_hf", "export_open_clip",
           "export_safetensors", "fixed_batch", "load_checkpoint_model", "load_source", "max_error", "main",
           "with_logit_bias"]

OPEN_CLIP_ATOL = 1e-5
FORMATS = ("open_clip", "hf", "safetensors")


@dataclass
class Source:
    """What an export needs from a checkpoint: the open_clip weights, the heads, the config and the history."""
    clip: dict[str, torch.Tensor]
    model_cfg: dict
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    checkpoint: str = ""
    name: str = "plait-model"


def clip_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip part of a PlaitModel state dict (heads are left out)."""
    return {k[len("clip."):]: v for k, v in model_state.items() if k.startswith("clip.")}


def heads_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("heads."):]: v for k, v in model_state.items() if k.startswith("heads.")}


def _reload_both_ways(folder: Path, name: str) -> tuple:
    """The staged open_clip export in `folder` as open_clip loads it: `local-dir:` and `NAME.json` + `.pt`."""
    from_dir = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0]
    open_clip.add_model_config(folder / f"{name}.json")
    return from_dir, open_clip.create_model(name, pretrained=str(folder / "open_clip_model.pt"))


def export_open_clip(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path, dtype: str = "fp32",
                     atol: float = OPEN_CLIP_ATOL, name: str = "plait-model", meta: dict | None = None,
                     add_files: Callable[[Path], None] | None = None) -> Path:
    """Writes `open_clip_config.json` + `open_clip_model.safetensors` (for `local-dir:`), `NAME.json` +
    `open_clip_model.pt` (for `add_model_config` + `pretrained=`), and the model card; reloads both ways and
    fails unless their embeddings match the exported weights within `atol`."""
    out = out_dir if is_url(out_dir) else Path(out_dir)  # an object-storage URL stays a URL
    state = clean_state_dict(state)
    model_cfg = with_logit_bias(state, model_cfg)
    cast = cast_state(state, dtype)
    with staged(out) as tmp:
        save_file(cast, tmp / "open_clip_model.safetensors")
        torch.save(cast, tmp / "open_clip_model.pt")
        (tmp / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
        pre = preprocess_cfg(model_cfg)
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre},
                                                              indent=2))
        images, tokens = fixed_batch(model_cfg)
        expected = embeddings(reference_model(cast, model_cfg), images, tokens)
        from_dir, from_pt = _reload_both_ways(tmp, name)
        error = max(max_error(expected, embeddings(from_dir.float(), images, tokens)),
                    max_error(expected, embeddings(from_pt.float(), images, tokens)))
        require_close(error, atol, "open_clip embeddings")
        check = {"max_abs_error": error, "tolerance": atol, "compared": "image+text embeddings, local-dir and .pt"}
        write_model_card(tmp, "open_clip", name, dtype, model_cfg, meta, check, state, cast)
        if add_files is not None:
            add_files(tmp)
    return out


def coca_config(model_cfg: dict) -> dict:
    """The open_clip CoCa config of a model trained with objective.caption (its model config names the decoder in
    `multimodal_cfg`): both towers hand their tokens on, the text tower is CoCa's `text` module."""
    cfg = json.loads(json.dumps(model_cfg))
    cfg["custom_text"] = True
    cfg["vision_cfg"]["output_tokens"] = True
    cfg["text_cfg"]["output_tokens"] = True
    return cfg


def coca_state(clip: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """plait's CLIP towers and caption head -> open_clip CoCa keys: the text tower under `text.`, the decoder
    (model.heads.caption) under `text_decoder.`; the image tower and the temperature keep their names."""
    top = ("visual.", "logit_scale", "logit_bias")
    out = {k if k.startswith(top) else f"text.{k}": v for k, v in clip.items()}
    decoder = {f"text_decoder.{k[len('caption.'):]}": v for k, v in heads.items() if k.startswith("caption.")}
    if not decoder:
        raise ValueError("the model config names a text decoder (multimodal_cfg) but the checkpoint has no "
                         "heads.caption weights")
    return {**out, **decoder}


@torch.no_grad()
def coca_outputs(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(image and text embeddings, teacher-forced caption logits) of an open_clip CoCa on a fixed batch."""
    model.eval()
    return (*embeddings(model, images, tokens), model(images, tokens)["logits"])


def export_coca(state: dict[str, torch.Tensor], heads: dict[str, torch.Tensor], model_cfg: dict,
                out_dir: str | Path, dtype: str = "fp32", atol: float = OPEN_CLIP_ATOL, name: str = "plait-model",
                meta: dict | None = None, add_files: Callable[[Path], None] | None = None) -> Path:
    """export_open_clip for a model trained with objective.caption: the same files, holding an open_clip CoCa
    (towers + text decoder); reloaded both ways, embeddings and caption logits compared with the exported
    weights in plait's own training architecture."""
    out = out_dir if is_url(out_dir) else Path(out_dir)
    state, heads = clean_state_dict(state), clean_state_dict(heads)
    model_cfg = with_logit_bias(state, model_cfg)
    cfg = coca_config(model_cfg)
    cast_clip, cast_heads = cast_state(state, dtype), cast_state(heads, dtype)
    cast = coca_state(cast_clip, cast_heads)
    with staged(out) as tmp:
        save_file(cast, tmp / "open_clip_model.safetensors")
        torch.save(cast, tmp / "open_clip_model.pt")
        (tmp / f"{name}.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg":
                                                               preprocess_cfg(cfg)}, indent=2))
        images, tokens = fixed_batch(model_cfg)
        clip = reference_model(cast_clip, model_cfg)
        decoder = build_decoder(model_cfg, model_cfg["multimodal_cfg"])
        decoder.load_state_dict({k[len("caption."):]: v.float() for k, v in cast_heads.items()
                                 if k.startswith("caption.")})
        with torch.no_grad():
            image_tokens = encode_image_tokens(clip.visual, images)[1][:, 1:]
            logits = caption_logits(decoder.eval(), image_tokens, encode_text_tokens(clip, tokens)[1])
        expected = (*embeddings(clip, images, tokens), logits)
        from_dir, from_pt = _reload_both_ways(tmp, name)
        error = max(max_error(expected, coca_outputs(from_dir.float(), images, tokens)),
                    max_error(expected, coca_outputs(from_pt.float(), images, tokens)))
        require_close(error, atol, "open_clip CoCa embeddings and caption logits")
        check = {"max_abs_error": error, "tolerance": atol,
                 "compared": "image+text embeddings and caption logits, local-dir and .pt (open_clip CoCa)"}
        write_model_card(tmp, "open_clip", name, dtype, model_cfg, meta, check, state, cast_clip)
        if add_files is not None:
            add_files(tmp)
    return out


def export_safetensors(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path, dtype: str = "fp32",
                       heads: dict[str, torch.Tensor] | None = None, name: str = "plait-model",
                       meta: dict | None = None, add_files: Callable[[Path], None] | None = None) -> Path:
    """Raw tensors for users' own code: `towers.safetensors` (open_clip key names), optionally
    `heads.safetensors`, plus `model_config.json`; reloaded and compared bit for bit."""
    out = out_dir if is_url(out_dir) else Path(out_dir)  # an object-storage URL stays a URL
    state = clean_state_dict(state)
    model_cfg = with_logit_bias(state, model_cfg)
    files = {"towers.safetensors": cast_state(state, dtype)}
    if heads:
        files["heads.safetensors"] = cast_state(clean_state_dict(heads), dtype)
    with staged(out) as tmp:
        for file, tensors in files.items():
            save_file(tensors, tmp / file)
            reloaded = load_file(tmp / file)
            if reloaded.keys() != tensors.keys() or any(not torch.equal(reloaded[k], tensors[k]) for k in tensors):
                raise RuntimeError(f"export self-check failed: {file} does not read back identically")
        (tmp / "model_config.json").write_text(json.dumps(model_cfg, indent=2))
        check = {"max_abs_error": 0.0, "tolerance": 0.0, "compared": "tensors read back bit for bit"}
        write_model_card(tmp, "safetensors", name, dtype, model_cfg, meta, check, state, files["towers.safetensors"])
        if add_files is not None:
            add_files(tmp)
    return out


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir, or the newest complete checkpoint of a run dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / "model.safetensors").exists():
        return path
    latest = Checkpointer(path, keep_last=1).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found in {path} (expected model.safetensors or checkpoints/step-*)")
    return latest


def load_source(path: str | Path) -> Source:
    """The exportable parts of a checkpoint or run dir (local, or a run's train.remote_dir and its checkpoints
    on object storage): the trained weights, heads, config and history."""
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="plait-fetch-") as tmp:
            src = load_source(fetch(str(path), Path(tmp)))
        return dataclasses.replace(src, checkpoint=str(path))
    ckpt = checkpoint_dir(path)
    if not (ckpt / "trainer.pt").exists():
        raise FileNotFoundError(f"{ckpt}: trainer.pt missing (not a complete plait checkpoint)")
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    model = load_file(ckpt / "model.safetensors")
    clip = clip_state(model) or (model if "logit_scale" in model else {})
    if not clip:
        raise ValueError(f"{ckpt}: no open_clip weights (keys starting with 'clip.') in the checkpoint")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    training = training_metadata(trainer, run_dir)
    model_name = training.get("config", {}).get("model", {}).get("name", "model")
    return Source(clip=clip, model_cfg=json.loads(trainer["model_cfg"]), heads=heads_state(model),
                  training=training, checkpoint=str(ckpt), name=f"plait-{model_name}".replace("/", "-"))


def load_checkpoint_model(path: str | Path) -> tuple[dict, dict]:
    """(clip state dict, open_clip model config) of a checkpoint or run dir."""
    src = load_source(path)
    return src.clip, src.model_cfg


def export(src: Source, fmt: str, out: str | Path, dtype: str = "fp32", with_heads: bool = False,
           eval_results: dict | None = None, extra_meta: dict | None = None,
           add_files: Callable[[Path], None] | None = None, evals: list[dict] | None = None) -> Path:
    """Writes `src` in `fmt` (open_clip, hf, safetensors) with its model card; returns the output dir.
    `eval_results` (a `plait eval` result) and `evals` (card entries with their steps) join the evaluations the
    run recorded. `add_files(staging_dir)` may add files of its own; they are published with the export."""
    if evals is None:
        evals = eval_entries(eval_results or {}, None, "plait eval (--eval-json)")
    meta = card_metadata(src.training, src.checkpoint, evals, eval_results, extra_meta)
    if fmt == "open_clip" and "multimodal_cfg" in src.model_cfg:
        return export_coca(src.clip, src.heads, src.model_cfg, out, dtype, name=src.name, meta=meta,
                           add_files=add_files)
    if fmt == "open_clip":
        return export_open_clip(src.clip, src.model_cfg, out, dtype, name=src.name, meta=meta, add_files=add_files)
    if fmt == "hf":
        return export_hf(src.clip, src.model_cfg, out, dtype, name=src.name, meta=meta, add_files=add_files)
    if fmt == "safetensors":
        if with_heads and not src.heads:
            raise ValueError(f"--heads: {src.checkpoint} has no objective heads (only the towers were trained)")
        return export_safetensors(src.clip, src.model_cfg, out, dtype, heads=src.heads if with_heads else None,
                                  name=src.name, meta=meta, add_files=add_files)
    raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait export", description=(
        "Export a training checkpoint (or a run dir's newest one) as a model-only artifact that loads without "
        "plait, after checking that the exported model reproduces the training model on a fixed batch."))
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (newest checkpoint)")
    parser.add_argument("--format", choices=FORMATS, default="open_clip", help=(
        "open_clip: open_clip_config.json + open_clip_model.safetensors (local-dir:) and a single .pt; "
        "hf: transformers CLIPModel folder; safetensors: raw towers (default: %(default)s)"))
    parser.add_argument("--out", required=True, help=(
        "output directory: new, empty, or an earlier plait export (replaced atomically); any other existing "
        "directory is refused"))
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype (default: %(default)s)")
    parser.add_argument("--heads", action="store_true",
                        help="safetensors format: also write the objectives' heads (MAE/MLM decoders, fusion)")
    parser.add_argument("--eval-json", help="a `plait eval` result to record in the model card")
    return parser


def source_training(path: str | Path) -> dict:
    """The training history of a model to fine-tune: an export's card metadata, or what a checkpoint or run dir
    records (as `plait export` reads it); {} for a bare weights file."""
    if is_url(path):
        try:
            return load_source(path).training
        except (OSError, ValueError, KeyError):
            return {}  # an export folder there: its card stays behind (fine-tuning records `from` either way)
    path = Path(path)
    card = path / METADATA_FILE
    if card.is_file():
        try:
            return json.loads(card.read_text()).get("training", {})
        except (OSError, ValueError, AttributeError):
            return {}
    try:
        return load_source(path).training
    except (OSError, ValueError, KeyError):
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.heads and args.format != "safetensors":
        parser.error("--heads only applies to --format safetensors")
    eval_results = None
    if args.eval_json:
        path = Path(args.eval_json)
        if not path.is_file():
            raise FileNotFoundError(f"--eval-json: {path} not found")
        eval_results = json.loads(path.read_text())
    check_destination(args.out)  # before the minutes of loading and checking
    src = load_source(args.checkpoint)
    out = export(src, args.format, args.out, args.dtype, args.heads, eval_results)
    print(f"exported {src.checkpoint} -> {out} ({args.format}, {args.dtype}); see {out}/README.md")
    return 0
