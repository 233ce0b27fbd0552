"""The restartable pieces of a training run, each with `state_dict` / `load_state_dict`.

The checkpointer (pipeline/train/checkpoint.py) only collects them: `RunState` says which file of a checkpoint holds
which object, so a new piece of state is one more entry there, saved and restored by the same code.
Every state dict holds only tensors, numbers, strings, lists and dicts (`torch.load(weights_only=True)`).
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from pipeline.train import sharded_state
from pipeline.train.checkpoint import rng_state, seed_everything, set_rng_state
from pipeline.train.optim import check_schedule


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Progress (step, samples seen) and what a resumed run must share with the one it continues (the process
    count, which fixes the data order, and the LR schedule), plus the run's model config and resolved config
    for exports and the run ids of its experiment trackers. Stored at the top level of trainer.pt, the layout of
    plait's first checkpoints."""
    world_size: int
    schedule: dict
    model_cfg: dict
    config_text: str
    step: int = 0
    samples_seen: int = 0
    resumed_step: int | None = field(default=None, compare=False)
    """The step a resumed run started from (None for a fresh run)."""
    global_batch: int = 0
    """Samples per optimizer step over all processes: what a resume on another world size keeps (elastic.py)."""
    tracker_runs: dict[str, str] = field(default_factory=dict, compare=False)
    """The experiment trackers' run ids (`{"wandb": ..., "mlflow": ...}`, pipeline/train/metrics.py), so that a
    resumed run logs into the same tracker runs."""

    def advance(self, samples: int) -> None:
        self.step += 1
        self.samples_seen += samples

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "world_size": self.world_size,
                "schedule": self.schedule, "model_cfg": json.dumps(self.model_cfg), "config": self.config_text,
                "global_batch": self.global_batch,
                "tracker_runs": dict(self.tracker_runs)}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        check_schedule(state["schedule"], self.schedule, source)
        # Another world size is fine: the run's config already keeps the global batch (elastic.keep_global_batch)
        # and the data order continues on the new topology (the loader's load_elastic).
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.resumed_step = self.step
        # A checkpoint resumed into another run_dir starts a branch: new tracker runs, not the checkpoint's.
        # Checkpoints of plait versions that kept no tracker runs have no key.
        same_run = _run_dir(state.get("config", "")) == _run_dir(self.config_text)
        self.tracker_runs = dict(state.get("tracker_runs", {})) if same_run else {}


def _run_dir(config_text: str) -> str | None:
    """train.run_dir of a resolved config (TOML text)."""
    return tomllib.loads(config_text).get("train", {}).get("run_dir") if config_text else None


class RNGState:
    """This process's torch, numpy, Python and CUDA generators."""

    def __init__(self, seed: int = 0, rank: int = 0):
        self.seed, self.rank = seed, rank

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)

    def load_elastic(self, states: list[dict], step: int) -> None:
        """On another topology the saved streams belong to other ranks: derived afresh from (seed, step, rank),
        so masks and dropout drawn after the resume differ from an uninterrupted run's (deterministically)."""
        seed_everything(hash((self.seed, step, self.rank)) & 0x7FFF_FFFF)


class GradScalerState:
    """The fp16 gradient scaler (None when the run has none); a checkpoint without one leaves it fresh."""

    def __init__(self, scaler: torch.amp.GradScaler | None):
        self.scaler = scaler

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class ModelAndOptimizer:
    """The whole model and AdamW state keyed by parameter name, gathered from (and scattered to) FSDP shards
    when sharded (pipeline/train/sharded_state.py). Both calls are collectives under FSDP: every rank makes them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, promoted: tuple[str, ...],
                 sharded: bool, rank: int):
        self.model, self.optimizer, self.promoted = model, optimizer, promoted
        self.sharded, self.rank = sharded, rank

    @property
    def reads_files(self) -> bool:
        """Under FSDP rank 0 alone reads the files and broadcasts; otherwise every rank reads them."""
        return self.rank == 0 or not self.sharded

    def state_dict(self) -> dict:
        model_state, optim_state = sharded_state.full_state_dicts(self.model, self.optimizer, self.promoted)
        return {"model": model_state, "optimizer": optim_state}

    def load_state_dict(self, state: dict) -> None:
        sharded_state.load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"],
                                            self.promoted, from_rank0=self.sharded)


@dataclass
class RunState:
    """A run's restartable objects, by the checkpoint file that holds them."""
    trainer: TrainState
    """trainer.pt, top level; restored first, so a mismatched run is refused before anything is loaded."""
    weights: ModelAndOptimizer
    """model.safetensors and optimizer.pt."""
    shared: dict[str, Stateful] = field(default_factory=dict)
    """trainer.pt, one key each: state every rank shares, written by the main rank."""
    per_rank: dict[str, Stateful] = field(default_factory=dict)
    """rank-NNNNN.pt, one key each: state each process keeps for itself."""
