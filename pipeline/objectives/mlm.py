"""MLM: masked language modeling on the text tower (BERT's 80/10/10), a bidirectional pass batched with the
contrastive text pass, the head's output layer tied to the token embedding."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import require
from pipeline.losses.mlm import MlmLoss
from pipeline.models.encoding import SidePass
from pipeline.models.masking import mask_tokens
from pipeline.models.mlm_head import MlmHead
from pipeline.models.towers import check_text_transformer
from pipeline.objectives.base import Unit

# Size of open_clip's BPE vocabulary, from which MLM's 10% random replacements are drawn.
VOCAB_SIZE = 49408


@dataclass(frozen=True)
class MlmConfig:
    weight: float = 0.0
    """Weight of masked language modeling on the text tower (bidirectional pass, head tied to the embedding)."""
    mask_ratio: float = 0.15
    """Fraction of each caption's tokens masked for MLM (BERT 80/10/10 replacement; at least one token)."""
    candidates: int = 0
    """0: the MLM softmax spans the whole vocabulary. K > 0: while training, a sampled softmax over the batch's
    masked tokens plus K random vocabulary ids; with a small text tower the 49k-way softmax is most of MLM's cost.
    Evaluation always scores the whole vocabulary."""

    def __post_init__(self):
        require(0 < self.mask_ratio < 1, "objective.mlm.mask_ratio", "must lie in (0, 1)")
        require(self.candidates >= 0, "objective.mlm.candidates", "must be >= 0")


class Mlm(Unit):
    name, Config = "mlm", MlmConfig
    legacy_keys = {"mlm_mask_ratio": "mask_ratio", "mlm_candidates": "candidates"}

    def card(self) -> str:
        softmax = f"sampled softmax over {self.cfg.candidates} ids" if self.cfg.candidates else "full softmax"
        return f"MLM: {self.cfg.mask_ratio:.0%} of caption tokens masked, {softmax} (weight {self.weight:g})"

    def head(self, clip, model_cfg):
        check_text_transformer(clip, "objective.mlm")
        return MlmHead(clip.transformer.width, clip.vocab_size, self.cfg.candidates)

    def side_pass(self, model, batch):
        if "mlm_input" not in batch:
            return None
        head = model.heads[self.name]
        labels = batch["mlm_labels"]                                  # [B, L], -100 where not chosen
        # padding is never chosen: the chosen labels read in the same order at the full or the trimmed length
        candidates, targets = head.output_ids(labels[labels >= 0])   # [C] or None, [M]
        return SidePass(batch["mlm_input"], batch["mlm_mask_token"], head.mask_embedding, candidates, targets)

    def step(self, model, enc, batch):
        head = model.heads[self.name]
        if enc.side_tokens is None:  # no masks in this batch (a plain model(batch) call)
            return {}, [head]
        chosen = batch["mlm_labels"][:, :enc.side_tokens.shape[1]] >= 0   # [B, L']
        output_rows = model.clip.token_embedding.weight if enc.side_rows is None else enc.side_rows  # [V or C, W]
        logits = head(enc.side_tokens[chosen], output_rows, enc.side.extra_ids)  # [M, V or C]
        return {"mlm_logits": logits, "mlm_targets": enc.side.payload}, []

    def bind(self, world, total_steps):
        self.loss_fn = MlmLoss()

    def augment(self, batch, step):
        # mlm_input [B, L], mlm_mask_token [B, L] bool, mlm_labels [B, L] (-100 where not chosen)
        mlm_input, mask_token, labels = mask_tokens(batch["text"], self.cfg.mask_ratio, VOCAB_SIZE)
        return {"mlm_input": mlm_input, "mlm_mask_token": mask_token, "mlm_labels": labels}

    def loss(self, outputs, batch, step):
        if "mlm_logits" not in outputs:
            return None, {}
        logits, targets = outputs["mlm_logits"], outputs["mlm_targets"]
        report = {"mlm_accuracy": float((logits.argmax(-1) == targets).float().mean())} if targets.numel() else {}
        return self.loss_fn(logits, targets), report
