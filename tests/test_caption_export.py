"""The open_clip CoCa export of a model trained with objective.caption: open_clip reads it as CoCa, its logits and
`generate` equal plait's own, and --format hf refuses it."""
from __future__ import annotations

import open_clip
import pytest
import torch

import pipeline.artifacts.export as ex
from pipeline.models.caption_head import beam_search, caption_logits, captioner_for, decode, greedy
from pipeline.models.towers import encode_text_tokens
from pipeline.objectives.caption import token_loss_sums
from tests.helpers.captioner import batch_of, coca_model_cfg, exported, model_and_objective
from tests.helpers.tolerance import assert_close

torch.set_num_threads(1)


def test_caption_logits_equal_open_clip_coca_on_the_exported_weights(tmp_path):
    """Teacher forcing on the trimmed, packed shared encoding (its per-caption losses) and on the full padded
    context (its logits) equals open_clip CoCa's forward; the export self-check compares the same, here checked
    from outside."""
    model, objective = model_and_objective()
    model.eval()
    batch = objective.augment(batch_of(), 0)
    with torch.no_grad():
        ours = model(batch)
    src = ex.Source(clip=ex.clip_state(model.state_dict()), heads=ex.heads_state(model.state_dict()),
                    model_cfg=coca_model_cfg())
    ex.export(src, "open_clip", tmp_path / "coca")
    coca = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'coca'}")[0].eval()
    assert isinstance(coca, open_clip.CoCa)
    with torch.no_grad():
        theirs = coca(batch["image"], batch["text"])
        captioner = captioner_for(model)
        logits = caption_logits(model.heads["caption"], captioner.image_context(batch["image"]),
                                encode_text_tokens(model.clip, batch["text"])[1])   # [B, L - 1, V]
    labels = batch["text"][:, 1:]
    assert_close(logits[labels != 0], theirs["logits"][labels != 0], rtol=1e-5, scale_rtol=2e-5, name="logits")
    assert torch.allclose(ours["caption_nll"], token_loss_sums(theirs["logits"], labels), rtol=1e-5)
    assert torch.allclose(ours["image_features"], theirs["image_features"], atol=1e-5)


def enable_open_clip_generate(monkeypatch):
    """open_clip 3.3's CoCa.generate asserts unless its module imported transformers' BeamSearchScorer, which
    transformers 5 removed; its top-k loop needs only the logits processors, which are there."""
    import open_clip.coca_model as coca_model
    if not coca_model._has_transformers:
        from transformers import TopKLogitsWarper
        monkeypatch.setattr(coca_model, "_has_transformers", True)
        monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", TopKLogitsWarper)


def slice_text_mask(monkeypatch, coca):
    """open_clip 3.3's TextTransformer gives a prefix shorter than the context its whole causal mask (and fails)
    unless it has a CLS embedding; open_clip's current source cuts the mask to the prefix, as done here."""
    embeds = coca.text._embeds

    def cut(text):
        x, mask = embeds(text)
        return x, mask if mask is None or mask.dim() != 2 else mask[:x.shape[1], :x.shape[1]]
    monkeypatch.setattr(coca.text, "_embeds", cut)


def test_exported_coca_generates_what_plait_generates(tmp_path, monkeypatch):
    enable_open_clip_generate(monkeypatch)
    model, batch, out = exported(tmp_path)
    coca = open_clip.create_model_and_transforms(f"local-dir:{out}")[0].eval()
    slice_text_mask(monkeypatch, coca)
    ours = greedy(captioner_for(model), batch["image"], max_length=12, min_length=3)
    theirs = coca.generate(batch["image"], generation_type="top_k", top_k=1, seq_len=12, min_seq_len=3)
    assert torch.equal(ours, theirs[:, :ours.shape[1]]) and (theirs[:, ours.shape[1]:] == 0).all()
    assert torch.equal(greedy(captioner_for(coca), batch["image"], max_length=12, min_length=3), ours)
    texts = decode(ours)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert texts[0] == "a photo of a shirt"                       # 30 steps on 4 captions: memorised
    beams = beam_search(captioner_for(model), batch["image"], num_beams=3, max_length=12, min_length=3)
    assert decode(beams)[0] == "a photo of a shirt"
    assert torch.equal(beam_search(captioner_for(model), batch["image"], num_beams=1, max_length=12,
                                   min_length=3)[:, :ours.shape[1]], ours)


def test_hf_export_of_a_captioner_is_refused_in_one_line(tmp_path):
    model, _ = model_and_objective()
    src = ex.Source(clip=ex.clip_state(model.state_dict()), heads=ex.heads_state(model.state_dict()),
                    model_cfg=coca_model_cfg())
    with pytest.raises(ValueError, match="--format hf: a model trained with objective.caption is a CoCa") as e:
        ex.export(src, "hf", tmp_path / "hf")
    assert "\n" not in str(e.value)


def test_a_coca_export_is_a_pretrained_start_towers_and_decoder(tmp_path):
    from pipeline.artifacts.pretrained import load_pretrained, pretrained_architecture
    from pipeline.objectives.registry import ObjectiveConfig
    from pipeline.models.model import build_model
    trained, batch, out = exported(tmp_path, steps=3)
    cfg = pretrained_architecture(str(out))
    assert "multimodal_cfg" in cfg and "output_tokens" not in cfg["text_cfg"] and "custom_text" not in cfg
    fresh = build_model(cfg, ObjectiveConfig(caption={"weight": 1.0, "layers": 1, "heads": 2}))
    load_pretrained(fresh.clip, str(out), cfg, fresh.heads)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    plain = build_model(dict(cfg), ObjectiveConfig())                    # contrastive only: the decoder left out
    load_pretrained(plain.clip, str(out), cfg, plain.heads)
    assert torch.equal(plain.clip.visual.conv1.weight, trained.clip.visual.conv1.weight)


def test_open_clips_released_coca_layout_is_refused_in_one_line(tmp_path):
    import json
    from pipeline.artifacts.pretrained import pretrained_architecture
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(
        "coca_ViT-B-32")}))
    with pytest.raises(ValueError, match="model.pretrained.*embed_cls.*attentional_pool") as e:
        pretrained_architecture(str(tmp_path))
    assert "\n" not in str(e.value)
