"""The objective: augment's masks per step, every configuration end to end, and short optimisation runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch

from pipeline.config import ObjectiveConfig, load_config, save_config
from pipeline.train.distributed import World
from pipeline.losses.adversarial import AdversarialLoss
from pipeline.models.model import build_model
from pipeline.models.sizes import model_config
from pipeline.objectives.combined import Objective, clamp_logit_scale
from tests.helpers.tolerance import assert_close

pytestmark = pytest.mark.numeric

torch.set_num_threads(1)

CAPTIONS = ["a photo of a t-shirt", "a photo of a trouser", "a pullover", "a dress", "a coat", "a sandal"]
CONFIGS = {
    "contrastive": {},
    "contrastive_same_modality": {"same_modality_negatives": True},
    "siglip": {"contrastive": 0.0, "siglip": 1.0},
    "flip": {"flip_mask_ratio": 0.5},
    "flip_mae": {"flip_mask_ratio": 0.5, "mae": 1.0},
    "mlm": {"mlm": 1.0},
    "flip_mae_mlm": {"flip_mask_ratio": 0.5, "mae": 1.0, "mlm": 1.0},
    "ae_concat": {"contrastive": 0.0, "autoencoder": 1.0, "fusion": "concat"},
    "ae_bilinear": {"contrastive": 0.0, "autoencoder": 1.0, "fusion": "bilinear"},
    "ae_attention": {"contrastive": 0.0, "autoencoder": 1.0, "fusion": "attention"},
    "adversarial": {"adversarial": 0.1, "adversarial_warmup_steps": 4},
    "itm": {"itm": {"weight": 1.0, "layers": 1}},
    "flip_itm": {"flip": {"mask_ratio": 0.5}, "itm": {"weight": 1.0, "layers": 1}},
}


def make_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 28, 28, generator=g),
            "text": open_clip.SimpleTokenizer(context_length=16)(CAPTIONS[:n])}


def test_augment_is_a_no_op_without_masks():
    batch = make_batch()
    assert Objective(ObjectiveConfig(), World()).augment(batch, 0) is batch


def test_flip_ratio_and_final_unmasked_phase():
    cfg = ObjectiveConfig(flip_mask_ratio=0.5, flip_unmasked_steps=3)
    objective = Objective(cfg, World(), total_steps=10)
    assert [objective.augment(make_batch(), s).get("image_mask_ratio", 0.0) for s in range(10)] == [0.5] * 7 + [0.0] * 3
    with pytest.raises(ValueError, match="total_steps"):
        Objective(cfg, World())


def test_adversarial_warm_up_ramps_the_reversed_gradient():
    objective = Objective(ObjectiveConfig(adversarial=0.1, adversarial_warmup_steps=4), World())
    assert [objective.augment(make_batch(), s)["adversarial_scale"] for s in (0, 1, 2, 4, 9)] == [0, 0.25, 0.5, 1, 1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_configuration_trains_every_parameter(name):
    torch.manual_seed(0)
    cfg = ObjectiveConfig(**CONFIGS[name])
    model, objective = build_model(model_config("fmnist-vit"), cfg), Objective(cfg, World())
    batch = objective.augment(make_batch(), step=2)
    loss, losses, report = objective(model(batch), batch, step=2)
    assert torch.isfinite(loss) and losses and all(math.isfinite(v) for v in report.values())
    assert loss.item() == pytest.approx(sum(v.item() for v in losses.values()), rel=1e-6)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_unmasked_phase_keeps_the_mae_decoder_in_the_graph():
    """During FLIP's unmasked phase MAE has nothing to reconstruct; its parameters still get (zero) gradients,
    which DDP without find_unused_parameters requires."""
    cfg = ObjectiveConfig(flip_mask_ratio=0.5, mae=1.0, flip_unmasked_steps=1)
    model, objective = build_model(model_config("fmnist-vit"), cfg), Objective(cfg, World(), total_steps=5)
    batch = objective.augment(make_batch(), step=4)
    loss, losses, _ = objective(model(batch), batch, step=4)
    assert set(losses) == {"contrastive"}
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.heads["mae"].parameters())


def test_gradient_reversal_reaches_the_towers_negated_and_scaled():
    torch.manual_seed(0)
    cfg = ObjectiveConfig(contrastive=1.0, adversarial=1.0)
    model, objective = build_model(model_config("fmnist-vit"), cfg), Objective(cfg, World())
    batch = {**make_batch(), "adversarial_scale": 0.5}
    out = model(batch)
    _, losses, _ = objective(out, batch, 0)
    proj = model.clip.visual.proj
    (reversed_grad,) = torch.autograd.grad(losses["adversarial"], proj, retain_graph=True)
    disc = model.heads["adversarial"].net
    plain, _ = AdversarialLoss()(disc(out["image_features"]).squeeze(-1), disc(out["text_features"]).squeeze(-1))
    (plain_grad,) = torch.autograd.grad(plain, proj)
    assert_close(reversed_grad, -0.5 * plain_grad, rtol=1e-5)
    # The discriminator itself is trained on the plain (unreversed) loss.
    w = disc[0].weight
    assert_close(torch.autograd.grad(objective(model(batch), batch, 0)[1]["adversarial"], w)[0],
                 torch.autograd.grad(AdversarialLoss()(disc(out["image_features"].detach()).squeeze(-1),
                                                       disc(out["text_features"].detach()).squeeze(-1))[0], w)[0],
                 rtol=1e-5)


def test_alternating_adversarial_updates_train_one_player_per_step():
    """Even steps: only the discriminator learns from the adversarial loss (plain labels); odd steps: only the
    towers, towards the flipped labels through a frozen discriminator, ramped by the warm-up."""
    torch.manual_seed(0)
    cfg = ObjectiveConfig(contrastive=1.0, adversarial=1.0, adversarial_mode="alternating", adversarial_warmup_steps=2)
    model, objective = build_model(model_config("fmnist-vit"), cfg), Objective(cfg, World())
    proj, disc = model.clip.visual.proj, model.heads["adversarial"].net
    for step in (0, 1):
        batch = objective.augment(make_batch(), step)
        assert batch["adversarial_turn"] == ("discriminator", "towers")[step]
        out = model(batch)
        _, losses, _ = objective(out, batch, step)
        tower_grad, disc_grad = torch.autograd.grad(losses["adversarial"], [proj, disc[0].weight],
                                                    allow_unused=True, retain_graph=True)
        if step == 0:
            assert tower_grad is None and disc_grad.abs().sum() > 0
        else:
            flipped, _ = AdversarialLoss()(disc(out["image_features"]).squeeze(-1),
                                           disc(out["text_features"]).squeeze(-1), flip=True)
            (expected,) = torch.autograd.grad(0.5 * flipped, proj, retain_graph=True)  # warm-up: 1/2 at step 1
            assert disc_grad is None
            assert_close(tower_grad, expected, rtol=1e-5)
            (loss, _, _) = objective(out, batch, step)
            loss.backward()  # the frozen discriminator still gets a (zero) gradient: DDP needs every parameter used
            assert disc[0].weight.grad is not None and not disc[0].weight.grad.any()


@pytest.mark.parametrize("name,key,ratio", [("flip_mae_mlm", "mae", 0.8), ("flip_mae_mlm", "mlm", 0.6),
                                            ("ae_bilinear", "autoencoder", 0.6), ("contrastive", "contrastive", 0.6),
                                            ("siglip", "siglip", 0.6), ("flip_itm", "itm", 0.8)])
@pytest.mark.slow
def test_short_optimisation_lowers_each_loss(name, key, ratio):
    """Fifty AdamW steps on one fixed batch: each objective's own loss falls well below its start (MAE less:
    the masked patches of noise images are partly unpredictable)."""
    torch.manual_seed(0)
    cfg = ObjectiveConfig(**CONFIGS[name])
    model, objective = build_model(model_config("fmnist-vit"), cfg), Objective(cfg, World())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, history = make_batch(), []
    for step in range(50):
        torch.manual_seed(step)                     # same masks each step: a learnable fixed target
        augmented = objective.augment(batch, step)
        loss, losses, _ = objective(model(augmented), augmented, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clamp_logit_scale(model.clip)
        history.append(losses[key].item())
    assert history[-1] < ratio * history[0], history[::10]


def test_clamp_keeps_the_temperature_in_range():
    model = build_model(model_config("fmnist-vit"), ObjectiveConfig())
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    out = model(make_batch())
    assert out["logit_scale"].item() == pytest.approx(100.0)     # clamped in the forward already
    clamp_logit_scale(model.clip, 50.0)
    assert model.clip.logit_scale.exp().item() == pytest.approx(50.0, rel=1e-5)


def test_objective_options_are_selectable_from_config():
    cfg = load_config(None, ["objective.contrastive=0", "objective.autoencoder=1", "objective.fusion=bilinear",
                             "objective.siglip=0.5", "objective.siglip_exchange=shift"])
    assert (cfg.objective.autoencoder.weight, cfg.objective.autoencoder.fusion, cfg.objective.siglip.exchange) == (
        1.0, "bilinear", "shift")
    with pytest.raises(ValueError, match="objective.fusion"):
        load_config(None, ["objective.fusion=sum"])
    with pytest.raises(ValueError, match="objective.mae"):
        load_config(None, ["objective.mae=1"])


def test_checkpoint_layout_is_unchanged_by_the_objective_units():
    """The model's parameter names, shapes and order (the optimizer state's indexing) and its state-dict keys equal
    those recorded from the code before the objective units (tests/golden/model_keys_before_units.json, written by
    the old build_model from the old flat keys): checkpoints written before load, and resume their optimizer."""
    golden = json.loads((Path(__file__).parent / "golden" / "model_keys_before_units.json").read_text())
    for name, recorded in golden.items():
        model = build_model(model_config("tiny"), ObjectiveConfig(**recorded["objective"]))
        assert [[n, list(p.shape)] for n, p in model.named_parameters()] == recorded["parameters"], name
        assert sorted(model.state_dict()) == recorded["state_dict"], name


def test_old_flat_keys_and_unit_sections_give_the_same_config(tmp_path):
    flat = tmp_path / "flat.toml"
    flat.write_text('[objective]\ncontrastive = 1.0\nflip_mask_ratio = 0.5\nmae = 0.5\nmae_decoder = "self"\n'
                    'mlm = 0.2\nmlm_candidates = 64\n')
    sections = tmp_path / "sections.toml"
    sections.write_text('[objective.contrastive]\nweight = 1.0\n[objective.flip]\nmask_ratio = 0.5\n'
                        '[objective.mae]\nweight = 0.5\ndecoder = "self"\n[objective.mlm]\nweight = 0.2\ncandidates = 64\n')
    with pytest.warns(DeprecationWarning, match="objective.mae_decoder is deprecated: write objective.mae.decoder"):
        old = load_config(flat)
    assert old == load_config(sections)
    assert old.objective.mae.decoder == "self" and old.objective.mlm.candidates == 64
    # the resolved config a run writes uses the sections, and reads back the same
    save_config(old, tmp_path / "resolved.toml")
    assert "[objective.mae]" in (tmp_path / "resolved.toml").read_text()
    assert load_config(tmp_path / "resolved.toml") == old
    with pytest.raises(ValueError, match="objective.mae.decoder.*given as objective.mae_decoder"):
        load_config(None, ["objective.flip_mask_ratio=0.5", "objective.mae=1", "objective.mae_decoder=sideways"])


def test_model_card_reads_old_flat_and_new_section_configs_alike():
    """A checkpoint's stored config.toml, before the units (flat keys) or after (sections): the card lists the same
    weighted objectives, each with its unit's description."""
    from pipeline.artifacts.model_card import training_metadata
    flat = 'contrastive = 1.0\nflip_mask_ratio = 0.5\nmae = 0.5\nmae_decoder = "self"\nitm = 0.0\n'
    sections = ('[objective.contrastive]\nweight = 1.0\n[objective.flip]\nmask_ratio = 0.5\n'
                '[objective.mae]\nweight = 0.5\ndecoder = "self"\n')
    metas = [training_metadata({"config": "[objective]\n" + flat}, None),
             training_metadata({"config": sections}, None)]
    for meta in metas:
        assert meta["objectives"] == {"contrastive": 1.0, "mae": 0.5}
        assert [line.split(":")[0] for line in meta["objective_descriptions"]] == ["contrastive", "FLIP", "MAE"]
        assert "MAE self-attention decoder" in meta["objective_descriptions"][2]
