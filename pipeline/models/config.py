"""The model's own config: architecture, pretrained start, locks and patch dropout. It lives with the models so
the model library stands alone: nothing under pipeline/models imports training, checkpoints or the app config;
the app config (`pipeline/config.py`) holds one of these as its `model` section."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import choice, require


@dataclass(frozen=True)
class ModelConfig:
    name: str = "fmnist-vit"
    """A named size from plait's registry (`pipeline/models/sizes.py`, e.g. fmnist-vit, tiny) or any open_clip
    model name (ViT-B-32, ViT-S-32-alt, ...). Weights start random: no hub downloads."""
    patch_dropout: float = 0.0
    """Fraction of image patches dropped in the image tower at train time (open_clip's patch_dropout).
    Prefer objective.flip.mask_ratio, which also serves the MAE decoder."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (open_clip's set_grad_checkpointing)."""
    pretrained: str = ""
    """Initialise from these weights (a local path, never a hub): a plait run or checkpoint dir, a plait export
    (open_clip dir, safetensors dir), an open_clip checkpoint file (.pt/.bin/.safetensors, `state_dict` and
    `module.` wrapping accepted) or a Hugging Face CLIPModel dir. Its architecture comes from the files where they
    record it (open_clip_config.json, config.json, the checkpoint), else from model.name. Read weights-only.
    A resumed run takes its weights from its checkpoint; this path is only recorded."""
    lock_image: bool = False
    """Lock the image tower (LiT): no gradient, no optimizer state, no gradient sync; fully locked, it runs in
    eval mode."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the last N layer groups trainable (open_clip's groups; for a ViT: embeddings, each
    block, the last block with ln_post, the projection)."""
    lock_image_freeze_norm: bool = False
    """With lock_image: freeze the BatchNorm statistics of the locked groups (ResNet/timm towers; open_clip's
    --lock-image-freeze-bn-stats)."""
    lock_text: bool = False
    """Lock the text tower (LiT with a pretrained text encoder): as lock_image. An HF text tower's projection
    (model.text_hf_proj) stays trainable; open_clip's own text tower locks its projection unless unlocked."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave the last N layer groups trainable (open_clip's text transformer: embeddings, each
    block, the last block with ln_final, the projection; HF: embeddings, each layer)."""
    lock_text_freeze_norm: bool = True
    """With lock_text: the LayerNorms of the locked layers stay frozen too (open_clip's
    --lock-text-freeze-layer-norm, whose CLI default is off). false: they keep training."""
    lock_text_cache: int = 0
    """With a fully locked HF text tower: remember the locked trunk's pooled features of up to this many distinct
    captions, so a repeated caption skips the transformer (the projection still trains). Pays off where captions
    repeat (templates x class names); 0: off."""
    text_hf: str = ""
    """A local Hugging Face model directory (config.json, model.safetensors, tokenizer files), or
    `package:NAME/SUB` for one inside an installed Python package, used as the text tower (open_clip's
    HFTextEncoder) with its own tokenizer, loaded offline; replaces model.name's text tower."""
    text_hf_pooler: str = choice("mean", "mean", "cls")
    """How the HF text tower pools its tokens: mean over the caption's tokens, or the first ([CLS]) token."""
    text_hf_proj: str = choice("linear", "linear", "mlp")
    """The trained projection from the HF tower's width to the embedding: linear, or a 2-layer GELU MLP."""
    text_hf_context_length: int = 0
    """Tokens per caption for the HF tokenizer; 0: model.name's text context length."""

    def __post_init__(self):
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers", "text_hf_context_length",
                     "lock_text_cache"):
            require(getattr(self, name) >= 0, f"model.{name}", "must be >= 0")
        require(self.lock_image or not self.lock_image_unlocked_groups, "model.lock_image_unlocked_groups",
                "needs model.lock_image = true")
        require(self.lock_text or not self.lock_text_unlocked_layers, "model.lock_text_unlocked_layers",
                "needs model.lock_text = true")
        require(bool(self.text_hf) or not self.text_hf_context_length, "model.text_hf_context_length",
                "needs model.text_hf")
        require(0 <= self.patch_dropout < 1, "model.patch_dropout", f"must lie in [0, 1), got {self.patch_dropout}")
