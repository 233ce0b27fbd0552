"""Model-only exports of a training checkpoint, checked against the training model before they are kept."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import Checkpointer
from pipeline.models.towers import build_clip
from pipeline.transforms import preprocess_cfg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def clip_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip part of a PlaitModel state dict (heads are left out)."""
    return {k[len("clip."):]: v for k, v in model_state.items() if k.startswith("clip.")}


def fixed_batch(model_cfg: dict, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (images [n, 3, H, W], tokens [n, L]) batch for self-checks."""
    g = torch.Generator().manual_seed(seed)
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = open_clip.SimpleTokenizer(model_cfg["text_cfg"].get("context_length", 77))(
        ["a photo of a cat", "a drawing of a dog", "a sneaker", "an ankle boot"][:n])
    return images, tokens


@torch.no_grad()
def embeddings(clip, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    clip.eval()
    return clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True)


def export_open_clip(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path,
                     dtype: str = "fp32", atol: float = 1e-5) -> Path:
    """Writes `open_clip_config.json` + `open_clip_model.safetensors`, reloads them through open_clip's
    `local-dir:` loader and fails unless the embeddings match the training weights within `atol`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    save_file(cast, tmp / "open_clip_model.safetensors")
    (tmp / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg)}, indent=2))

    reference = build_clip(model_cfg)
    reference.load_state_dict(state, strict=True)
    reloaded = open_clip.create_model_and_transforms(f"local-dir:{tmp}")[0]
    images, tokens = fixed_batch(model_cfg)
    ref_img, ref_txt = embeddings(reference.float(), images, tokens)
    got_img, got_txt = embeddings(reloaded.float(), images, tokens)
    error = max((ref_img - got_img).abs().max().item(), (ref_txt - got_txt).abs().max().item())
    tolerance = atol if dtype == "fp32" else 2e-2
    if error > tolerance:
        raise RuntimeError(f"export self-check failed: embeddings differ by {error:.2e} (> {tolerance:.0e})")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint dir, or the newest complete checkpoint of a run dir."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    latest = Checkpointer(path, keep_last=1).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found in {path}")
    return latest


def load_checkpoint_model(path: str | Path) -> tuple[dict, dict]:
    """(clip state dict, open_clip model config) of a checkpoint or run dir."""
    ckpt = checkpoint_dir(path)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    return clip_state(load_file(ckpt / "model.safetensors")), json.loads(trainer["model_cfg"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plait export", description=(
        "Export a training checkpoint (or a run dir's newest one) as a model-only artifact that loads without "
        "plait, after checking that the exported model reproduces the training model's embeddings."))
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (newest checkpoint)")
    parser.add_argument("--format", choices=["open_clip"], default="open_clip",
                        help="open_clip: open_clip_config.json + open_clip_model.safetensors (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weight dtype (default: %(default)s)")
    args = parser.parse_args(argv)
    state, model_cfg = load_checkpoint_model(args.checkpoint)
    out = export_open_clip(state, model_cfg, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out} (open_clip, {args.dtype}); load with "
          f"open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0
