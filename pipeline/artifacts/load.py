"""Loads any model plait evaluates or fine-tunes, behind open_clip's interface (`encode_image`, `encode_text`,
`logit_scale`), with its tokenizer and eval preprocess.

Accepted: an open_clip export dir (`open_clip_config.json`), a Hugging Face CLIPModel dir (`config.json`),
a plait safetensors export (`towers.safetensors`), a weights file (.pt/.bin/.safetensors) with `--model` naming
a registered open_clip config or a config JSON, and training checkpoints or run dirs.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec
import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.artifacts.pretrained import check_fits, check_local_towers, check_weights_file
from pipeline.models.towers import build_clip, tokenizer_for
from pipeline.data.transforms import image_transform
from pipeline.train.remote_store import is_url


@dataclass
class Loaded:
    model: nn.Module
    tokenize: Callable
    transform: Callable
    model_cfg: dict
    kind: str


class HFCLIP(nn.Module):
    """A transformers CLIPModel seen through open_clip's encode_* interface."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.hf.logit_scale

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._features(self.hf.get_image_features(pixel_values=images))  # [B, D]
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._features(self.hf.get_text_features(input_ids=tokens))  # [B, D]
        return nn.functional.normalize(x, dim=-1) if normalize else x


def _from_state(state: dict, model_cfg: dict, kind: str) -> Loaded:
    from pipeline.artifacts.export import with_logit_bias

    model_cfg = with_logit_bias(state, model_cfg)
    model = build_clip(model_cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return Loaded(model.eval(), tokenizer_for(model_cfg), image_transform(model_cfg, is_train=False), model_cfg, kind)


def _hf(path: Path) -> Loaded:
    from transformers import CLIPModel

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise ValueError(f"{path}: config.json is a {config.get('model_type')!r} model; only CLIPModel "
                         "(model_type 'clip') folders are supported")
    hf = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    size = pre.get("crop_size", {}).get("height", config["vision_config"].get("image_size", 224))
    ctx = config["text_config"].get("max_position_embeddings", 77)
    model_cfg = {"embed_dim": config.get("projection_dim", 512),
                 "vision_cfg": {"image_size": size, "image_mean": pre.get("image_mean", open_clip.OPENAI_DATASET_MEAN),
                                "image_std": pre.get("image_std", open_clip.OPENAI_DATASET_STD)},
                 "text_cfg": {"context_length": ctx}}
    # HF CLIP checkpoints use the same CLIP BPE vocabulary that open_clip bundles.
    return Loaded(HFCLIP(hf), tokenizer_for(model_cfg), image_transform(model_cfg, is_train=False), model_cfg, "hf")


# The names open_clip's `local-dir:` loader prefers, in its order; without one of them it takes the first
# *.safetensors, else the first *.bin / *.pth, by name.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                     "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def open_clip_weights(path: Path) -> Path | None:
    """The weights file open_clip would load from export folder `path` (None: none), chosen as it chooses."""
    found = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
    preferred = [p for p in found if p.name in OPEN_CLIP_WEIGHTS]
    if preferred:
        return min(preferred, key=lambda p: OPEN_CLIP_WEIGHTS.index(p.name))
    return min(found, key=lambda p: p.suffix != ".safetensors", default=None)


def download(url: str, local_root: Path) -> Path:
    """A local copy of the export folder or the checkpoint (a run's remote_dir, a `step-N`) at `url`."""
    from pipeline.artifacts.staging import MARKER_FILE, UPLOADING_FILE
    from pipeline.train.remote_store import fetch

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/{UPLOADING_FILE}"):
        raise ValueError(f"{url}: an export upload that did not finish ({UPLOADING_FILE}); export it again")
    if not fs.exists(f"{root}/{MARKER_FILE}"):
        return fetch(url, local_root)
    files = [p for p in fs.find(root) if not p[len(root) + 1:].startswith(".")]
    for path in files:
        rel = path[len(root) + 1:]
        if ".." in rel.split("/"):
            raise ValueError(f"{url}: file name {rel!r} leaves the folder")
        (local_root / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local_root / "model" / rel))
    return local_root / "model"


def load_model(source: str | Path, model: str | None = None) -> Loaded:
    """The model behind `source` (see the module docstring; also on object storage), in eval mode on CPU."""
    if is_url(source):
        with tempfile.TemporaryDirectory(prefix="plait-fetch-") as tmp:
            return load_model(download(str(source), Path(tmp)), model)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_file():
        if not model:
            raise ValueError(f"{path} is a weights file: name its architecture with --model "
                             "(a registered open_clip config, e.g. ViT-B-32, or a config .json)")
        name = model
        if model.endswith(".json"):
            check_fits(check_local_towers(json.loads(Path(model).read_text()), model), path, model)
            open_clip.add_model_config(model)
            name = Path(model).stem
        clip = open_clip.create_model(name, pretrained=str(path))
        cfg = open_clip.get_model_config(name)
        return Loaded(clip.eval(), open_clip.get_tokenizer(name), image_transform(cfg, is_train=False), cfg, "open_clip")
    if (path / "open_clip_config.json").is_file():
        where = path / "open_clip_config.json"
        try:
            config = json.loads(where.read_text())
        except (ValueError, UnicodeDecodeError) as exn:
            raise ValueError(f"{where}: not valid JSON ({exn})") from None
        cfg = check_local_towers(config.get("model_cfg") if isinstance(config, dict) else None, str(where))
        weights = open_clip_weights(path)
        if weights is None:
            raise ValueError(f"{path}: open_clip_config.json but no weights file open_clip reads beside it")
        check_weights_file(weights, inside=path)  # a pickle, a non-weights file or a link out: one line
        check_fits(cfg, weights, str(where))
        clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
        return Loaded(clip.eval(), tokenizer_for(cfg), preprocess, cfg, "open_clip")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _hf(path)
    if (path / "towers.safetensors").is_file():
        cfg = check_local_towers(json.loads((path / "model_config.json").read_text()), str(path / "model_config.json"))
        check_fits(cfg, path / "towers.safetensors", str(path / "model_config.json"))
        return _from_state(load_file(path / "towers.safetensors"), cfg, "safetensors")
    from pipeline.artifacts.export import load_checkpoint_model  # a training checkpoint or run dir
    state, cfg = load_checkpoint_model(path)
    check_fits(check_local_towers(cfg, str(path)), state, str(path))
    return _from_state(state, cfg, "checkpoint")
