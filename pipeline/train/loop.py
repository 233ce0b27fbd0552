"""`plait train`: the Accelerate training loop. Reads top to bottom; helpers live in their own modules.

One step: B_local x accum samples from the stream -> objective.augment -> forward_backward (feature-cache
accumulation across micro-batches, gradient sync once) -> clip -> LR from the pure schedule -> AdamW step.
Processes hold the whole model (DDP) or shards of it (FSDP, train.strategy: pipeline/train/sharded_state.py); the
checkpoints are the same either way.

RUN_DIR holds config.toml (resolved), metrics.jsonl + tensorboard/ (train and eval records; the trackers of
train.report_to get them too: pipeline/train/metrics.py), checkpoints/
(pipeline/train/checkpoint.py), and at the end report.json with loss.png, throughput.png, eval.png.
Exit status: 0 done (or out of train.max_time_s, checkpointed), 75 checkpointed on SIGTERM/SIGUSR1 (requeue and
resume with --resume auto), 2 bad input (via the plait CLI).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import tomli_w
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from torch import nn
from tqdm import tqdm

from pipeline.train import metrics
from pipeline.train import elastic, sharded_state
from pipeline.train import evals as train_eval
from pipeline.train.accumulate import concat_batches, forward_backward
from pipeline.train.checkpoint import Checkpointer
from pipeline.config import Config, TrainConfig, describe, load_config, save_config, to_dict
from pipeline.data.loader import TrainStream, closing_streams
from pipeline.train.distributed import World, print0
from pipeline.models.model import build_model
from pipeline.artifacts.pretrained import resolved_model_config, start_from
from pipeline.models.towers import count_parameters, tokenizer_for
from pipeline.objectives.combined import Objective, clamp_logit_scale
from pipeline.train.optim import build_optimizer, lr_at, schedule_signature, set_lr
from pipeline.train.preemption import EXIT_REQUEUE, StopFlag, StopPolicy, restoring_signals
from pipeline.train.report import write_report
from pipeline.train.state import GradScalerState, ModelAndOptimizer, RNGState, RunState, TrainState
from pipeline.data.transforms import image_transform


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerate's DDP (gloo on CPU, NCCL on GPU) or FSDP2 (pipeline/train/sharded_state.py), with the run's precision,
    an explicit process-group timeout and the trackers of train.report_to (TensorBoard in RUN_DIR/tensorboard/)."""
    plugin = sharded_state.fsdp_plugin() if sharded_state.wants_fsdp(cfg.strategy) else None
    launch_env = os.environ.get(sharded_state.LAUNCH_FSDP_ENV)
    accelerator = Accelerator(cpu=cfg.device == "cpu",
                              mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                              fsdp_plugin=plugin, log_with=metrics.check_trackers(cfg.report_to),
                              project_config=ProjectConfiguration(project_dir=cfg.run_dir,
                                                                  logging_dir=str(Path(cfg.run_dir) / "tensorboard")),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s))])
    if launch_env is None:  # Accelerate records a given plugin in the environment: a later run must not inherit it
        os.environ.pop(sharded_state.LAUNCH_FSDP_ENV, None)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("plait train runs DDP or FSDP; the accelerate launch config asks for DeepSpeed, whose "
                         "checkpoints plait does not read or write")
    if plugin is not None and not sharded_state.enable(accelerator, plugin):
        accelerator.print("plait train: FSDP shards over several processes; this single process trains unsharded")
    if cfg.precision == "fp16" and accelerator.scaler is None:
        # Accelerate 1.15 silently trains fp32 when asked for fp16 on CPU (no autocast, no scaler), although
        # torch's CPU autocast has float16 and GradScaler("cpu") exists: turn on both, as Accelerate does on GPU.
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler(accelerator.device.type)
    return accelerator


def optimizer_step(accelerator: Accelerator, model, optimizer, lr: float, grad_clip: float,
                   want_norm: bool) -> float | None:
    """Clip (unscaling fp16 gradients first), set the LR, step, zero the gradients; the norm when asked."""
    norm = None
    if grad_clip or want_norm:
        norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip or float("inf")))
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Parts:
    """What a run builds once, before its first step."""
    accelerator: Accelerator
    world: World
    model: nn.Module
    """As prepared (DDP wrapper, torch.compile): forward and backward go through it."""
    core: nn.Module
    """The unwrapped PlaitModel: checkpoints, evaluation, the logit-scale clamp."""
    optimizer: torch.optim.Optimizer
    objective: Objective
    stream: TrainStream
    tokenize: Callable
    model_cfg: dict
    state: RunState
    """Everything a checkpoint saves and a resume restores."""
    global_batch: int


def build_parts(cfg: Config, accelerator: Accelerator, world: World, resuming: Path | None) -> Parts:
    """The model (the same initial weights on every rank; afterwards each rank draws its own masks), its
    optimizer and objective, the data stream and the run's restartable state. When `resuming` a checkpoint,
    pretrained weights are not loaded: the checkpoint has the weights."""
    set_seed(cfg.train.seed)
    model_cfg = resolved_model_config(cfg.model, resuming)
    model = build_model(model_cfg, cfg.objective)
    started_from = start_from(model, cfg.model, model_cfg, load_weights=resuming is None)  # pretrained weights, locks
    if started_from:
        print0(world, f"plait train: {started_from}")
    if cfg.model.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    promoted = sharded_state.prepare_model(accelerator, model, cfg.train.compile)  # () unless FSDP
    set_seed(cfg.train.seed + world.rank)
    objective = Objective(cfg.objective, world, total_steps=cfg.train.steps)
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.train.compile:
        model = torch.compile(model)
    # The loader is never passed through prepare(): it already splits shards by rank and worker. Nor is an LR
    # scheduler (see optim.set_lr).
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model, keep_torch_compile=False)
    tokenize = tokenizer_for(model_cfg)
    stream = TrainStream(cfg.data, world, image_transform(model_cfg, is_train=True), tokenize,
                         with_keys=cfg.data.log_keys)
    global_batch = cfg.data.batch_size * cfg.train.accum_steps * world.world_size
    trainer = TrainState(world_size=world.world_size, schedule=schedule_signature(cfg.optim, cfg.train.steps),
                         model_cfg=model_cfg, config_text=tomli_w.dumps(to_dict(cfg)), global_batch=global_batch)
    weights = ModelAndOptimizer(core, optimizer.optimizer, promoted, sharded_state.is_sharded(accelerator),
                                world.rank)
    state = RunState(trainer, weights, shared={"grad_scaler": GradScalerState(accelerator.scaler)},
                     per_rank={"rng": RNGState(cfg.train.seed, world.rank), "loader": stream})
    return Parts(accelerator, world, model, core, optimizer, objective, stream, tokenize, model_cfg, state,
                 global_batch)


def describe_run(parts: Parts, cfg: Config) -> str:
    accum, sharded = cfg.train.accum_steps, sharded_state.is_sharded(parts.accelerator)
    return (f"plait train: {count_parameters(parts.core) / 1e6:.1f}M parameters, {parts.stream.num_samples} "
            f"samples, {parts.world.world_size} process(es) on {parts.accelerator.device}"
            + (" (FSDP)" if sharded else "") + f", global batch {parts.global_batch}"
            + (f" ({accum} accumulated micro-batches)" if accum > 1 else ""))


def train_step(parts: Parts, cfg: Config, batches: Iterator[dict], step: int, want_norm: bool) -> dict:
    """One optimizer step on accum_steps micro-batches; the loss, its parts, the LR, timings (and grad norm)."""
    t_fetch = time.perf_counter()
    micro = [next(batches) for _ in range(cfg.train.accum_steps)]
    if cfg.data.log_keys:  # data.log_keys: which samples this step trains on, with the epoch each came from
        epochs_and_keys = [(b.pop("__epoch__"), b.pop("__key__")) for b in micro]
        log_keys(Path(cfg.train.run_dir), parts.world.rank, step + 1,
                 [(epoch, k) for epoch, keys in epochs_and_keys for k in keys])
    batch = concat_batches(micro)
    batch = {k: v.to(parts.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    t_compute = time.perf_counter()
    batch = parts.objective.augment(batch, step)
    loss, losses, report = forward_backward(parts.model, parts.objective, batch, step, cfg.train.accum_steps,
                                            parts.accelerator)
    lr = lr_at(step, cfg.optim, cfg.train.steps)
    grad_norm = optimizer_step(parts.accelerator, parts.model, parts.optimizer, lr, cfg.optim.grad_clip, want_norm)
    clamp_logit_scale(parts.core.clip, cfg.objective.max_logit_scale)
    return {"loss": loss, "losses": losses, "report": report, "lr": lr, "grad_norm": grad_norm,
            "wait_s": t_compute - t_fetch, "total_s": time.perf_counter() - t_fetch}


def log_keys(run_dir: Path, rank: int, step: int, keys: list[tuple[int, str]]) -> None:
    folder = run_dir / "keys"
    folder.mkdir(exist_ok=True)
    with open(folder / f"rank-{rank:05d}.txt", "a") as f:
        f.writelines(f"{step} {epoch} {key}\n" for epoch, key in keys)


def train_record(parts: Parts, out: dict, window: metrics.Window, elapsed_s: float) -> dict:
    """The metrics record of a logged step. Each rank's loss covers its rows against all columns: the mean over
    ranks is the global loss."""
    trainer, names = parts.state.trainer, list(out["losses"])
    values = parts.accelerator.reduce(torch.stack([out["loss"], *(out["losses"][k] for k in names)]).float(), "mean")
    return {"kind": "train", "step": trainer.step, "samples_seen": trainer.samples_seen, "elapsed_s": elapsed_s,
            "loss": values[0].item(), **{f"loss/{k}": v.item() for k, v in zip(names, values[1:])},
            **out["report"], "lr": out["lr"], "grad_norm": out["grad_norm"],
            **window.summary(parts.world.world_size),
            **{f"data/{k}": v for k, v in parts.stream.counters().items()}}


def evaluate(parts: Parts, cfg: Config, log: metrics.MetricsLog) -> dict:
    """Evaluation on eval.* data, sharded over the ranks (pipeline/train/evals.py); logged at the current step."""
    with sharded_state.gathered_params(parts.core):
        result = train_eval.evaluate_all(parts.core.clip, parts.tokenize, cfg.eval,
                                         image_transform(parts.model_cfg, is_train=False),
                                         parts.accelerator.device, parts.world)
    fields = train_eval.log_fields(result)
    step = parts.state.trainer.step
    log.write({"kind": "eval", "step": step, **fields})
    print0(parts.world, f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in fields.items()))
    return result


def train_loop(parts: Parts, cfg: Config, checkpointer: Checkpointer, batches: Iterator[dict],
               log: metrics.MetricsLog, policy: StopPolicy) -> str | None:
    """Steps until train.steps or a stop; returns why it stopped early ('signal', 'max_time_s') or None."""
    trainer, world, train = parts.state.trainer, parts.world, cfg.train
    interactive = world.is_main and sys.stdout.isatty()
    window, started = metrics.Window(), time.monotonic()
    with tqdm(total=train.steps, initial=trainer.step, disable=not interactive, desc="train", unit="step") as bar:
        while trainer.step < train.steps:
            logging_now = (trainer.step + 1) % train.log_every == 0 or trainer.step + 1 == train.steps
            out = train_step(parts, cfg, batches, trainer.step, want_norm=logging_now)
            trainer.advance(parts.global_batch)
            window.add(samples=parts.global_batch, wait_s=out["wait_s"], total_s=out["total_s"])
            bar.update(1)
            if logging_now:
                record = train_record(parts, out, window, time.monotonic() - started)
                log.write(record)
                if interactive:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
                else:
                    print0(world, f"step {trainer.step}/{train.steps} loss {record['loss']:.4f} lr {out['lr']:.3g} "
                                  f"{record['samples_per_s']:.0f} samples/s")
                window = metrics.Window()
            if (train.eval_every and trainer.step % train.eval_every == 0 and trainer.step < train.steps
                    and train_eval.enabled(cfg.eval)):  # the final evaluation follows the loop
                evaluate(parts, cfg, log)
            if trainer.step == train.steps:
                return None  # done: a signal now changes nothing (the final checkpoint follows)
            # Every rank agrees on stopping at this step boundary, so the checkpoint covers the same step everywhere.
            stopped = policy.check()
            if stopped or (train.checkpoint_every and trainer.step % train.checkpoint_every == 0):
                checkpointer.save(trainer.step, parts.state, world.rank, parts.accelerator.wait_for_everyone)
            if stopped:
                print0(world, f"stopping at step {trainer.step} ({stopped}); checkpoint saved")
                return stopped
    return None


def run(cfg: Config, resume: str | None = None) -> dict:
    """Trains per `cfg`; returns the final report (also written to RUN_DIR/report.json)."""
    stop_flag = StopFlag()  # first: a SIGTERM during start-up must not kill the job uncheckpointed
    accelerator = build_accelerator(cfg.train)
    world = World.from_accelerator(accelerator)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(run_dir, cfg.train.keep_last, cfg.train.remote_dir)
    if resume == "auto" and checkpointer.remote is not None:
        if world.is_main:
            checkpointer.fetch_latest()  # the remote copy's newest, when no local checkpoint is as new
        accelerator.wait_for_everyone()
    resume_from = checkpointer.resolve(resume)
    if resume_from is not None:  # on another world size: the accumulation that keeps the global batch
        cfg, note = elastic.keep_global_batch(cfg, torch.load(resume_from / "trainer.pt", weights_only=True),
                                              world.world_size)
        if note:
            print0(world, f"plait train: {note}")
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")
    parts = build_parts(cfg, accelerator, world, resume_from)
    print0(world, describe_run(parts, cfg))
    trainer = parts.state.trainer
    if resume_from is not None:
        checkpointer.restore(resume_from, parts.state, world.rank)
        print0(world, f"resumed from {resume_from} at step {trainer.step}")

    log = metrics.MetricsLog(run_dir, accelerator, enabled=world.is_main)
    trainer.tracker_runs = log.start_trackers(to_dict(cfg), continuing=trainer.tracker_runs)
    batches = iter(parts.stream)
    started = time.monotonic()
    try:
        stopped = train_loop(parts, cfg, checkpointer, batches, log,
                             StopPolicy(stop_flag, cfg.train.max_time_s, accelerator.device))
        batches.close()  # the loader's workers end here (on an exception, in `finally`)
        if trainer.step >= cfg.train.steps and (trainer.resumed_step is None or trainer.step > trainer.resumed_step):
            checkpointer.save(trainer.step, parts.state, world.rank, accelerator.wait_for_everyone)
        exit_code = EXIT_REQUEUE if stopped == "signal" else 0
        result = {"steps": trainer.step, "samples_seen": trainer.samples_seen, "wall_s": time.monotonic() - started,
                  "exit_code": exit_code, "stopped": stopped, "checkpoint": str(checkpointer.latest())}
        if exit_code == 0 and train_eval.enabled(cfg.eval):
            result.update(evaluate(parts, cfg, log))
        if world.is_main:
            result = write_report(run_dir, result)
    finally:
        batches.close()  # idempotent; on an exception the workers must not keep the process alive
        stop_flag.restore()
    # Every rank leaves together and the process group is destroyed: a rank exiting early left its peer in a
    # 300 s exit barrier.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain image-text towers (open_clip architectures) on WebDataset shards with Accelerate.",
        epilog=f"Exit status: 0 done, {EXIT_REQUEUE} checkpointed on SIGTERM/SIGUSR1 (requeue me and resume with "
               "--resume auto), 2 bad input.\nConfig keys (--set section.key=value):\n" + "\n".join(describe()))
    parser.add_argument("--config", help="preset name (tiny, demo, clip-vit-b32-gpu, flip-mae-vit-b16-4node) or TOML file; defaults apply to missing keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=5e-4 (repeatable)")
    parser.add_argument("--resume", metavar="auto|CKPT",
                        help="auto: the newest complete checkpoint of train.run_dir, if any; or a checkpoint dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # Whatever ends the run: the loader's workers (which ignore SIGTERM) stop, the signal handlers go back.
    with closing_streams(), restoring_signals():
        result = run(cfg, args.resume)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
