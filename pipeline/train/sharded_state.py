"""FSDP for large models, and whole (unsharded) state dicts under any strategy, so checkpoints keep one layout.

FSDP is Accelerate's FSDP2 (torch `fully_shard`): per-parameter sharding keeps parameter names and objects, so the
optimizer's weight-decay groups (pipeline/train/optim.py) work unchanged. Each open_clip residual attention block is its
own unit (gathered for its forward, resharded after); the rest of the model forms the root unit.

Checkpoints hold the whole model and optimizer state keyed by parameter name, whatever wrote them:
`torch.distributed.checkpoint.state_dict` gathers them on save (a collective under FSDP) and scatters them on load,
so a checkpoint written under FSDP resumes under FSDP or DDP and exports like any other.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType
from torch import nn

# Set by `accelerate launch` with a config whose distributed_type is FSDP.
LAUNCH_FSDP_ENV = "ACCELERATE_USE_FSDP"


def wants_fsdp(strategy: str) -> bool:
    """FSDP when the config asks for it (train.strategy) or the accelerate launch config does."""
    return strategy == "fsdp" or os.environ.get(LAUNCH_FSDP_ENV, "false").lower() == "true"


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """FSDP2, full sharding (parameters resharded after each unit's forward), one unit per transformer block.

    Options left unset here (CPU offload, activation checkpointing, ...) still come from an accelerate launch
    config's FSDP_* variables. The block classes are filled in per model by `prepare_model`.
    """
    previous = os.environ.get("FSDP_VERSION")
    if previous not in (None, "2") and os.environ.get("RANK", "0") == "0":
        print(f"plait: the accelerate config asks for FSDP version {previous}; plait runs FSDP2 "
              "(FSDP1's flat parameters and device placement do not fit its checkpoints and CPU runs)", flush=True)
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                          auto_wrap_policy="transformer_based_wrap")


def enable(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> bool:
    """Makes `accelerator` shard with `plugin` when there is more than one process; False when it cannot.

    Accelerate 1.15 turns FSDP on only for GPU-like distributed types, while torch's FSDP2 also runs on CPU over
    gloo; a CPU run with several processes switches the state itself, then takes Accelerate's own FSDP2 path.
    """
    if accelerator.num_processes == 1:
        return False  # nothing to shard over; plain (unwrapped) training
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        # Mirrored into PartialState as Accelerate does itself: every later AcceleratorState() copies it from there.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
    return state.distributed_type == DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def block_class_names(model: nn.Module) -> list[str]:
    """open_clip's transformer block classes present in `model` (ResidualAttentionBlock and its variants)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("ResidualAttentionBlock")})


def prepare_model(accelerator: Accelerator, model: nn.Module, compile: bool = False) -> tuple[str, ...]:
    """Readies `model` for FSDP before its optimizer is built; returns the names of the promoted parameters.

    fully_shard cannot shard 0-dim parameters (open_clip's logit_scale, SigLIP's logit_bias): they become 1-element
    vectors here (broadcasting keeps every use of them valid) and go back to 0-dim in every state dict we write.
    """
    if not is_sharded(accelerator):
        return ()
    if compile:
        raise ValueError("config key 'train.compile': not supported with FSDP (Accelerate's FSDP2 shards the "
                         "module before compiling it); set train.compile=false or use train.strategy=ddp")
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = block_class_names(model)
    promoted = []
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            promoted.append(name)
    return tuple(promoted)


def _reshape_promoted(model_state: dict, optim_state: dict, promoted: tuple[str, ...], shape: tuple) -> None:
    """In place: promoted parameters (and their Adam moments) to `shape`; AdamW's own 0-dim `step` is left alone."""
    for name in promoted:
        if name in model_state:
            model_state[name] = model_state[name].reshape(shape)
        for key, value in optim_state.get("state", {}).get(name, {}).items():
            if key != "step" and torch.is_tensor(value) and value.numel() == 1:
                optim_state["state"][name][key] = value.reshape(shape)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer,
                     promoted: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(model state, optimizer state): whole, on CPU, keyed by parameter name without wrapper prefixes.

    A collective under FSDP (call it on every rank); complete on rank 0, possibly empty on the others.
    `model` is the unwrapped module (the FSDP root itself under FSDP2), `optimizer` a torch optimizer.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # 1 s: not at start-up
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _reshape_promoted(model_state, optim_state, promoted, ())
    return model_state, optim_state


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optim_state: dict, promoted: tuple[str, ...] = (), from_rank0: bool = False) -> None:
    """The inverse of `full_state_dicts`. With `from_rank0` (FSDP) only rank 0 passes the states (the others pass
    empty dicts): rank 0 broadcasts them and every rank keeps its shards, so one process reads the files."""
    if optim_state.get("state") and all(isinstance(k, int) for k in optim_state["state"]):
        # Written before optimizer states were keyed by name (positional ids): only an unsharded run reads it.
        if promoted:
            raise ValueError("this checkpoint predates FSDP support (optimizer state by position): "
                             "resume it with train.strategy=ddp")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    if promoted and model_state:  # copies: the caller's dicts keep the documented 0-dim shapes
        model_state = dict(model_state)
        optim_state = {**optim_state, "state": {k: dict(v) for k, v in optim_state["state"].items()}}
        _reshape_promoted(model_state, optim_state, promoted, (1,))
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


@contextmanager
def gathered_params(model: nn.Module):
    """The whole model gathered on every rank for the duration (a no-op without FSDP).

    Evaluation shards the held-out data over the ranks, so ranks run different numbers of forwards: with FSDP's
    per-unit all-gathers inside each forward they would wait on each other for ever. Gathered once up front, with
    resharding after forward off, the forwards run without collectives. It costs the unsharded weights on each
    rank (no gradients, no optimizer state), like FSDP1's summon_full_params.
    """
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units and units[0] is model:
        # FSDP2 picks its root at the first forward through it (idempotent after). Before any training step
        # (evaluating a resumed, finished run) a block's forward would otherwise make each block a root of its own,
        # and later training forwards would fail. torch has no public call for this.
        model._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            if unit is not model:  # the root keeps FSDP's own choice (it never reshards after forward)
                unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()
