"""Distributed losses in 2 gloo processes against one process on the concatenated batch: values and grads.

Each rank returns its share of the loss and backpropagates it alone; the gathers' backward carries gradient
to the rank owning each feature. Hence: mean of the ranks' losses = global loss; each rank's feature gradient
= world x the global loss's gradient on its rows; the mean over ranks of the scale/bias gradients (what DDP's
averaging applies) = the global loss's gradient.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.siglip import SigLipLoss
from tests.helpers.tolerance import close

pytestmark = [pytest.mark.numeric, pytest.mark.dist]

WORLD = 2
PER_RANK = 3


def global_batch():
    g = torch.Generator().manual_seed(0)
    n, d = WORLD * PER_RANK, 8
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(6.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)


def make_loss(kind: str, rank: int, world_size: int):
    if kind == "contrastive":
        return ContrastiveLoss(rank, world_size)
    if kind == "contrastive_same_modality":
        return ContrastiveLoss(rank, world_size, same_modality_negatives=True)
    return SigLipLoss(rank, world_size, exchange=kind.split("_")[1])


def loss_and_grads(kind: str, rank: int, world_size: int, image, text, scale, bias):
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    scale, bias = scale.clone().requires_grad_(), bias.clone().requires_grad_()
    loss_fn = make_loss(kind, rank, world_size)
    loss = loss_fn(image, text, scale, bias) if kind.startswith("siglip") else loss_fn(image, text, scale)
    loss.backward()
    return {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad,
            "bias": bias.grad if bias.grad is not None else torch.zeros(())}


KINDS = ["contrastive", "contrastive_same_modality", "siglip_bidir", "siglip_shift", "siglip_gather"]


def worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        image, text, scale, bias = global_batch()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {kind: loss_and_grads(kind, rank, WORLD, image[rows], text[rows], scale, bias) for kind in KINDS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """One 2-process gloo run computing every loss (process start-up dominates: do it once)."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(kind, rank_results):
    ranks = [r[kind] for r in rank_results]
    ref = loss_and_grads(kind, 0, 1, *global_batch())

    assert close(sum(r["loss"] for r in ranks) / WORLD, ref["loss"], rtol=1e-10)
    for r, part in enumerate(ranks):
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        assert close(part["image"] / WORLD, ref["image"][rows], rtol=1e-8)
        assert close(part["text"] / WORLD, ref["text"][rows], rtol=1e-8)
    for name in ("scale", "bias"):
        assert close(sum(r[name] for r in ranks) / WORLD, ref[name], rtol=1e-8)
    # Not trivially equal: each rank's own loss differs from the global one.
    assert not close(ranks[0]["loss"], ref["loss"], rtol=1e-3)
