"""Image-text matching (pipeline/objectives/itm.py): against a naive per-pair reference (values and gradients), its
hard-negative sampling, the shared encoding's packed text, and 2 gloo ranks against one process on the whole batch."""
from __future__ import annotations

import math
import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.config import ObjectiveConfig
from pipeline.train.distributed import World
from pipeline.models.itm_head import ItmHead
from pipeline.models.model import build_model
from pipeline.models.sizes import model_config
from pipeline.objectives.combined import Objective
from pipeline.objectives.itm import hard_negatives, itm_logits
from tests.helpers.tolerance import close

torch.set_num_threads(1)

WORLD, PER_RANK = 2, 3
N, T, L, WI, WT, E = WORLD * PER_RANK, 5, 7, 12, 10, 8
CAPTIONS = ["a photo of a shirt", "a dress on a hanger in the shop window", "bag", "a pair of black ankle boots"]


def inputs(seed=0):
    """A global batch of N samples: image tokens, caption tokens with ids (captions of different lengths, padded),
    normalised features, a scale and the sampling noise, in float64."""
    g = torch.Generator().manual_seed(seed)
    image_tokens = torch.randn(N, T, WI, generator=g, dtype=torch.float64)
    text_tokens = torch.randn(N, L, WT, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 2, 6, 4])
    ids = torch.randint(1, 1000, (N, L), generator=g)
    ids[torch.arange(N), lengths - 1] = 49407                       # end of text: the highest id of each row
    ids[torch.arange(L)[None, :] >= lengths[:, None]] = 0          # padding
    ids[4] = ids[0]                                                 # one caption twice, on both ranks
    image_features = F.normalize(torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1)
    text_features = F.normalize(image_features + 0.8 * torch.randn(N, E, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(4.0, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(torch.rand(2, N, N, generator=g, dtype=torch.float64)))
    return image_tokens, text_tokens, ids, image_features, text_features, scale, gumbel


def make_head():
    torch.manual_seed(0)
    return ItmHead(WT, WI, width=16, layers=2, heads=2).double()


def itm_loss(logits):
    labels = torch.tensor([1, 0, 0]).expand(logits.shape[0], 3)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def loss_and_grads(head, rank, world_size, image_tokens, text_tokens, ids, image_features, text_features, scale,
                   gumbel):
    image_tokens, text_tokens = image_tokens.clone().requires_grad_(), text_tokens.clone().requires_grad_()
    head.zero_grad()
    logits = itm_logits(head, image_tokens, text_tokens, ids, image_features, text_features, scale, rank,
                        world_size, gumbel)
    loss = itm_loss(logits)
    loss.backward()
    return {"loss": loss.detach(), "logits": logits.detach(), "image": image_tokens.grad, "text": text_tokens.grad,
            "head": {n: p.grad.clone() for n, p in head.named_parameters()}}


def naive_reference(head, image_tokens, text_tokens, ids, image_features, text_features, scale, gumbel):
    """ALBEF's recipe written out: per caption, the weights softmax(s t_i . v_j) over the images j != i whose
    caption is not caption i, and the negative image the one maximising log-weight + noise; likewise per image; then
    every pair through the head alone, and the two-way cross-entropy term by term."""
    total, logits = 0.0, []
    for i in range(N):
        others = [j for j in range(N) if j != i and not torch.equal(ids[j], ids[i])]
        w_img = torch.softmax(torch.stack([scale * text_features[i].dot(image_features[j]) for j in others]), 0)
        w_txt = torch.softmax(torch.stack([scale * image_features[i].dot(text_features[j]) for j in others]), 0)
        neg_img = others[int(torch.argmax(torch.log(w_img) + gumbel[0, i, others]))]
        neg_txt = others[int(torch.argmax(torch.log(w_txt) + gumbel[1, i, others]))]
        row = []
        for (img, txt), label in zip(((i, i), (neg_img, i), (i, neg_txt)), (1, 0, 0)):
            pair = head(text_tokens[txt:txt + 1], ids[txt:txt + 1], image_tokens[img:img + 1])[0]  # [2]
            total = total - torch.log(torch.exp(pair[label]) / torch.exp(pair).sum())
            row.append(pair)
        logits.append(torch.stack(row))
    return total / (3 * N), torch.stack(logits)


def test_itm_equals_the_naive_reference_values_and_gradients():
    head = make_head()
    image_tokens, text_tokens, ids, image_features, text_features, scale, gumbel = inputs()
    fast = loss_and_grads(head, 0, 1, *inputs())
    image_tokens.requires_grad_(), text_tokens.requires_grad_()
    head.zero_grad()
    loss, logits = naive_reference(head, image_tokens, text_tokens, ids, image_features, text_features, scale, gumbel)
    loss.backward()
    assert close(fast["logits"], logits, rtol=1e-9)
    assert close(fast["loss"], loss, rtol=1e-10)
    for name, p in head.named_parameters():
        assert close(fast["head"][name], p.grad, rtol=1e-8), name
    assert close(fast["image"], image_tokens.grad, rtol=1e-8)
    assert close(fast["text"], text_tokens.grad, rtol=1e-8)


def test_hard_negatives_are_drawn_in_proportion_to_the_softmax_of_the_similarities():
    """Gumbel-max over the other columns draws column j with probability softmax(sim)_j (ALBEF's multinomial);
    never the row's own column."""
    sim = torch.tensor([[5.0, 1.0, 2.0, 0.0, 3.0]])
    draws = 40_000
    g = torch.Generator().manual_seed(0)
    gumbel = -torch.log(-torch.log(torch.rand(draws, 5, generator=g)))
    picked = hard_negatives(sim.expand(draws, 5), torch.zeros(draws, dtype=torch.long), gumbel)
    counts = torch.bincount(picked, minlength=5).double() / draws
    expected = torch.cat([torch.zeros(1), torch.softmax(sim[0, 1:], 0)]).double()
    assert counts[0] == 0
    assert torch.allclose(counts, expected, atol=4 * math.sqrt(0.25 / draws))  # 4 sigma


def test_a_duplicate_caption_is_never_drawn_as_a_negative():
    """A sample whose caption equals the row's makes a matched pair with it: skipped, unless it is all there is."""
    sim = torch.tensor([[0.0, 9.0, 9.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    gumbel = -torch.log(-torch.log(torch.rand(2000, 2, 4, generator=g)))
    same = torch.tensor([[True, True, True, False], [True, True, True, True]])  # row 1: every candidate is a twin
    picked = torch.stack([hard_negatives(sim, torch.tensor([0, 0]), noise, same) for noise in gumbel])  # [2000, 2]
    assert set(picked[:, 0].tolist()) == {3}
    assert set(picked[:, 1].tolist()) == {1, 2, 3}  # falls back to "anything but its own"
    # in a batch where each twin is by far the likeliest draw for the other, ITM still matches the reference that
    # skips twins
    image_tokens, text_tokens, ids, image_features, text_features, scale, gumbel = inputs()
    image_features[4], image_features[0] = text_features[0], text_features[4]
    text_features[4], text_features[0] = image_features[0].clone(), image_features[4].clone()
    scale = torch.tensor(60.0, dtype=torch.float64)
    head = make_head()
    with torch.no_grad():
        fast = itm_logits(head, image_tokens, text_tokens, ids, image_features, text_features, scale, 0, 1, gumbel)
        _, reference = naive_reference(head, image_tokens, text_tokens, ids, image_features, text_features, scale,
                                       gumbel)
    assert close(fast, reference, rtol=1e-9)


def test_itm_logits_ignore_padding_and_packing():
    """The shared encoding's packed and trimmed text passes give the fusion head tokens that differ only past each
    caption's end (zeros, or padding tokens): the ITM logits and every gradient are those of the full padded pass."""
    cfg = ObjectiveConfig(itm={"weight": 1.0, "layers": 1})
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), cfg).double()
    objective = Objective(cfg, World())
    text = open_clip.SimpleTokenizer(context_length=32)(CAPTIONS)
    batch = objective.augment({"image": torch.randn(4, 3, 64, 64, dtype=torch.float64), "text": text}, 0)
    runs = []
    for trim, pack in ((True, True), (True, False), (False, False)):
        model.trim_text, model.pack_text = trim, pack
        model.zero_grad()
        torch.manual_seed(1)                                           # the same negatives in each pass
        out = model(dict(batch))
        loss, losses, report = objective(out, batch, 0)
        loss.backward()
        runs.append((out["itm_logits"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))
        assert "itm" in losses and 0 <= report["itm_accuracy"] <= 1
    (logits, grads) = runs[0]
    assert logits.shape == (4, 3, 2) and any(k.startswith("heads.itm.") for k in grads)
    for other_logits, other_grads in runs[1:]:
        assert close(logits, other_logits, rtol=1e-9)
        assert grads.keys() == other_grads.keys()
        for k in grads:
            assert close(grads[k], other_grads[k], rtol=1e-7), k


def test_itm_config_and_card():
    cfg = ObjectiveConfig(flip={"mask_ratio": 0.5}, itm={"weight": 0.5, "layers": 3})
    assert cfg.itm.layers == 3 and cfg.itm.weight == 0.5
    model = build_model(model_config("tiny"), cfg)
    assert set(model.heads) == {"itm"} and len(model.heads["itm"].cross_blocks) == 3
    assert "image-text matching" in Objective(cfg, World()).units["itm"].card()
    with pytest.raises(ValueError, match="objective.itm.width"):
        ObjectiveConfig(itm={"weight": 1.0, "width": 30, "heads": 4})


# ---- distributed: 2 gloo processes against one process on the concatenated batch --------------------------------

def worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image_tokens, text_tokens, ids, image_features, text_features, scale, gumbel = inputs()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        result = loss_and_grads(make_head(), rank, WORLD, image_tokens[rows], text_tokens[rows], ids[rows],
                                image_features[rows], text_features[rows], scale, gumbel[:, rows])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Each rank draws its negatives from the gathered similarities and gathers the negatives' tokens with their
    gradient. Hence: mean of the ranks' losses = global loss; each rank's token gradients = world x the global loss's
    gradient on its rows; the mean over ranks of the head's gradients (DDP's average) = the global loss's gradient."""
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = loss_and_grads(make_head(), 0, 1, *inputs())
    assert close(sum(r["loss"] for r in ranks) / WORLD, ref["loss"], rtol=1e-10)
    for r, part in enumerate(ranks):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        assert close(part["logits"], ref["logits"][rows], rtol=1e-9)
        for key in ("image", "text"):
            assert close(part[key], WORLD * ref[key][rows], rtol=1e-8), key
    for name, grad in ref["head"].items():
        mean = sum(r["head"][name] for r in ranks) / WORLD
        assert close(mean, grad, rtol=1e-8), name
