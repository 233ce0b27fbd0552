"""Towers' token-level forwards, masking counts, and each head's wiring on the open_clip model."""
from __future__ import annotations

import open_clip
import pytest
import torch

from pipeline.config import ObjectiveConfig
from pipeline.models.mae_decoder import patchify
from pipeline.models.masking import IGNORE_INDEX, keep_to_mask, mask_tokens, num_masked, random_keep
from pipeline.models.model import build_model
from pipeline.models.sizes import model_config
from pipeline.models.towers import build_clip, encode_image_tokens, encode_text_tokens, text_padding_mask
from tests.helpers.tolerance import assert_close, close

pytestmark = pytest.mark.numeric

torch.set_num_threads(1)

CAPTIONS = ["a photo of a shirt", "a dress on a hanger in the shop window", "bag", "a pair of black ankle boots"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip(model_config("tiny")).eval()


@pytest.fixture(scope="module")
def text():
    return open_clip.SimpleTokenizer(context_length=32)(CAPTIONS)


def test_visible_token_forward_with_nothing_masked_equals_open_clip(clip):
    images = torch.randn(3, 3, 64, 64)
    pooled, tokens = encode_image_tokens(clip.visual, images)
    assert_close(pooled, clip.encode_image(images), rtol=1e-6)
    assert tokens.shape == (3, 1 + 16, 128)
    all_kept = torch.arange(16).expand(3, 16)
    # with a mask the patch embedding runs as a matmul on the kept patches: equal up to float rounding, gradients too
    grads = []
    for pooled in (encode_image_tokens(clip.visual, images, all_kept)[0], clip.encode_image(images)):
        clip.zero_grad()
        pooled.pow(2).sum().backward()
        grads.append((pooled.detach(), clip.visual.conv1.weight.grad.clone(), clip.visual.positional_embedding.grad))
    (a, conv_a, pos_a), (b, conv_b, pos_b) = grads
    # the positional gradient sums terms of ~100 into elements near 0: rounding scales with the former
    assert_close(a, b, rtol=1e-5, name="pooled")
    assert_close(conv_a, conv_b, rtol=1e-5, name="conv1 grad")
    assert_close(pos_a, pos_b, rtol=1e-5, name="positional_embedding grad")
    clip.zero_grad()


def test_visible_token_forward_depends_only_on_kept_patches(clip):
    images = torch.randn(2, 3, 64, 64)
    keep = random_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    pooled, tokens = encode_image_tokens(clip.visual, images, keep)
    assert tokens.shape == (2, 1 + 8, 128)
    masked = keep_to_mask(keep, 16)
    pixel_mask = masked.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 16, 4, 16).reshape(2, 3, 64, 64)
    changed = images + 5.0 * pixel_mask      # only masked patches change
    assert_close(encode_image_tokens(clip.visual, changed, keep)[0], pooled, rtol=1e-5)
    assert not close(clip.encode_image(changed), clip.encode_image(images), rtol=1e-2)


def test_text_token_forward_equals_open_clip(clip, text):
    pooled, tokens = encode_text_tokens(clip, text)
    assert_close(pooled, clip.encode_text(text), rtol=1e-6)
    assert tokens.shape == (4, 32, 128)


def test_bidirectional_pass_sees_later_tokens_and_ignores_padding(clip, text):
    _, causal = encode_text_tokens(clip, text)
    _, bidir = encode_text_tokens(clip, text, bidirectional=True)
    later = text.clone()
    later[0, 3] = 1000                                   # a token after position 1
    _, causal_later = encode_text_tokens(clip, later)
    _, bidir_later = encode_text_tokens(clip, later, bidirectional=True)
    assert close(causal_later[0, 1], causal[0, 1], rtol=1e-5)          # causal: position 1 cannot see 3
    assert not close(bidir_later[0, 1], bidir[0, 1], rtol=1e-2)        # bidirectional: it can
    padded = text.clone()
    eot = int(text[2].argmax())
    padded[2, eot + 1:] = 5                              # garbage in the padding of sample 2
    _, bidir_padded = encode_text_tokens(clip, padded, bidirectional=True)
    assert_close(bidir_padded[2, : eot + 1], bidir[2, : eot + 1], rtol=1e-5)


@pytest.mark.parametrize("ratio,num_patches", [(0.5, 16), (0.75, 64), (0.3, 49), (0.0, 16), (0.99, 16)])
def test_random_keep_masks_exactly_the_requested_count(ratio, num_patches):
    keep = random_keep(32, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    expected_masked = min(num_patches - 1, round(ratio * num_patches))
    assert keep.shape == (32, num_patches - expected_masked)
    assert (keep.diff(dim=1) > 0).all()                     # sorted, distinct
    assert (keep_to_mask(keep, num_patches).sum(dim=1) == expected_masked).all()
    assert num_masked(num_patches, ratio) == expected_masked


def test_random_keep_differs_between_samples():
    keep = random_keep(8, 64, 0.5, generator=torch.Generator().manual_seed(0))
    assert len({tuple(k.tolist()) for k in keep}) == 8


def test_mask_tokens_exact_counts_and_bert_split(text):
    texts = text.repeat(500, 1)                               # [2000, 32]
    mlm_input, mask_token, labels = mask_tokens(texts, 0.3, 49408, generator=torch.Generator().manual_seed(0))
    eot = texts.argmax(dim=-1)
    num_real = eot - 1                                        # between start and end of text
    chosen = labels != IGNORE_INDEX
    expected = torch.clamp(torch.round(num_real.float() * 0.3), min=1).long()
    assert torch.equal(chosen.sum(dim=1), expected)
    positions = torch.arange(32)
    assert not (chosen & ((positions == 0) | (positions[None] >= eot[:, None]))).any()  # never special/padding
    assert torch.equal(labels[chosen], texts[chosen])
    assert not (mask_token & ~chosen).any()
    assert torch.equal(mlm_input[~chosen], texts[~chosen])    # unchosen tokens untouched
    n = chosen.sum().item()
    as_mask = mask_token.sum().item() / n
    replaced = (chosen & ~mask_token & (mlm_input != texts)).sum().item() / n
    assert 0.77 < as_mask < 0.83 and 0.07 < replaced < 0.13


def test_patchify_order_matches_the_vit_grid():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(images, 4)                              # [2, 4, 48]
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block; channel-last within a patch
    assert torch.equal(patches[0, 1].view(4, 4, 3).permute(2, 0, 1), images[0, :, :4, 4:])


@pytest.mark.parametrize("decoder", ["self", "cross"])
def test_mae_head_reconstructs_only_masked_patches(decoder):
    cfg = ObjectiveConfig(flip_mask_ratio=0.75, mae=1.0, mae_decoder=decoder)
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), cfg)
    batch = {"image": torch.randn(3, 3, 64, 64), "text": open_clip.SimpleTokenizer(context_length=32)(CAPTIONS[:3]),
             "image_mask_ratio": 0.75}
    out = model(batch)
    assert out["image_keep"].shape == (3, 4)
    assert out["mae_pred"].shape == out["mae_target"].shape == (3, 12, 16 * 16 * 3)
    mask = keep_to_mask(out["image_keep"], 16)                 # [3, 16] True where masked
    expected = torch.stack([torch.nonzero(row).flatten() for row in mask])
    assert torch.equal(out["mae_masked"], expected)            # the 12 masked patches, in patch order
    assert torch.equal(out["mae_target"], patchify(batch["image"], 16)[mask].view(3, 12, -1))
    # the predictions read the visible tokens: other visible tokens for one image change its predictions only
    tokens = torch.randn(3, 5, 128)
    decoder_head = model.heads["mae"]
    before = decoder_head(tokens, out["image_keep"], batch["image"])["mae_pred"]
    tokens[0, 1:] += 1.0
    after = decoder_head(tokens, out["image_keep"], batch["image"])["mae_pred"]
    assert not close(after[0], before[0], rtol=1e-2) and close(after[1:], before[1:], rtol=1e-5)


def test_heads_stay_out_of_the_open_clip_model():
    cfg = ObjectiveConfig(flip_mask_ratio=0.5, mae=1.0, mlm=1.0, autoencoder=1.0, fusion="attention", adversarial=0.1)
    model = build_model(model_config("tiny"), cfg)
    assert set(model.heads) == {"mae", "mlm", "autoencoder", "adversarial"}
    plain = build_clip(model_config("tiny"))
    assert set(model.clip.state_dict()) == set(plain.state_dict())


def test_siglip_adds_a_logit_bias_that_the_config_declares():
    model_cfg = model_config("tiny")
    model = build_model(model_cfg, ObjectiveConfig(contrastive=0.0, siglip=1.0))
    assert model_cfg["init_logit_bias"] == -10.0 and model.clip.logit_bias is not None
    reloaded = open_clip.CLIP(**model_cfg)                    # what open_clip builds from the exported config
    reloaded.load_state_dict(model.clip.state_dict())


def test_unsupported_towers_are_named():
    model_cfg = model_config("tiny")
    model_cfg["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32}  # ModifiedResNet
    with pytest.raises(ValueError, match="ViT image tower"):
        build_model(model_cfg, ObjectiveConfig(flip_mask_ratio=0.5))


def test_sampled_softmax_scores_the_same_target_logits_as_the_full_vocabulary(text):
    torch.manual_seed(0)
    full = build_model(model_config("tiny"), ObjectiveConfig(contrastive=0.0, autoencoder=1.0)).eval()
    sampled = build_model(model_config("tiny"), ObjectiveConfig(contrastive=0.0, autoencoder=1.0,
                                                                autoencoder_text_candidates=64)).eval()
    sampled.load_state_dict(full.state_dict())
    batch = {"image": torch.randn(4, 3, 64, 64), "text": text}
    a, b = full(batch), sampled(batch)
    real = text[text != 0]
    assert torch.equal(a["ae_text_targets"], real)
    assert b["ae_text_logits"].shape[1] <= 64 + len(real.unique())
    picked_full = a["ae_text_logits"].gather(1, a["ae_text_targets"][:, None])
    picked_sampled = b["ae_text_logits"].gather(1, b["ae_text_targets"][:, None])
    assert_close(picked_sampled, picked_full, rtol=1e-5)


def test_video_batches_mean_pool_frame_embeddings(text):
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), ObjectiveConfig(flip_mask_ratio=0.5)).eval()
    frames = torch.randn(4, 3, 3, 64, 64)                     # [B, T, 3, H, W]
    out = model({"frames": frames, "text": text})
    expected = torch.nn.functional.normalize(model.clip.encode_image(frames.flatten(0, 1)).view(4, 3, -1).mean(1), dim=-1)
    assert_close(out["image_features"], expected, rtol=1e-5)
    masked = model({"frames": frames, "text": text, "image_mask_ratio": 0.5})
    assert masked["image_features"].shape == (4, 128) and "image_keep" not in masked
    with pytest.raises(ValueError, match="video batches"):
        build_model(model_config("tiny"), ObjectiveConfig(flip_mask_ratio=0.5, mae=1.0))(
            {"frames": frames, "text": text, "image_mask_ratio": 0.5})


@pytest.mark.parametrize("objectives", [{}, {"mlm": 1.0}])
def test_packed_and_trimmed_text_change_nothing_but_the_cost(text, objectives):
    """The text tower runs on packed captions (several to a row, each attending only to itself, positions restarting
    at 0), else on the batch's longest caption, else on the whole 32-token context: the same text features, MLM
    logits, loss and every gradient, in fewer and shorter tower rows."""
    from pipeline.train.distributed import World
    from pipeline.objectives.combined import Objective
    cfg = ObjectiveConfig(**objectives)
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), cfg).double()
    objective = Objective(cfg, World(), total_steps=10)
    torch.manual_seed(1)
    batch = objective.augment({"image": torch.randn(4, 3, 64, 64, dtype=torch.float64), "text": text}, 0)
    shapes = []
    model.clip.transformer.register_forward_pre_hook(lambda _, args, kw: shapes.append(tuple(args[0].shape[:2])),
                                                     with_kwargs=True)
    runs = []
    for trim, pack in ((True, True), (True, False), (False, False)):
        model.trim_text, model.pack_text = trim, pack
        model.zero_grad()
        out = model(dict(batch))
        loss, _, _ = objective(out, batch, 0)
        loss.backward()
        runs.append((out, loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    longest = int(text.argmax(-1).max()) + 1                    # the four captions (3-11 tokens, 29) fit one row
    captions = 4 * (1 + bool(objectives))                       # MLM's pass runs batched with the contrastive one
    assert longest < 32 and shapes == [(1 + bool(objectives), 32), (captions, longest), (captions, 32)]
    (o1, l1, g1) = runs[0]
    for o2, l2, g2 in runs[1:]:
        assert_close(o1["text_features"], o2["text_features"], rtol=1e-10, name="text_features")
        assert_close(l1, l2, rtol=1e-10, name="loss")
        if objectives:
            assert_close(o1["mlm_logits"], o2["mlm_logits"], rtol=1e-10, name="mlm_logits")
        assert g1.keys() == g2.keys()
        for k in g1:
            assert_close(g1[k], g2[k], rtol=1e-10, name=k)


def test_mlm_pass_batched_with_the_contrastive_pass_equals_two_separate_passes(text):
    """One embedding lookup and one tower pass over [contrastive rows; MLM rows] give the features, MLM logits and
    gradients of the plain form: a causal pass, then a bidirectional pass over the masked input."""
    from pipeline.train.distributed import World
    from pipeline.objectives.combined import Objective
    cfg = ObjectiveConfig(mlm=1.0)
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), cfg).double()
    objective = Objective(cfg, World(), total_steps=10)
    torch.manual_seed(1)
    batch = objective.augment({"image": torch.randn(4, 3, 64, 64, dtype=torch.float64), "text": text}, 0)
    out = model(dict(batch))
    clip, head = model.clip, model.heads["mlm"]
    features, _ = encode_text_tokens(clip, text)
    rows = head.mask(clip.token_embedding(batch["mlm_input"]), batch["mlm_mask_token"])
    _, hidden = encode_text_tokens(clip, text, embeddings=rows, bidirectional=True)
    chosen = batch["mlm_labels"] >= 0
    logits = head(hidden[chosen], clip.token_embedding.weight, None)
    assert_close(out["text_features"], torch.nn.functional.normalize(features, dim=-1), rtol=1e-10)
    assert_close(out["mlm_logits"], logits, rtol=1e-10)
    assert torch.equal(out["mlm_targets"], batch["mlm_labels"][chosen])
    grads = []
    for loss in (out["mlm_logits"].logsumexp(-1).sum() + out["text_features"].sum(),
                 logits.logsumexp(-1).sum() + torch.nn.functional.normalize(features, dim=-1).sum()):
        model.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "heads.mlm.mask_embedding" in grads[0]
    for k in grads[0]:
        assert_close(grads[0][k], grads[1][k], rtol=1e-10, name=k)


def test_mlm_batched_pass_leaves_a_non_causal_towers_contrastive_rows_unmasked(text):
    from pipeline.train.distributed import World
    from pipeline.objectives.combined import Objective
    model_cfg = model_config("tiny")
    model_cfg["text_cfg"]["no_causal_mask"] = True           # open_clip's option: no causal mask in the text tower
    cfg = ObjectiveConfig(mlm=1.0)
    torch.manual_seed(0)
    model = build_model(model_cfg, cfg).eval()
    assert model.clip.attn_mask is None
    batch = Objective(cfg, World(), total_steps=10).augment({"image": torch.randn(4, 3, 64, 64), "text": text}, 0)
    with torch.no_grad():
        out = model(dict(batch))
        plain, _ = encode_text_tokens(model.clip, text)
    assert_close(out["text_features"], torch.nn.functional.normalize(plain, dim=-1), rtol=1e-5)


def test_mlm_sampled_softmax_trains_on_candidates_and_evaluates_on_the_whole_vocabulary(text):
    from pipeline.train.distributed import World
    from pipeline.objectives.combined import Objective
    cfg = ObjectiveConfig(mlm=1.0, mlm_candidates=64)
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), cfg)
    objective = Objective(cfg, World(), total_steps=10)
    torch.manual_seed(1)
    batch = objective.augment({"image": torch.randn(4, 3, 64, 64), "text": text}, 0)
    labels = batch["mlm_labels"][batch["mlm_labels"] >= 0]
    with torch.no_grad():
        full = model(dict(batch))
    assert full["mlm_logits"].shape == (len(labels), 49408) and torch.equal(full["mlm_targets"], labels)
    torch.manual_seed(2)
    sampled = model(dict(batch))
    assert sampled["mlm_logits"].shape[1] <= 64 + len(labels)
    # each target keeps its own logit: the candidates hold every target id, re-indexed
    picked_full = full["mlm_logits"].gather(1, full["mlm_targets"][:, None])
    picked_sampled = sampled["mlm_logits"].gather(1, sampled["mlm_targets"][:, None])
    assert_close(picked_sampled, picked_full, rtol=1e-5)
    objective(sampled, batch, 0)[0].backward()
    assert model.clip.token_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("trim,pack", [(True, True), (True, False), (False, False)])
def test_shared_encoding_gives_the_text_tokens_a_unit_needs_in_every_text_mode(clip, text, trim, pack):
    """A unit that declares Needs(text_tokens=True) gets the text tower's tokens at the caption positions, whether the
    pass is packed, trimmed or over the whole context, and they equal the plain token-level forward's there."""
    from pipeline.models.encoding import Needs, encode_batch
    with torch.no_grad():
        enc = encode_batch(clip, {"image": torch.randn(4, 3, 64, 64), "text": text}, Needs(text_tokens=True),
                           trim=trim, pack=pack)
        _, plain = encode_text_tokens(clip, text)                  # [B, 32, W]
    assert enc.text_tokens is not None and torch.equal(enc.text_ids, text[:, :enc.text_ids.shape[1]])
    real = ~text_padding_mask(text)[:, :enc.text_ids.shape[1]]  # [B, L'] the caption positions
    assert_close(enc.text_tokens[real], plain[:, :enc.text_ids.shape[1]][real], rtol=1e-5)
