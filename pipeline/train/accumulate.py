"""One optimizer step's forward and backward passes, with feature-cache gradient accumulation.

Contrastive losses need every negative of the accumulated batch. Accelerate's `accumulate()` only divides each
micro-batch's loss, so negatives come from one micro-batch alone: a different (weaker) objective. Here, like
open_clip's `--accum-freq` and GradCache, a first no-grad pass caches every micro-batch's outputs; a second pass
recomputes one micro-batch at a time with gradients and evaluates the objective on the cached outputs with that
micro-batch's rows live. Summed over micro-batches, the gradients equal one forward/backward over the whole batch
(tested in tests/test_train_accumulate.py), at the cost of one extra forward.

Differences from open_clip's version, and why:
- the RNG state of each micro-batch's first forward is replayed in its second one, so random layers
  (patch dropout) make the same choices in both passes (GradCache's RandContext; open_clip does not);
- outputs that are not per-sample (the logit scale) get 1/accum of their gradient in each pass; open_clip
  counts the logit scale's gradient accum times.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def batch_size_of(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0)


def split_batch(batch: dict, num_chunks: int) -> list[dict]:
    """Equal micro-batches along dim 0; entries that are not per-sample tensors are shared by every chunk."""
    size = batch_size_of(batch)
    if size % num_chunks:
        raise ValueError(f"a local batch of {size} does not split into train.accum_steps={num_chunks} equal parts")
    chunk = size // num_chunks
    return [{k: v[i * chunk:(i + 1) * chunk] if _per_sample(v, size) else v for k, v in batch.items()}
            for i in range(num_chunks)]


def concat_batches(batches: list[dict]) -> dict:
    """The inverse of split_batch: micro-batches from the loader -> one local batch."""
    if len(batches) == 1:
        return batches[0]
    size = batch_size_of(batches[0])
    return {k: torch.cat([b[k] for b in batches]) if _per_sample(v, size) else v for k, v in batches[0].items()}


def _per_sample(value, batch_size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size


def _rng_snapshot() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _rng_restore(snapshot: tuple) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state_all(snapshot[1])


def merge_outputs(cached: list[dict], live: dict, index: int, micro_size: int) -> dict:
    """Outputs of the whole local batch with micro-batch `index` live (differentiable), the rest cached."""
    scale = 1.0 / len(cached)
    merged = {}
    for key, value in live.items():
        if _per_sample(value, micro_size):
            merged[key] = torch.cat([value if j == index else c[key] for j, c in enumerate(cached)])  # [B_local, ...]
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            # Same value, 1/accum of the gradient: summed over the passes, shared outputs get it once.
            merged[key] = value * scale + value.detach() * (1 - scale)
        else:
            merged[key] = value
    return merged


def forward_backward(model, objective, batch: dict, step: int, accum_steps: int, accelerator):
    """Forward + backward of one optimizer step on this rank's `batch` (already augmented, on device).

    Returns the detached `(loss, losses, report)` of the whole batch. Gradients are synchronised across ranks
    once, in the last backward pass.
    """
    if accum_steps == 1:
        with accelerator.autocast():
            outputs = model(batch)
            loss, losses, report = objective(outputs, batch, step)
        accelerator.backward(loss)
        return loss.detach(), {k: v.detach() for k, v in losses.items()}, report

    micro = split_batch(batch, accum_steps)
    micro_size = batch_size_of(micro[0])
    snapshots, cached = [], []
    with torch.no_grad():
        for part in micro:
            snapshots.append(_rng_snapshot())
            with accelerator.autocast():
                cached.append({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in model(part).items()})
    end_state = _rng_snapshot()
    for index, part in enumerate(micro):
        _rng_restore(snapshots[index])
        last = index == accum_steps - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                live = model(part)
                outputs = merge_outputs(cached, live, index, micro_size)
                loss, losses, report = objective(outputs, batch, step)
            accelerator.backward(loss)
    _rng_restore(end_state)
    return loss.detach(), {k: v.detach() for k, v in losses.items()}, report
