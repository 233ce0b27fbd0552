"""open_clip <-> Hugging Face transformers `CLIPModel`, both directions: the HF export of an open_clip ViT +
text-transformer model (`export_hf`), and a CLIPModel folder read back as open_clip weights (`clip_cfg_from_hf`,
`clip_state_from_hf`, which `model.pretrained` and `plait eval` use).

The key mapping follows transformers' own open_clip conversion (fused `in_proj` split into q/k/v, projections
transposed). Only configurations both libraries compute identically are accepted; anything else is refused
with the offending key named, and every export is reloaded with `CLIPModel.from_pretrained` and its logits
compared with open_clip's before it is kept.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from pipeline.artifacts.staging import (cast_state, fixed_batch, reference_model, require_close, staged, with_logit_bias,
                               write_model_card)
from pipeline.train.checkpoint import clean_state_dict
from pipeline.train.remote_store import is_url
from pipeline.models.towers import tokenizer_for
from pipeline.data.transforms import preprocess_cfg

SHOWN_KEYS = 5  # mismatched keys named in an error

HF_ATOL = 1e-4
# Settings that only change training (or the pure-preprocessing side) and so do not affect the HF model.
VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
               "image_mean", "image_std", "interpolation", "resize_mode"}
TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
TOP_FREE = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"--format hf: {what} has no transformers CLIPModel equivalent; "
                      "export with --format open_clip or safetensors instead")


def _check_defaults(cfg: dict, cls: type, free: set[str], section: str) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in cfg.items():
        if key in free:
            continue
        if key not in defaults or value != defaults[key]:
            raise _unsupported(f"model_cfg.{section}.{key}={value!r}")


def hf_config(model_cfg: dict) -> dict:
    """The `config.json` of the equivalent CLIPModel; raises ValueError for architectures it cannot express."""
    if "multimodal_cfg" in model_cfg:
        raise ValueError("--format hf: a model trained with objective.caption is a CoCa (a text decoder beside the "
                         "towers), which transformers has no model class for; export --format open_clip, which "
                         "open_clip loads as CoCa and plait caption decodes")
    for key, value in model_cfg.items():
        if key not in TOP_FREE and not (key == "init_logit_bias" and value is None):
            raise _unsupported(f"model_cfg.{key}" if key != "init_logit_bias"
                               else "a sigmoid-loss model (logit_bias)")
    if model_cfg.get("custom_text") or model_cfg["text_cfg"].get("hf_model_name"):
        raise _unsupported(f"a Hugging Face text tower ({model_cfg['text_cfg'].get('hf_model_name', 'custom')}; "
                           "CLIPModel's text model is CLIP's own transformer, not BERT)")
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    _check_defaults(vision, CLIPVisionCfg, VISION_FREE, "vision_cfg")
    _check_defaults(text, CLIPTextCfg, TEXT_FREE, "text_cfg")
    if not isinstance(vision.get("layers"), int) or not isinstance(vision.get("image_size", 224), int):
        raise _unsupported("a ResNet image tower or a non-square image size")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vwidth, twidth = vision["width"], text.get("width", 512)
    vheads = vwidth // vision.get("head_width", 64)
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model_cfg["embed_dim"],
        "logit_scale_init_value": 2.6592, "torch_dtype": "float32",
        "text_config": {
            "vocab_size": text.get("vocab_size", 49408), "hidden_size": twidth,
            "intermediate_size": int(twidth * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77), "hidden_act": act,
            "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"],
            # open_clip pads with 0 and pools at the EOT token (the highest id); HF pools at the first eos.
            "pad_token_id": 0, "bos_token_id": 49406, "eos_token_id": 49407},
        "vision_config": {
            "hidden_size": vwidth, "intermediate_size": int(vwidth * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"], "num_attention_heads": vheads,
            "image_size": vision.get("image_size", 224), "patch_size": vision["patch_size"], "num_channels": 3,
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"]},
    }


def _blocks(state: dict, src: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for name in ("weight", "bias"):
            q, k, v = state[f"{s}.attn.in_proj_{name}"].chunk(3, dim=0)
            out.update({f"{d}.self_attn.q_proj.{name}": q, f"{d}.self_attn.k_proj.{name}": k,
                        f"{d}.self_attn.v_proj.{name}": v,
                        f"{d}.self_attn.out_proj.{name}": state[f"{s}.attn.out_proj.{name}"],
                        f"{d}.layer_norm1.{name}": state[f"{s}.ln_1.{name}"],
                        f"{d}.layer_norm2.{name}": state[f"{s}.ln_2.{name}"],
                        f"{d}.mlp.fc1.{name}": state[f"{s}.mlp.c_fc.{name}"],
                        f"{d}.mlp.fc2.{name}": state[f"{s}.mlp.c_proj.{name}"]})
    return out


def to_hf_state(state: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """open_clip CLIP keys -> CLIPModel keys. Every source tensor must be used exactly once."""
    v, t = "vision_model", "text_model"
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        f"{v}.embeddings.class_embedding": state["visual.class_embedding"],
        f"{v}.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        f"{v}.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        f"{v}.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        f"{v}.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        f"{v}.post_layernorm.weight": state["visual.ln_post.weight"],
        f"{v}.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
        f"{t}.embeddings.token_embedding.weight": state["token_embedding.weight"],
        f"{t}.embeddings.position_embedding.weight": state["positional_embedding"],
        f"{t}.final_layer_norm.weight": state["ln_final.weight"],
        f"{t}.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
    }
    out.update(_blocks(state, "visual.transformer.resblocks", f"{v}.encoder.layers", model_cfg["vision_cfg"]["layers"]))
    out.update(_blocks(state, "transformer.resblocks", f"{t}.encoder.layers", model_cfg["text_cfg"].get("layers", 12)))
    # Anything not mapped (layer scales, attention poolers, ...) would be silently dropped: refuse instead.
    mapped = {"logit_scale", "visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding",
              "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
              "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
              "text_projection", "attn_mask"}
    block_parts = {f"{p}.{n}" for p in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
                   for n in ("weight", "bias")} | {"attn.in_proj_weight", "attn.in_proj_bias"}
    left = sorted(k for k in state if k not in mapped and k.split(".resblocks.")[-1].split(".", 1)[-1] not in block_parts)
    if left:
        raise _unsupported(f"weights {left[:3]}")
    return {k: x.contiguous() for k, x in out.items()}


def write_tokenizer(out: Path, model_cfg: dict) -> None:
    """CLIPTokenizer files from open_clip's bundled BPE (the same vocabulary), so no hub download is needed.
    Ids agree up to the first end-of-text token; HF pads with it where open_clip pads with 0, which changes
    nothing: the causal mask hides padding and both pool at the first end-of-text."""
    tok = tokenizer_for(model_cfg)
    # open_clip names its special tokens <start_of_text>/<end_of_text>; HF expects OpenAI's names.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_cfg["text_cfg"].get("context_length", 77),
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "do_lower_case": True}, indent=2))
    pre = preprocess_cfg(model_cfg)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": pre["size"]},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": pre["size"], "width": pre["size"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": pre["mean"],
        "image_std": pre["std"], "do_convert_rgb": True}, indent=2))


@torch.no_grad()
def open_clip_logits(model, images, tokens) -> torch.Tensor:
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    return model.logit_scale.exp() * img @ txt.T  # [N_img, N_txt]


def export_hf(state: dict[str, torch.Tensor], model_cfg: dict, out_dir: str | Path, dtype: str = "fp32",
              atol: float = HF_ATOL, name: str = "plait-model", meta: dict | None = None,
              add_files: Callable[[Path], None] | None = None) -> Path:
    from transformers import CLIPModel  # heavy import, only for this format

    state = clean_state_dict(state)
    model_cfg = with_logit_bias(state, model_cfg)
    config = hf_config(model_cfg)  # refuses unsupported architectures before anything is written
    out = out_dir if is_url(out_dir) else Path(out_dir)  # an object-storage URL stays a URL
    cast = cast_state(state, dtype)
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    with staged(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(to_hf_state(cast, model_cfg), tmp / "model.safetensors", metadata={"format": "pt"})
        write_tokenizer(tmp, model_cfg)

        images, tokens = fixed_batch(model_cfg)
        expected = open_clip_logits(reference_model(cast, model_cfg), images, tokens)
        hf = CLIPModel.from_pretrained(tmp, dtype=torch.float32).eval()
        with torch.no_grad():
            got = hf(input_ids=tokens, pixel_values=images).logits_per_image
        error = (expected - got).abs().max().item()
        require_close(error, atol, "HF logits and open_clip's")
        check = {"max_abs_error": error, "tolerance": atol, "compared": "logits_per_image vs open_clip"}
        write_model_card(tmp, "hf", name, dtype, model_cfg, meta, check, state, cast)
        if add_files is not None:
            add_files(tmp)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face CLIPModel -> open_clip (the inverse of `to_hf_state`)
# ---------------------------------------------------------------------------------------------------------------


def clip_cfg_from_hf(config: dict, path: Path) -> dict:
    vision, text = config["vision_config"], config["text_config"]
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ValueError(f"config key 'model.pretrained': {path}/config.json: activation {sorted(acts)} has no "
                         "open_clip equivalent (gelu or quick_gelu in both towers)")
    for section in (vision, text):
        if abs(section.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
            raise ValueError(f"config key 'model.pretrained': {path}/config.json: layer_norm_eps "
                             f"{section['layer_norm_eps']} differs from open_clip's 1e-5")
    vwidth, twidth = vision.get("hidden_size", 768), text.get("hidden_size", 512)
    cfg = {"embed_dim": config.get("projection_dim", 512),
           "vision_cfg": {"image_size": vision.get("image_size", 224), "layers": vision.get("num_hidden_layers", 12),
                          "width": vwidth, "head_width": vwidth // vision.get("num_attention_heads", 12),
                          "mlp_ratio": vision.get("intermediate_size", 4 * vwidth) / vwidth,
                          "patch_size": vision.get("patch_size", 32)},
           "text_cfg": {"context_length": text.get("max_position_embeddings", 77),
                        "vocab_size": text.get("vocab_size", 49408), "width": twidth,
                        "heads": text.get("num_attention_heads", 8), "layers": text.get("num_hidden_layers", 12),
                        "mlp_ratio": text.get("intermediate_size", 4 * twidth) / twidth}}
    if acts == {"quick_gelu"}:
        cfg["quick_gelu"] = True
    return cfg


def clip_state_from_hf(hf: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """CLIPModel keys -> open_clip CLIP keys (q/k/v fused into in_proj, projections transposed)."""
    v, t = "vision_model", "text_model"
    hf = {k: x for k, x in hf.items() if not k.endswith("position_ids")}  # a buffer in older transformers
    names = {"logit_scale": "logit_scale",
             "visual.class_embedding": f"{v}.embeddings.class_embedding",
             "visual.conv1.weight": f"{v}.embeddings.patch_embedding.weight",
             "visual.positional_embedding": f"{v}.embeddings.position_embedding.weight",
             "visual.ln_pre.weight": f"{v}.pre_layrnorm.weight", "visual.ln_pre.bias": f"{v}.pre_layrnorm.bias",
             "visual.ln_post.weight": f"{v}.post_layernorm.weight", "visual.ln_post.bias": f"{v}.post_layernorm.bias",
             "token_embedding.weight": f"{t}.embeddings.token_embedding.weight",
             "positional_embedding": f"{t}.embeddings.position_embedding.weight",
             "ln_final.weight": f"{t}.final_layer_norm.weight", "ln_final.bias": f"{t}.final_layer_norm.bias"}
    used = set(names.values()) | {"visual_projection.weight", "text_projection.weight"}
    try:
        out = {ours: hf[theirs] for ours, theirs in names.items()}
        out["visual.proj"] = hf["visual_projection.weight"].T
        out["text_projection"] = hf["text_projection.weight"].T
        for ours, theirs, layers in (("visual.transformer.resblocks", f"{v}.encoder.layers",
                                      model_cfg["vision_cfg"]["layers"]),
                                     ("transformer.resblocks", f"{t}.encoder.layers", model_cfg["text_cfg"]["layers"])):
            for i in range(layers):
                s, d = f"{theirs}.{i}", f"{ours}.{i}"
                for n in ("weight", "bias"):
                    qkv = [f"{s}.self_attn.{p}_proj.{n}" for p in ("q", "k", "v")]
                    out[f"{d}.attn.in_proj_{n}"] = torch.cat([hf[k] for k in qkv])
                    pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
                    for a, b in pairs.items():
                        out[f"{d}.{a}.{n}"] = hf[f"{s}.{b}.{n}"]
                    used.update(qkv, (f"{s}.{b}.{n}" for b in pairs.values()))
    except KeyError as e:
        raise ValueError(f"config key 'model.pretrained': the CLIPModel weights lack {e.args[0]!r}") from None
    left = sorted(set(hf) - used)
    if left:
        raise ValueError(f"config key 'model.pretrained': CLIPModel weights with no open_clip place: {left[:SHOWN_KEYS]}")
    return out
