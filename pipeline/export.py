"""`plait export`: model-only artifacts of a training checkpoint, checked against the training weights before
they are kept.

Formats: `open_clip` (local-dir files + a single .pt with a registrable config), `hf` (transformers CLIPModel,
see export_hf.py) and `safetensors` (raw towers, optionally the objectives' heads). Every export is written to a
temp dir, reloaded through the consumer's own loader, compared on a fixed batch, and only then renamed into place.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import Checkpointer, clean_state_dict
from pipeline.model_card import training_metadata, write_card
from pipeline.models.towers import build_clip, tokenizer_for
from pipeline.transforms import preprocess_cfg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPEN_CLIP_ATOL = 1e-5
# Where a checkpoint may keep EMA weights (read tolerantly: the training loop decides whether it keeps them).
EMA_FILE = "ema.safetensors"
EMA_PREFIXES = ("ema.", "ema_model.")


@dataclass
class Source:
    """What an export needs from a checkpoint: the open_clip weights, the heads, the config and the history."""
    clip: dict[str, torch.Tensor]
    model_cfg: dict
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    weights: str = "online"
    checkpoint: str = ""
    name: str = "plait-model"


def clip_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip part of a PlaitModel state dict (heads are left out)."""
    return {k[len("clip."):]: v for k, v in model_state.items() if k.startswith("clip.")}


def heads_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("heads."):]: v for k, v in model_state.items() if k.startswith("heads.")}


def with_logit_bias(state: dict[str, torch.Tensor], model_cfg: dict) -> dict:
    """open_clip only builds a `logit_bias` parameter when the config has `init_logit_bias` (sigmoid-loss
    models); carry it so that strict loading works."""
    model_cfg = json.loads(json.dumps(model_cfg))
    if "logit_bias" in state:
        model_cfg["init_logit_bias"] = float(state["logit_bias"].float().reshape(-1)[0])
    return model_cfg


def fixed_batch(model_cfg: dict, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (images [n, 3, H, W], tokens [n, L]) batch for self-checks."""
    g = torch.Generator().manual_seed(seed)
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = tokenizer_for(model_cfg)(["a photo of a cat", "a drawing of a dog", "a sneaker", "an ankle boot"][:n])
    return images, tokens


@torch.no_grad()
def embeddings(clip, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    clip.eval()
    return clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True)


def cast_state(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def reference_model(cast: dict[str, torch.Tensor], model_cfg: dict) -> torch.nn.Module:
    """The training architecture holding exactly the exported (cast) values, in fp32: what every reloaded
    export must reproduce. The cast's own rounding is reported separately as `dtype_error`."""
    model = build_clip(model_cfg).float()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in cast.items()}, strict=True)
    return model.eval()


def max_error(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _staging(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_open_clip(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path, dtype: str = "fp32",
                     atol: float = OPEN_CLIP_ATOL, name: str = "plait-model", meta: dict | None = None) -> Path:
    """Writes `open_clip_config.json` + `open_clip_model.safetensors` (for `local-dir:`), `NAME.json` +
    `open_clip_model.pt` (for `add_model_config` + `pretrained=`), and the model card; reloads both ways and
    fails unless their embeddings match the exported weights within `atol`."""
    out = Path(out_dir)
    tmp = _staging(out)
    state = clean_state_dict(state)
    model_cfg = with_logit_bias(state, model_cfg)
    cast = cast_state(state, dtype)
    save_file(cast, tmp / "open_clip_model.safetensors")
    torch.save(cast, tmp / "open_clip_model.pt")
    (tmp / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
    pre = preprocess_cfg(model_cfg)
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=2))

    images, tokens = fixed_batch(model_cfg)
    expected = embeddings(reference_model(cast, model_cfg), images, tokens)
    from_dir = open_clip.create_model_and_transforms(f"local-dir:{tmp}")[0]
    open_clip.add_model_config(tmp / f"{name}.json")
    from_pt = open_clip.create_model(name, pretrained=str(tmp / "open_clip_model.pt"))
    error = max(max_error(expected, embeddings(from_dir.float(), images, tokens)),
                max_error(expected, embeddings(from_pt.float(), images, tokens)))
    if error > atol:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"export self-check failed: open_clip embeddings differ by {error:.2e} (> {atol:.0e})")
    usage = ["import open_clip",
             f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{out}')",
             f"tokenizer = open_clip.get_tokenizer('local-dir:{out}')",
             "# or: the single .pt with a registered config",
             f"open_clip.add_model_config('{out}/{name}.json')",
             f"model = open_clip.create_model('{name}', pretrained='{out}/open_clip_model.pt')"]
    check = {"max_abs_error": error, "tolerance": atol, "compared": "image+text embeddings, local-dir and .pt"}
    _card(tmp, "open_clip", name, dtype, model_cfg, meta, usage, check, state, cast)
    return _publish(tmp, out)


def export_safetensors(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path, dtype: str = "fp32",
                       heads: dict[str, torch.Tensor] | None = None, name: str = "plait-model",
                       meta: dict | None = None) -> Path:
    """Raw tensors for users' own code: `towers.safetensors` (open_clip key names), optionally
    `heads.safetensors`, plus `model_config.json`; reloaded and compared bit for bit."""
    out = Path(out_dir)
    tmp = _staging(out)
    state = clean_state_dict(state)
    model_cfg = with_logit_bias(state, model_cfg)
    files = {"towers.safetensors": cast_state(state, dtype)}
    if heads:
        files["heads.safetensors"] = cast_state(clean_state_dict(heads), dtype)
    for file, tensors in files.items():
        save_file(tensors, tmp / file)
        reloaded = load_file(tmp / file)
        if reloaded.keys() != tensors.keys() or any(not torch.equal(reloaded[k], tensors[k]) for k in tensors):
            raise RuntimeError(f"export self-check failed: {file} does not read back identically")
    (tmp / "model_config.json").write_text(json.dumps(model_cfg, indent=2))
    usage = ["from safetensors.torch import load_file",
             f"towers = load_file('{out}/towers.safetensors')  # open_clip key names: visual.*, transformer.*, ...",
             *([f"heads = load_file('{out}/heads.safetensors')"] if heads else [])]
    check = {"max_abs_error": 0.0, "tolerance": 0.0, "compared": "tensors read back bit for bit"}
    _card(tmp, "safetensors", name, dtype, model_cfg, meta, usage, check, state, files["towers.safetensors"])
    return _publish(tmp, out)


def _card(tmp: Path, fmt: str, name: str, dtype: str, model_cfg: dict, meta: dict | None, usage: list[str],
          check: dict, state: dict, cast: dict) -> None:
    meta = dict(meta or {})
    # How far the dtype cast moved the embeddings from the fp32 weights (0 for fp32 exports).
    images, tokens = fixed_batch(model_cfg)
    if dtype != "fp32":
        check["dtype_error"] = max_error(embeddings(reference_model(state, model_cfg), images, tokens),
                                         embeddings(reference_model(cast, model_cfg), images, tokens))
    ctx = model_cfg["text_cfg"].get("context_length", 77)
    meta.update({"name": name, "format": fmt, "dtype": dtype, "model_cfg": model_cfg,
                 "preprocess_cfg": preprocess_cfg(model_cfg), "usage": usage, "self_check": check,
                 "tokenizer": {"type": "open_clip SimpleTokenizer (CLIP BPE, bundled vocabulary)",
                               "context_length": ctx, "pad_id": 0, "sot_id": 49406, "eot_id": 49407}})
    write_card(tmp, meta)


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


def load_source(path: str | Path, weights: str = "auto") -> Source:
    """The exportable parts of a checkpoint or run dir. `weights`: auto (EMA when the run kept it), ema, online."""
    ckpt = checkpoint_dir(path)
    if not (ckpt / "trainer.pt").exists():
        raise FileNotFoundError(f"{ckpt}: trainer.pt missing (not a complete plait checkpoint)")
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    model = load_file(ckpt / "model.safetensors")
    ema = None
    if (ckpt / EMA_FILE).exists():
        ema = load_file(ckpt / EMA_FILE)
    else:
        for prefix in EMA_PREFIXES:
            if any(k.startswith(prefix) for k in model):
                ema = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
                break
    if weights == "ema" and ema is None:
        raise ValueError(f"--weights ema: {ckpt} holds no EMA weights (the run did not keep them)")
    use_ema = ema is not None and weights in ("auto", "ema")
    chosen = ema if use_ema else model
    clip = clip_state(chosen) or (chosen if "logit_scale" in chosen else {})
    if not clip:
        raise ValueError(f"{ckpt}: no open_clip weights (keys starting with 'clip.') in the checkpoint")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    training = training_metadata(trainer, run_dir)
    model_name = training.get("config", {}).get("model", {}).get("name", "model")
    return Source(clip=clip, model_cfg=json.loads(trainer["model_cfg"]), heads=heads_state(model),
                  training=training, weights="ema" if use_ema else "online", checkpoint=str(ckpt),
                  name=f"plait-{model_name}".replace("/", "-"))


def load_checkpoint_model(path: str | Path) -> tuple[dict, dict]:
    """(clip state dict, open_clip model config) of a checkpoint or run dir."""
    src = load_source(path)
    return src.clip, src.model_cfg


def export(src: Source, fmt: str, out: str | Path, dtype: str = "fp32", with_heads: bool = False,
           eval_results: dict | None = None, extra_meta: dict | None = None) -> Path:
    """Writes `src` in `fmt` (open_clip, hf, safetensors) with its model card; returns the output dir."""
    meta = {"source_checkpoint": src.checkpoint, "weights": src.weights,
            "training": {k: v for k, v in src.training.items() if k != "eval"},
            "eval": {**src.training.get("eval", {}), **(eval_results or {})}, **(extra_meta or {})}
    if fmt == "open_clip":
        return export_open_clip(src.clip, src.model_cfg, out, dtype, name=src.name, meta=meta)
    if fmt == "hf":
        from pipeline.export_hf import export_hf
        return export_hf(src.clip, src.model_cfg, out, dtype, name=src.name, meta=meta)
    if fmt == "safetensors":
        if with_heads and not src.heads:
            raise ValueError(f"--heads: {src.checkpoint} has no objective heads (only the towers were trained)")
        return export_safetensors(src.clip, src.model_cfg, out, dtype, heads=src.heads if with_heads else None,
                                  name=src.name, meta=meta)
    raise ValueError(f"--format {fmt!r}: expected open_clip, hf or safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plait export", description=(
        "Export a training checkpoint (or a run dir's newest one) as a model-only artifact that loads without "
        "plait, after checking that the exported model reproduces the training model on a fixed batch."))
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (newest checkpoint)")
    parser.add_argument("--format", choices=["open_clip", "hf", "safetensors"], default="open_clip", help=(
        "open_clip: open_clip_config.json + open_clip_model.safetensors (local-dir:) and a single .pt; "
        "hf: transformers CLIPModel folder; safetensors: raw towers (default: %(default)s)"))
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype (default: %(default)s)")
    parser.add_argument("--weights", choices=["auto", "ema", "online"], default="auto",
                        help="auto: EMA weights when the run kept them, else the online weights (default: auto)")
    parser.add_argument("--heads", action="store_true",
                        help="safetensors format: also write the objectives' heads (MAE/MLM decoders, fusion)")
    parser.add_argument("--eval-json", help="a `plait eval` result to record in the model card")
    args = parser.parse_args(argv)
    if args.heads and args.format != "safetensors":
        parser.error("--heads only applies to --format safetensors")
    eval_results = None
    if args.eval_json:
        path = Path(args.eval_json)
        if not path.is_file():
            raise FileNotFoundError(f"--eval-json: {path} not found")
        eval_results = json.loads(path.read_text())
    src = load_source(args.checkpoint, args.weights)
    out = export(src, args.format, args.out, args.dtype, args.heads, eval_results)
    print(f"exported {src.checkpoint} ({src.weights} weights) -> {out} ({args.format}, {args.dtype}); "
          f"see {out}/README.md")
    return 0
