"""The objective units by name, and `[objective]`: one config section per unit.

Adding an objective = one unit module (config section, head, augment, loss, card; see pipeline/objectives/itm.py),
one line in UNITS and one section field in ObjectiveConfig below. Order matters: it is the order of the model's
heads (and so of the optimizer's parameters in a checkpoint) and of the losses in the logs.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from pipeline.options import require
from pipeline.objectives.adversarial import Adversarial, AdversarialConfig
from pipeline.objectives.autoencoder import Autoencoder, AutoencoderConfig
from pipeline.objectives.base import Unit
from pipeline.objectives.caption import Caption, CaptionConfig
from pipeline.objectives.contrastive import Contrastive, ContrastiveConfig
from pipeline.objectives.flip import Flip, FlipConfig
from pipeline.objectives.itm import Itm, ItmConfig
from pipeline.objectives.mae import Mae, MaeConfig
from pipeline.objectives.mlm import Mlm, MlmConfig
from pipeline.objectives.siglip import SigLip, SigLipConfig

UNITS: dict[str, type[Unit]] = {unit.name: unit for unit in (Contrastive, SigLip, Flip, Mae, Mlm, Autoencoder,
                                                             Adversarial, Itm, Caption)}


@dataclass(frozen=True, init=False)
class ObjectiveConfig:
    max_logit_scale: float = 100.0
    """Clamp of the learnable inverse temperature 1/tau (CLIP: 100), applied in the forward and after each step."""
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """symmetric InfoNCE (CLIP)."""
    siglip: SigLipConfig = field(default_factory=SigLipConfig)
    """the sigmoid loss (SigLIP)."""
    flip: FlipConfig = field(default_factory=FlipConfig)
    """FLIP's image-patch masking."""
    mae: MaeConfig = field(default_factory=MaeConfig)
    """masked-patch reconstruction on FLIP's visible tokens."""
    mlm: MlmConfig = field(default_factory=MlmConfig)
    """masked language modeling."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """the seed's multimodal autoencoder."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """adversarial modality alignment."""
    itm: ItmConfig = field(default_factory=ItmConfig)
    """image-text matching with hard negatives (ALBEF, BLIP)."""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """captioning: a text decoder cross-attending to the image tokens (CoCa)."""

    def __init__(self, **values: Any):
        """Sections by name (dataclasses or dicts of their keys), or plait's flat keys from before the units
        (`ObjectiveConfig(mae=0.5, mae_decoder="self")`), translated."""
        sections = translate_legacy(values, warn=False)
        for f in dataclasses.fields(self):
            value = sections.pop(f.name, dataclasses.MISSING)
            if value is dataclasses.MISSING:
                value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            elif isinstance(value, dict):
                value = UNITS[f.name].Config(**value)
            object.__setattr__(self, f.name, value)
        if sections:
            raise TypeError(f"ObjectiveConfig got unknown keys: {', '.join(sections)}")
        self.__post_init__()

    def __post_init__(self):
        require(self.max_logit_scale >= 1, "objective.max_logit_scale", "must be >= 1")
        for name, unit in UNITS.items():
            if getattr(self, name).__class__ is not unit.Config:
                raise TypeError(f"objective.{name} must be a {unit.Config.__name__}")
            require(getattr(getattr(self, name), "weight", 0) >= 0, f"objective.{name}.weight", "weights must be >= 0")
            unit.check(self)
        require(any(unit.trains_alone and unit.enabled(getattr(self, name)) for name, unit in UNITS.items()),
                "objective", "every objective weight is 0: nothing would train")

    @classmethod
    def translate_legacy(cls, data: dict, prefix: str = "objective.") -> tuple[dict, dict[str, str]]:
        """from_dict's hook: the flat keys of old TOML files and checkpoints' stored configs, translated (with a
        DeprecationWarning naming the new key); returns the new data and {new key: old key}."""
        renamed: dict[str, str] = {}
        return translate_legacy(data, warn=True, prefix=prefix, renamed=renamed), renamed


def legacy_map() -> dict[str, tuple[str, str]]:
    """Old flat key -> (section, key): each unit's `legacy_keys`, and its own name (a number) -> weight."""
    out = {}
    for name, unit in UNITS.items():
        out.update({old: (name, new) for old, new in unit.legacy_keys.items()})
    return out


def translate_legacy(data: dict, warn: bool = True, prefix: str = "objective.",
                     renamed: dict[str, str] | None = None) -> dict:
    """`[objective]` as old or new keys -> new keys only: `mae = 0.5` -> `mae.weight`, `mae_decoder` ->
    `mae.decoder`, ... Unknown keys pass through (the loader names them)."""
    moves, out = legacy_map(), {}
    for key, value in data.items():
        if key in UNITS and not isinstance(value, (dict, *(u.Config for u in UNITS.values()))):
            section, new = key, "weight"
        elif key in moves:
            section, new = moves[key]
        else:
            existing = out.get(key)
            if isinstance(existing, dict) and isinstance(value, dict):
                out[key] = {**value, **existing}
            else:
                out[key] = value
            continue
        if renamed is not None:
            renamed[f"{prefix}{section}.{new}"] = f"{prefix}{key}"
        if warn:
            warnings.warn(f"config key {prefix}{key} is deprecated: write {prefix}{section}.{new}", DeprecationWarning,
                          stacklevel=3)
        target = out.setdefault(section, {})
        if not isinstance(target, dict):  # a section dataclass given beside a flat key of its own
            target = out[section] = dataclasses.asdict(target)
        target[new] = value
    return out


def enabled_units(cfg: ObjectiveConfig) -> list[Unit]:
    """Fresh instances of the units `cfg` turns on, in registry order."""
    return [unit(getattr(cfg, name), cfg) for name, unit in UNITS.items() if unit.enabled(getattr(cfg, name))]


def objective_weights(raw: dict) -> dict[str, float]:
    """{name: weight} of the enabled weighted objectives in a stored `[objective]` table (old or new keys), read
    tolerantly for the model card: what cannot be read is left out."""
    sections = translate_legacy(raw, warn=False)
    out = {}
    for name in UNITS:
        weight = sections.get(name, {}).get("weight") if isinstance(sections.get(name), dict) else None
        if isinstance(weight, (int, float)) and weight:
            out[name] = weight
    return out


def objective_cards(raw: dict) -> list[str]:
    """The model card's line for each objective a stored `[objective]` table enables; [] when it does not parse."""
    try:
        cfg = ObjectiveConfig(**raw)
    except (ValueError, TypeError):
        return []
    return [unit.card() for unit in enabled_units(cfg)]
