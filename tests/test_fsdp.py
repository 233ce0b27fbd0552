"""FSDP (Accelerate's FSDP2) on CPU with 2 gloo processes: the same training and evaluation as DDP, checkpoints in
the one documented layout (whole model, optimizer state by name) that resume under FSDP after a stop signal, load
unsharded and export.

The `plait train` runs are the real CLI in subprocesses (tests/helpers/train_cli.py); the state-dict test runs
the loop's own helpers in 2 spawned processes and compares against DTensor.full_tensor() gathers.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from safetensors.torch import load_file

from data_prep.input.sources import FASHION_MNIST_CLASSES as CLASSES
from tests.helpers.tolerance import assert_close

from tests.helpers.micro_clip import MICRO_CFG, micro_batch
from tests.helpers.train_cli import finish, records, shards, spawn, train_args, wait_for_step  # noqa: F401 (shards)

STEPS = 8
COMMON = (f"train.steps={STEPS}", "train.checkpoint_every=4", "train.keep_last=3", "optim.warmup_steps=2",
          "data.batch_size=8", "data.num_workers=0", "optim.grad_clip=1.0", "train.eval_every=4",
          "eval.batch_size=32", "eval.max_samples=64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(run_dir, shards, *overrides) -> list[str]:
    return train_args(run_dir, shards, *COMMON, f"eval.zeroshot_shards={shards['test']}",
                      f"eval.classnames={json.dumps(CLASSES)}", *overrides)


def _train_2(run_dir, shards, *overrides, resume: str | None = None) -> str:
    """`plait train` in 2 gloo processes; rank 0's output."""
    port = _free_port()
    args = _args(run_dir, shards, *overrides) + (["--resume", resume] if resume else [])
    results = [finish(p) for p in [spawn(args, 2, rank, port) for rank in range(2)]]
    assert [code for code, _ in results] == [0, 0], results
    return results[0][1]


def _stop_then_resume(run_dir, shards) -> tuple[int, str]:
    """An FSDP run told to stop (SIGUSR1 to rank 1 alone, as SLURM before a time limit) once past step 2, then
    the requeued run (`--resume auto`); the step it stopped at and the resumed run's output."""
    port = _free_port()
    procs = [spawn(_args(run_dir, shards, "train.strategy=fsdp"), 2, rank, port) for rank in range(2)]
    wait_for_step(run_dir, procs[0], 2)
    procs[1].send_signal(signal.SIGUSR1)
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [75, 75], results
    stopped = int(re.search(r"stopping at step (\d+) \(signal\)", results[0][1]).group(1))
    return stopped, _train_2(run_dir, shards, "train.strategy=fsdp", resume="auto")


def _checkpoint(run_dir, step: int = STEPS) -> Path:
    return run_dir / f"checkpoints/step-{step:08d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards) -> dict:
    """DDP and FSDP over the same 8 steps, and an FSDP run stopped by a signal and resumed."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {"ddp": root / "ddp", "fsdp": root / "fsdp", "resumed": root / "resumed"}
    _train_2(out["ddp"], shards)
    out["fsdp_log"] = _train_2(out["fsdp"], shards, "train.strategy=fsdp")
    out["stopped_at"], out["resumed_log"] = _stop_then_resume(out["resumed"], shards)
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_trains_like_ddp(runs):
    assert "2 process(es) on cpu:0 (FSDP)" in runs["fsdp_log"]
    a, b = records(runs["ddp"]), records(runs["fsdp"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "grad_norm", "logit_scale"):
            assert abs(a[step][key] - b[step][key]) <= 1e-4 * abs(a[step][key]), (step, key)
    assert b[STEPS]["loss"] < b[1]["loss"]  # it trains
    # The periodic evaluation, sharded over the ranks, sees the same model.
    ea, eb = records(runs["ddp"], "eval"), records(runs["fsdp"], "eval")
    assert sorted(eb) == [4, 8] and eb[8]["eval/zeroshot/num_samples"] == ea[8]["eval/zeroshot/num_samples"] > 0
    for s in (4, 8):  # near-identical weights: at most one borderline sample may flip
        num_samples = eb[s]["eval/zeroshot/num_samples"]
        assert abs(ea[s]["eval/zeroshot/top1"] - eb[s]["eval/zeroshot/top1"]) <= 1 / num_samples

    # The documented layout: the whole model with open_clip's 0-dim logit_scale, optimizer state by name.
    wa, wb = (load_file(_checkpoint(runs[k]) / "model.safetensors") for k in ("ddp", "fsdp"))
    assert wa.keys() == wb.keys() and wb["clip.logit_scale"].shape == torch.Size([])
    for name in wa:
        # Adam's update has the same size for any gradient: float noise in tiny gradients moves weights by a
        # fraction of the step, i.e. of a tensor's scale for a bias that started at 0
        assert_close(wb[name], wa[name], rtol=1e-4, scale_rtol=1e-3, name=name)
    oa, ob = (torch.load(_checkpoint(runs[k]) / "optimizer.pt", weights_only=True)["optimizer"]
              for k in ("ddp", "fsdp"))
    assert set(oa["state"]) == set(ob["state"]) and "clip.logit_scale" in ob["state"] and set(ob["state"]) <= set(wb)
    for name, moments in ob["state"].items():
        for key, value in moments.items():
            assert_close(value, oa["state"][name][key], rtol=1e-3, name=f"{name}.{key}")


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_trains_the_masked_heads_like_ddp(tmp_path, shards):
    """FLIP + CrossMAE + MLM (sampled softmax): the decoder's cross-attention blocks are shard units of their own
    and the MLM pass reads the token embedding's rows directly; per-step losses match DDP's."""
    heads = ("objective.flip_mask_ratio=0.5", "objective.mae=0.5", "objective.mae_decoder=cross",
             "objective.mae_decoder_width=32", "objective.mae_decoder_layers=1", "objective.mlm=0.5",
             "objective.mlm_candidates=64", "train.eval_every=0")
    _train_2(tmp_path / "ddp", shards, *heads)
    log = _train_2(tmp_path / "fsdp", shards, *heads, "train.strategy=fsdp")
    assert "(FSDP)" in log
    a, b = records(tmp_path / "ddp"), records(tmp_path / "fsdp")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "loss/mae", "loss/mlm", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-4 * abs(a[step][key]), (step, key)


@pytest.mark.dist
@pytest.mark.slow
def test_stop_on_signal_then_resume_under_fsdp_reproduces_the_uninterrupted_run(runs):
    stopped = runs["stopped_at"]
    assert 2 <= stopped < STEPS and "resumed from" in runs["resumed_log"]
    assert f"step-{stopped:08d} at step {stopped}" in runs["resumed_log"]
    a, b = records(runs["fsdp"]), records(runs["resumed"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']} vs {b[step]['loss']}"
    wa, wb = (load_file(_checkpoint(runs[k]) / "model.safetensors") for k in ("fsdp", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_checkpoint_loads_unsharded_and_exports_to_open_clip(runs, tmp_path):
    from pipeline.train import sharded_state
    from pipeline.train.checkpoint import Checkpointer
    from pipeline.config import ObjectiveConfig, OptimConfig
    from pipeline.models.model import build_model
    from pipeline.train.optim import build_optimizer

    # One plain process (what a DDP rank does on resume) takes the model and the optimizer state by name.
    ckpt = _checkpoint(runs["fsdp"])
    state = Checkpointer.load(ckpt, 0)
    model = build_model(json.loads(state["trainer"]["model_cfg"]), ObjectiveConfig())
    optimizer = build_optimizer(model, OptimConfig())
    sharded_state.load_full_state_dicts(model, optimizer, state["model"], state["optim"]["optimizer"])
    for name, value in model.state_dict().items():
        if name in state["model"]:
            assert torch.equal(value, state["model"][name]), name
    index = {p: n for n, p in model.named_parameters()}
    for param, moments in optimizer.state.items():
        assert torch.equal(moments["exp_avg"], state["optim"]["optimizer"]["state"][index[param]]["exp_avg"])

    import plait
    exported = tmp_path / "export"
    assert plait.main(["export", str(ckpt), "--format", "open_clip", "--out", str(exported)]) == 0
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    weights = loaded.state_dict()
    for name, value in state["model"].items():
        if name.startswith("clip."):
            assert torch.equal(weights[name[len("clip."):]], value), name


def _state_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from pipeline.train import sharded_state
    from pipeline.train.accumulate import forward_backward
    from pipeline.config import ObjectiveConfig, OptimConfig, TrainConfig
    from pipeline.train.distributed import World
    from pipeline.models.model import build_model
    from pipeline.objectives.combined import Objective
    from pipeline.train.optim import build_optimizer
    from pipeline.train.loop import build_accelerator, optimizer_step

    # FSDP asked for by the launcher (train.strategy stays ddp): the environment `accelerate launch` sets from an
    # FSDP1 config (FSDP1-only options are dropped, the wrap class comes from the model, FSDP2 runs).
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1", FSDP_BACKWARD_PREFETCH="BACKWARD_PRE",
                      FSDP_USE_ORIG_PARAMS="true", FSDP_SYNC_MODULE_STATES="true",
                      FSDP_CPU_RAM_EFFICIENT_LOADING="true", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                      FSDP_TRANSFORMER_CLS_TO_WRAP="BertLayer",
                      FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT")
    accelerator = build_accelerator(TrainConfig(device="cpu", timeout_s=120))
    assert sharded_state.is_sharded(accelerator)
    objective = Objective(ObjectiveConfig(), World.from_accelerator(accelerator))

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = build_model(dict(MICRO_CFG), ObjectiveConfig())
        promoted = sharded_state.prepare_model(accelerator, model)
        model, optimizer = accelerator.prepare(model, build_optimizer(model, OptimConfig(lr=2e-3)))
        return model, optimizer, promoted

    def gathered(model) -> dict:  # every parameter gathered by DTensor itself, 1-element vectors back to 0-dim
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in
                model.named_parameters()}

    model, optimizer, promoted = fresh(0)
    assert promoted == ("clip.logit_scale",)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    for step in range(3):
        batch = {k: v[rank * 4:(rank + 1) * 4] for k, v in micro_batch(8, seed=step).items()}
        forward_backward(model, objective, batch, step, 1, accelerator)
        optimizer_step(accelerator, model, optimizer, 2e-3, 1.0, False)
    reference = gathered(model)
    model_state, optim_state = sharded_state.full_state_dicts(model, optimizer.optimizer, promoted)
    if rank == 0:
        assert set(model_state) >= set(reference)
        for name, value in reference.items():
            assert torch.equal(model_state[name], value.reshape(model_state[name].shape)), name
        assert model_state["clip.logit_scale"].ndim == 0
    else:
        assert model_state == {}  # gathered on rank 0 only: the others hold no full copy

    # Scatter into a differently initialised FSDP model: the same weights and optimizer state everywhere.
    model2, optimizer2, _ = fresh(1)
    sharded_state.load_full_state_dicts(model2, optimizer2.optimizer, model_state if rank == 0 else {},
                                        optim_state if rank == 0 else {}, promoted, from_rank0=True)
    for name, value in gathered(model2).items():
        assert torch.equal(value, reference[name]), name
    state2 = sharded_state.full_state_dicts(model2, optimizer2.optimizer, promoted)[1]
    if rank == 0:
        for name, moments in optim_state["state"].items():
            for key, value in moments.items():
                assert torch.equal(state2["state"][name][key], value), (name, key)

    # Evaluation-style calls outside the root's forward see the gathered weights, and training goes on after.
    with sharded_state.gathered_params(model2), torch.no_grad():
        features = model2.clip.encode_image(micro_batch(2)["image"])
    assert torch.isfinite(features).all()
    # (Accelerate's clip_grad_norm_ compares parameter lists of its prepared models: two here, one in the loop.)
    forward_backward(model2, objective, {k: v[:4] for k, v in micro_batch(8).items()}, 3, 1, accelerator)
    optimizer2.step()
    if rank == 0:
        open(out, "w").write("ok")
    accelerator.wait_for_everyone()
    accelerator.end_training()


@pytest.mark.dist
def test_full_state_dicts_gather_and_scatter_the_sharded_state(tmp_path):
    out = tmp_path / "ok"
    mp.start_processes(_state_worker, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    assert out.read_text() == "ok"


def test_positional_optimizer_state_of_older_checkpoints_still_loads_unsharded():
    """Checkpoints written before optimizer states were keyed by name hold `optimizer.state_dict()` (ids)."""
    from pipeline.train import sharded_state
    from pipeline.train.accumulate import forward_backward
    from pipeline.config import ObjectiveConfig, OptimConfig
    from pipeline.train.distributed import World
    from pipeline.models.model import build_model
    from pipeline.objectives.combined import Objective
    from pipeline.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(dict(MICRO_CFG), ObjectiveConfig())
    optimizer = build_optimizer(model, OptimConfig())
    forward_backward(model, Objective(ObjectiveConfig(), World()), micro_batch(4), 0, 1, Accelerator(cpu=True))
    optimizer.step()
    old = optimizer.state_dict()
    assert all(isinstance(k, int) for k in old["state"])
    fresh = build_model(dict(MICRO_CFG), ObjectiveConfig())
    fresh_optimizer = build_optimizer(fresh, OptimConfig())
    sharded_state.load_full_state_dicts(fresh, fresh_optimizer, model.state_dict(), old)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    restored = fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(restored[k]["exp_avg"], v["exp_avg"]) for k, v in old["state"].items())
