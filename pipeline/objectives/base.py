"""What an objective unit is: one class per objective, owning its config section, head, per-step batch extras,
loss, report and model-card line. `pipeline/objectives/registry.py` lists the units; `PlaitModel` and
`Objective` only loop over the enabled ones.

A unit instance serves one side of the training step: `build_model` makes instances for the model (their `head`,
`needs`, `side_pass`, `step` run inside the model's forward, so that DDP and FSDP see every trainable part), and
`Objective` makes its own for the loss side (`bind`, `augment`, `loss`). The two sides talk through the batch
(what `augment` adds) and the model's output dict, as before.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.train.distributed import World
from pipeline.models.encoding import Encoding, Needs, SidePass


class Unit:
    """Base of every objective unit. Subclasses set `name` and `Config` and override what they use."""

    name: ClassVar[str]
    """The registry key, the config section (`[objective.<name>]`) and the `model.heads` key of its head."""
    Config: ClassVar[type]
    """The unit's config section: a frozen dataclass, a docstring under each field."""
    legacy_keys: ClassVar[dict[str, str]] = {}
    """Flat `[objective]` keys of plait before units -> this section's key (`mae_decoder` -> `decoder`); the
    unit's own name given a number maps to `weight`."""
    trains_alone: ClassVar[bool] = True
    """Whether the unit alone gives the towers something to learn (adversarial alignment does not)."""
    uses_logit_scale: ClassVar[bool] = False
    """Whether its loss reads the learnable temperature (else the model keeps it in the graph with a zero)."""
    video: ClassVar[bool] = True
    """Whether it trains on video batches (frame embeddings mean-pooled)."""

    def __init__(self, cfg: Any, root: Any):
        self.cfg = cfg      # this unit's section
        self.root = root    # the whole ObjectiveConfig, for the few cross-unit settings (max_logit_scale)

    # ---- config --------------------------------------------------------------------------------------------
    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        """Whether the section turns the unit on (a positive weight, by default)."""
        return cfg.weight > 0

    @classmethod
    def check(cls, root: Any) -> None:
        """Validation across sections (e.g. MAE needs FLIP's masking); raise via pipeline.options.require."""

    @property
    def weight(self) -> float:
        return getattr(self.cfg, "weight", 1.0)

    def card(self) -> str:
        """The model card's line for this objective."""
        return f"{self.name} (weight {self.weight:g})"

    # ---- model side ----------------------------------------------------------------------------------------
    def configure_towers(self, model_cfg: dict) -> None:
        """Edits the open_clip model config before the towers are built (SigLIP's logit bias)."""

    def head(self, clip: nn.Module, model_cfg: dict) -> nn.Module | None:
        """The module this objective adds to the model (`model.heads[name]`), or None; may check the towers."""
        return None

    def needs(self) -> Needs:
        """What the unit reads from the shared encoding beyond the pooled features."""
        return Needs()

    def side_pass(self, model: nn.Module, batch: dict) -> SidePass | None:
        """A bidirectional text pass to run batched with the contrastive one (MLM), or None."""
        return None

    def step(self, model: nn.Module, enc: Encoding, batch: dict) -> tuple[dict[str, torch.Tensor], list]:
        """The head's forward on the shared encoding: (outputs for the loss, modules or parameters that take no part
        in this step's loss; they get a zero gradient so that DDP finds every parameter used)."""
        return {}, []

    # ---- loss side -----------------------------------------------------------------------------------------
    def bind(self, world: World, total_steps: int | None) -> None:
        """Sets up the loss for this process's place in the world (and the run's length, where it matters)."""

    def augment(self, batch: dict, step: int) -> dict:
        """What the unit adds to the batch at `step` (masks, ramps, turns): a dict merged into the batch."""
        return {}

    def loss(self, outputs: dict, batch: dict, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(unweighted loss or None when the unit has nothing to score this step, report floats)."""
        return None, {}
