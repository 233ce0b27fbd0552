"""Captioning's loss against a naive float64 reference (values and gradients), the shared encoding's packed and
trimmed text against the full padded pass, and 2 gloo ranks against one process on the whole batch."""
from __future__ import annotations

import os

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models.caption_head import build_decoder, caption_logits, last_logits
from pipeline.objectives.caption import Caption, CaptionConfig, caption_loss, caption_outputs
from pipeline.train.distributed import World
from tests.helpers.captioner import model_and_objective
from tests.helpers.tolerance import close

pytestmark = pytest.mark.numeric

torch.set_num_threads(1)

WORLD, PER_RANK = 2, 3
N, T, L, W, V = WORLD * PER_RANK, 5, 8, 16, 50
# rank 0 holds long captions, rank 1 short ones: per-rank means would weight rank 1's tokens more
LENGTHS = [8, 6, 7, 3, 2, 4]                       # tokens per caption, start and end included


def inputs(seed: int = 0):
    """Image tokens [N, T, W], the text tower's tokens [N, L, W] and caption ids [N, L] (start, words < V, end,
    padding 0), in float64."""
    g = torch.Generator().manual_seed(seed)
    image_tokens = torch.randn(N, T, W, generator=g, dtype=torch.float64)
    text_tokens = torch.randn(N, L, W, generator=g, dtype=torch.float64)
    ids = torch.randint(1, V - 1, (N, L), generator=g)
    lengths = torch.tensor(LENGTHS)
    ids[:, 0] = 1
    ids[torch.arange(N), lengths - 1] = V - 1      # end of text: the row's highest id, as the tokenizer's is
    ids[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return image_tokens, text_tokens, ids


def make_decoder():
    torch.manual_seed(0)
    return build_decoder({}, {"context_length": L, "vocab_size": V, "width": W, "heads": 2, "layers": 2}).double()


def naive_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Token by token: log-softmax from its definition (max subtracted), the label's negative log-likelihood mixed
    with the mean over the vocabulary by `smoothing`, padding (0) skipped, the sum over the count."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == 0:
                continue
            x = logits[b, t]
            m = x.max()
            logp = x - m - torch.log(torch.exp(x - m).sum())
            total = total - (1 - smoothing) * logp[y] - smoothing * logp.sum() / x.shape[0]
            count += 1
    return total / count


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_caption_loss_equals_the_naive_reference_values_and_logit_gradients(smoothing):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(N, L - 1, V, generator=g, dtype=torch.float64)).requires_grad_()
    labels = inputs()[2][:, 1:]
    fast = caption_loss(logits, labels, smoothing)
    (fast_grad,) = torch.autograd.grad(fast, logits)
    ref = naive_loss(logits, labels, smoothing)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert close(fast, ref, rtol=1e-12)
    assert close(fast_grad, ref_grad, rtol=1e-10)
    assert (fast_grad[labels == 0] == 0).all()     # padding positions take no gradient
    assert not close(fast, caption_loss(logits, labels, 0.3), rtol=1e-3)  # smoothing is applied


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_decoder_loss_equals_a_per_position_reference_values_and_gradients(smoothing):
    """Teacher forcing in one pass equals decoding each position from its prefix alone (what causality means),
    scored by the naive loss: the loss and its gradients w.r.t. the image tokens, the text tokens and the
    decoder's weights."""
    decoder = make_decoder()
    image_tokens, text_tokens, ids = inputs()
    image_tokens.requires_grad_(), text_tokens.requires_grad_()
    params = list(decoder.parameters())
    fast = caption_loss(caption_logits(decoder, image_tokens, text_tokens), ids[:, 1:], smoothing)
    fast_grads = torch.autograd.grad(fast, [image_tokens, text_tokens, *params])

    rows = []
    for b in range(N):
        rows.append(torch.stack([decoder(image_tokens[b:b + 1], text_tokens[b:b + 1, :t + 1])[0, -1]
                                 for t in range(L - 1)]))      # [L - 1, V], position t from tokens 0..t only
    ref = naive_loss(torch.stack(rows), ids[:, 1:], smoothing)
    ref_grads = torch.autograd.grad(ref, [image_tokens, text_tokens, *params])

    assert close(fast, ref, rtol=1e-10)
    names = ["image_tokens", "text_tokens", *(n for n, _ in decoder.named_parameters())]
    for name, a, b in zip(names, fast_grads, ref_grads):
        assert close(a, b, rtol=1e-8), name
    # a caption's text tokens after its last label take no gradient (they predict nothing scored)
    after = torch.arange(L)[None, :] >= torch.tensor(LENGTHS)[:, None] - 1     # [N, L]
    assert (fast_grads[1][after] == 0).all() and fast_grads[1][~after].abs().sum() > 0


def test_decoding_projects_the_last_position_as_the_full_forward_does():
    decoder = make_decoder()
    image_tokens, text_tokens, _ = inputs()
    with torch.no_grad():
        for length in (1, 4, L):
            assert close(last_logits(decoder, image_tokens, text_tokens[:, :length]),
                         decoder(image_tokens, text_tokens[:, :length])[:, -1], rtol=1e-12), length


def test_packed_trimmed_and_padded_captions_give_the_same_loss_and_gradients():
    """The shared encoding trims the text to the batch's longest caption and packs several captions to a tower
    row (zeros past each end of text): the caption loss and every gradient are those of the full padded pass, and
    of the same captions padded to a longer width."""
    model, objective = model_and_objective()
    model = model.double()
    text = open_clip.SimpleTokenizer(context_length=16)(
        ["a bag", "a pair of black ankle boots on a white floor", "a dress", "a shirt with long sleeves"])
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
             "text": text}
    runs = []
    for trim, pack, width in ((True, True, 16), (True, False, 16), (False, False, 16), (True, True, 13)):
        model.trim_text, model.pack_text = trim, pack
        model.zero_grad()
        b = {**batch, "text": batch["text"][:, :width]}           # width 13: the longest caption has 12 tokens
        out = model(objective.augment(b, 0))
        _, losses, _ = objective(out, b, 0)
        losses["caption"].backward()
        runs.append((losses["caption"].detach(),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    loss, grads = runs[0]
    assert any(k.startswith("heads.caption.") for k in grads) and any(k.startswith("clip.visual.") for k in grads)
    for other_loss, other_grads in runs[1:]:
        assert close(other_loss, loss, rtol=1e-10)
        assert grads.keys() == other_grads.keys()
        for k in grads:
            assert close(other_grads[k], grads[k], rtol=1e-8), k


def test_gradient_accumulation_equals_one_big_batch():
    """Micro-batches trim their text to their own longest caption (here 3 and 12 tokens): the caption unit's
    per-caption outputs concatenate across them, and the accumulated gradients are the whole batch's."""
    from accelerate import Accelerator

    from pipeline.train.accumulate import forward_backward
    text = open_clip.SimpleTokenizer(context_length=16)(
        ["a bag", "a dress", "a pair of black ankle boots on a white floor", "a shirt with long sleeves"])
    batch = {"image": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
             "text": text}
    runs = []
    for accum in (1, 2):
        model, objective = model_and_objective()
        model = model.double()
        loss, losses, _ = forward_backward(model, objective, objective.augment(batch, 0), 0, accum,
                                           Accelerator(cpu=True))
        runs.append((losses["caption"], {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    (whole_loss, whole), (acc_loss, accumulated) = runs
    assert close(acc_loss, whole_loss, rtol=1e-10)
    assert whole.keys() == accumulated.keys() and any(k.startswith("heads.caption.") for k in whole)
    for k in whole:
        assert close(accumulated[k], whole[k], rtol=1e-8), k


# ---- distributed: 2 gloo processes against one process on the whole batch -------------------------------------

def unit_loss_and_grads(world: World, image_tokens, text_tokens, ids):
    """The caption unit's loss on these rows (the text trimmed to their longest caption, as the shared encoding
    does) and its gradients."""
    width = int((ids != 0).sum(1).max())
    ids, text_tokens = ids[:, :width], text_tokens[:, :width].clone().requires_grad_()
    image_tokens = image_tokens.clone().requires_grad_()
    decoder = make_decoder()
    unit = Caption(CaptionConfig(weight=1.0), None)
    unit.bind(world, None)
    outputs = caption_outputs(caption_logits(decoder, image_tokens, text_tokens), ids[:, 1:])
    loss, _ = unit.loss(outputs, {"text": ids}, 0)
    loss.backward()
    return {"loss": loss.detach(), "image": image_tokens.grad, "text": text_tokens.grad,
            "decoder": {n: p.grad.clone() for n, p in decoder.named_parameters()}}


def worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        result = unit_loss_and_grads(World(rank=rank, world_size=WORLD), *(x[rows] for x in inputs()))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow      # ~30 s on 2 shared cores, nearly all of it the two processes' start-up
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Each rank divides its token sum by the mean token count per rank (all-reduced). Hence: mean of the ranks'
    losses = the global loss; each rank's input gradients = world x the global loss's gradient on its rows; the
    mean over ranks of the decoder's gradients (DDP's average) = the global loss's gradient."""
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = unit_loss_and_grads(World(), *inputs())
    assert close(sum(r["loss"] for r in ranks) / WORLD, ref["loss"], rtol=1e-10)
    for r, part in enumerate(ranks):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        width = part["text"].shape[1]
        assert close(part["image"] / WORLD, ref["image"][rows], rtol=1e-8)
        assert close(part["text"] / WORLD, ref["text"][rows, :width], rtol=1e-8)
        assert (ref["text"][rows, width:] == 0).all()
    for name, grad in ref["decoder"].items():
        assert close(sum(r["decoder"][name] for r in ranks) / WORLD, grad, rtol=1e-8), name
    # not trivially equal: the ranks' own token means (open_clip's CoCaLoss) average to another value
    local = [unit_loss_and_grads(World(), *(x[r * PER_RANK:(r + 1) * PER_RANK] for x in inputs()))["loss"]
             for r in range(WORLD)]
    assert not close(sum(local) / WORLD, ref["loss"], rtol=1e-3)
