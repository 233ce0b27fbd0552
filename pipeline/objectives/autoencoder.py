"""The seed's multimodal autoencoder: fuse the two towers' embeddings (concatenation, low-rank bilinear pooling or
cross-attention) and reconstruct both inputs from the joint embedding; L = L_txt + L_img."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import choice, require
from pipeline.losses.autoencoder import AutoencoderLoss
from pipeline.models.encoding import Needs
from pipeline.models.fusion import FusionAutoencoder
from pipeline.models.towers import check_text_transformer, check_vit
from pipeline.objectives.base import Unit


@dataclass(frozen=True)
class AutoencoderConfig:
    weight: float = 0.0
    """Weight of the seed's multimodal autoencoder (L = L_txt + L_img from a fused joint embedding)."""
    fusion: str = choice("concat", "concat", "bilinear", "attention")
    """Fusion of the autoencoder's joint embedding: concatenation, low-rank bilinear pooling, cross-attention."""
    fusion_dim: int = 256
    """Width of the autoencoder's joint embedding."""
    bilinear_rank: int = 128
    """Rank of the factorised bilinear fusion."""
    text_candidates: int = 0
    """0: the text decoder's softmax spans the whole vocabulary. K > 0: a sampled softmax over the batch's own
    tokens plus K random vocabulary ids (Jean et al. 2015): ~50x less work per position with CLIP's 49k vocabulary."""

    def __post_init__(self):
        for name in ("fusion_dim", "bilinear_rank"):
            require(getattr(self, name) > 0, f"objective.autoencoder.{name}", "must be positive")
        require(self.text_candidates >= 0, "objective.autoencoder.text_candidates", "must be >= 0")


class Autoencoder(Unit):
    name, Config = "autoencoder", AutoencoderConfig
    legacy_keys = {"fusion": "fusion", "fusion_dim": "fusion_dim", "bilinear_rank": "bilinear_rank",
                   "autoencoder_text_candidates": "text_candidates"}
    video = False

    def card(self) -> str:
        return (f"multimodal autoencoder: {self.cfg.fusion} fusion into {self.cfg.fusion_dim} dims, reconstructs "
                f"pixels and caption tokens (weight {self.weight:g})")

    def head(self, clip, model_cfg):
        # The text decoder's output layer is tied to the token embedding of open_clip's own text tower.
        cfg = self.cfg
        check_text_transformer(clip, "objective.autoencoder")
        if cfg.fusion == "attention":
            check_vit(clip, "objective.autoencoder.fusion = attention")
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        image_size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
        image_width = clip.visual.transformer.width if cfg.fusion == "attention" else 0
        return FusionAutoencoder(cfg.fusion, model_cfg["embed_dim"], cfg.fusion_dim, image_size,
                                 text.get("context_length", 77), image_width, clip.transformer.width, clip.vocab_size,
                                 cfg.bilinear_rank, cfg.text_candidates)

    def needs(self) -> Needs:
        attention = self.cfg.fusion == "attention"
        # cross-attention fusion reads every token of both towers, the text at every position of the context
        return Needs(image_tokens=attention, full_text=attention, images=True)

    def step(self, model, enc, batch):
        return model.heads[self.name](enc.text_embed, enc.image_embed, enc.image, enc.text,
                                      model.clip.token_embedding, image_tokens=enc.image_tokens,
                                      text_tokens=enc.text_tokens), []

    def bind(self, world, total_steps):
        self.loss_fn = AutoencoderLoss()

    def loss(self, outputs, batch, step):
        total, text_loss, image_loss = self.loss_fn(outputs["ae_image_pred"], outputs["ae_image_target"],
                                                    outputs["ae_text_logits"], outputs["ae_text_targets"])
        return total, {"autoencoder_text": float(text_loss.detach()), "autoencoder_image": float(image_loss.detach())}
