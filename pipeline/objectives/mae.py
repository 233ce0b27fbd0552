"""MAE: reconstruct the patches FLIP masked from the visible tokens of the same image pass (one encoder pass)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import choice, require
from pipeline.losses.mae import MaeLoss
from pipeline.models.encoding import Needs
from pipeline.models.mae_decoder import MaeDecoder
from pipeline.models.towers import check_vit
from pipeline.objectives.base import Unit


@dataclass(frozen=True)
class MaeConfig:
    weight: float = 0.0
    """Weight of masked-image reconstruction (MAE decoder on the FLIP-visible tokens); needs objective.flip.mask_ratio
    > 0."""
    decoder_width: int = 128
    """Width of the MAE decoder's transformer."""
    decoder_layers: int = 2
    """Blocks of the MAE decoder's transformer."""
    decoder: str = choice("cross", "self", "cross")
    """cross: CrossMAE's decoder (Fu et al. 2024): only the masked positions' queries, each cross-attending to the
    visible tokens; nothing is computed for the visible positions. self: MAE's own, self-attention over [class +
    visible + mask tokens] at every patch position. cross is the default: in the objectives ablation it matches self's
    held-out reconstruction, zero-shot and probe accuracy, with 0.56x the decoder's forward + backward time."""
    norm_pix: bool = True
    """MAE targets are each patch's pixels normalised by the patch's own mean and variance."""

    def __post_init__(self):
        for name in ("decoder_width", "decoder_layers"):
            require(getattr(self, name) > 0, f"objective.mae.{name}", "must be positive")


class Mae(Unit):
    name, Config = "mae", MaeConfig
    legacy_keys = {"mae_decoder_width": "decoder_width", "mae_decoder_layers": "decoder_layers",
                   "mae_decoder": "decoder", "mae_norm_pix": "norm_pix"}
    video = False

    @classmethod
    def check(cls, root):
        require(root.mae.weight == 0 or root.flip.mask_ratio > 0, "objective.mae",
                "needs objective.flip.mask_ratio > 0 (MAE reconstructs the patches FLIP masks)")

    def card(self) -> str:
        kind = "CrossMAE" if self.cfg.decoder == "cross" else "MAE self-attention"
        return (f"MAE: masked-patch reconstruction, {kind} decoder {self.cfg.decoder_layers} x "
                f"{self.cfg.decoder_width} (weight {self.weight:g})")

    def head(self, clip, model_cfg):
        check_vit(clip, "objective.flip.mask_ratio")
        visual, cfg = clip.visual, self.cfg
        return MaeDecoder(visual.transformer.width, visual.grid_size[0] * visual.grid_size[1], visual.patch_size[0],
                          cfg.decoder_width, cfg.decoder_layers, heads=max(1, cfg.decoder_width // 32),
                          cross=cfg.decoder == "cross")

    def needs(self) -> Needs:
        return Needs(images=True)

    def step(self, model, enc, batch):
        if enc.keep is None:  # FLIP's unmasked phase: nothing to reconstruct
            return {}, [model.heads[self.name]]
        return model.heads[self.name](enc.image_tokens, enc.keep, enc.image), []

    def bind(self, world, total_steps):
        self.loss_fn = MaeLoss(self.cfg.norm_pix)

    def loss(self, outputs, batch, step):
        if "mae_pred" not in outputs:
            return None, {}
        return self.loss_fn(outputs["mae_pred"], outputs["mae_target"]), {}
