"""`plait train`: the Accelerate training loop. Reads top to bottom; helpers live in their own modules.

One step: B_local x accum samples from the stream -> objective.augment -> forward_backward (feature-cache
accumulation across micro-batches, gradient sync once) -> clip -> LR from the pure schedule -> AdamW step.
Processes hold the whole model (DDP) or shards of it (FSDP, train.strategy: pipeline/sharded_state.py); the
checkpoints are the same either way.

RUN_DIR holds config.toml (resolved), metrics.jsonl + tensorboard/ (train and eval records), checkpoints/
(pipeline/checkpoint.py), and at the end report.json with loss.png, throughput.png, eval.png.
Exit status: 0 done (or out of train.max_time_s, checkpointed), 75 checkpointed on SIGTERM/SIGUSR1 (requeue and
resume with --resume auto), 2 bad input (via the plait CLI).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from pipeline import metrics, sharded_state, train_eval
from pipeline.accumulate import concat_batches, forward_backward
from pipeline.checkpoint import Checkpointer, rng_state, set_rng_state
from pipeline.config import Config, TrainConfig, describe, load_config, save_config
from pipeline.data import TrainStream, closing_streams
from pipeline.distributed import World, print0
from pipeline.models.model import build_model
from pipeline.models.pretrained import start_from
from pipeline.models.towers import count_parameters, resolved_model_config, tokenizer_for
from pipeline.objective import Objective, clamp_logit_scale
from pipeline.optim import build_optimizer, check_schedule, lr_at, schedule_signature, set_lr
from pipeline.preemption import EXIT_REQUEUE, StopFlag, StopPolicy, restoring_signals
from pipeline.report import write_report
from pipeline.transforms import image_transform


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerate's DDP (gloo on CPU, NCCL on GPU) or FSDP2 (pipeline/sharded_state.py), with the run's precision
    and an explicit process-group timeout."""
    plugin = sharded_state.fsdp_plugin() if sharded_state.wants_fsdp(cfg.strategy) else None
    launch_env = os.environ.get(sharded_state.LAUNCH_FSDP_ENV)
    accelerator = Accelerator(cpu=cfg.device == "cpu",
                              mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                              fsdp_plugin=plugin,
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


def run(cfg: Config, resume: str | None = None) -> dict:
    """Trains per `cfg`; returns the final report (also written to RUN_DIR/report.json)."""
    stop_flag = StopFlag()  # first: a SIGTERM during start-up must not kill the job uncheckpointed
    accelerator = build_accelerator(cfg.train)
    world = World.from_accelerator(accelerator)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")

    # The same initial weights on every rank; afterwards each rank draws its own masks.
    set_seed(cfg.train.seed)
    resuming = Checkpointer(run_dir, cfg.train.keep_last).resolve(resume)  # then weights come from the checkpoint
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
    core = accelerator.unwrap_model(model, keep_torch_compile=False)  # the PlaitModel: checkpoints, eval
    sharded = sharded_state.is_sharded(accelerator)
    tokenize = tokenizer_for(model_cfg)
    stream = TrainStream(cfg.data, world, image_transform(model_cfg, is_train=True), tokenize)
    accum, local_batch = cfg.train.accum_steps, cfg.data.batch_size * cfg.train.accum_steps
    global_batch = local_batch * world.world_size
    print0(world, f"plait train: {count_parameters(core) / 1e6:.1f}M parameters, {stream.num_samples} samples, "
                  f"{world.world_size} process(es) on {accelerator.device}"
                  + (" (FSDP)" if sharded else "") + f", global batch {global_batch}"
                  + (f" ({accum} accumulated micro-batches)" if accum > 1 else ""))

    checkpointer = Checkpointer(run_dir, cfg.train.keep_last)
    signature = schedule_signature(cfg.optim, cfg.train.steps)
    step, samples_seen, resumed_step = 0, 0, 0
    resume_from = checkpointer.resolve(resume)
    if resume_from is not None:
        # Under FSDP rank 0 alone reads the whole model and optimizer state and broadcasts it.
        state = Checkpointer.load(resume_from, world.rank, whole=world.is_main or not sharded)
        check_schedule(state["trainer"]["schedule"], signature, str(resume_from))
        if state["trainer"]["world_size"] != world.world_size:
            raise ValueError(f"cannot resume {resume_from}: written by {state['trainer']['world_size']} processes, "
                             f"this run has {world.world_size} (the data order depends on the topology)")
        sharded_state.load_full_state_dicts(core, optimizer.optimizer, state["model"], state["optim"]["optimizer"],
                                            promoted, from_rank0=sharded)
        if accelerator.scaler is not None and state["trainer"].get("grad_scaler"):
            accelerator.scaler.load_state_dict(state["trainer"]["grad_scaler"])
        step, samples_seen = state["trainer"]["step"], state["trainer"]["samples_seen"]
        resumed_step = step
        stream.load_state_dict(state["rank"]["loader"])
        set_rng_state(state["rank"]["rng"])
        print0(world, f"resumed from {resume_from} at step {step}")

    def save_checkpoint() -> None:
        checkpointer.write_rank_state(step, world.rank, {"rng": rng_state(), "loader": stream.state_dict()})
        model_state, optim_state = sharded_state.full_state_dicts(core, optimizer.optimizer, promoted)  # collective
        accelerator.wait_for_everyone()
        if world.is_main:
            checkpointer.write_main_state(
                step, model_state, {"optimizer": optim_state},
                {"step": step, "samples_seen": samples_seen, "world_size": world.world_size,
                 "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "schedule": signature, "model_cfg": json.dumps(model_cfg),
                 "config": (run_dir / "config.toml").read_text()})
            checkpointer.publish(step)
        accelerator.wait_for_everyone()

    eval_transform = image_transform(model_cfg, is_train=False)

    def evaluate() -> dict:
        with sharded_state.gathered_params(core):
            result = train_eval.evaluate_all(core.clip, tokenize, cfg.eval, eval_transform, accelerator.device, world)
        fields = train_eval.log_fields(result)
        log.write({"kind": "eval", "step": step, **fields})
        print0(world, f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in fields.items()))
        return result

    log = metrics.MetricsLog(run_dir, enabled=world.is_main)
    policy = StopPolicy(stop_flag, cfg.train.max_time_s, accelerator.device)
    interactive = world.is_main and sys.stdout.isatty()
    progress = tqdm(total=cfg.train.steps, initial=step, disable=not interactive, desc="train", unit="step")
    batches = iter(stream)
    window = metrics.Window()
    stopped = None
    started = time.monotonic()
    while step < cfg.train.steps:
        t_fetch = time.perf_counter()
        batch = concat_batches([next(batches) for _ in range(accum)])
        batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        t_compute = time.perf_counter()

        batch = objective.augment(batch, step)
        loss, losses, report = forward_backward(model, objective, batch, step, accum, accelerator)
        logging_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        grad_norm = optimizer_step(accelerator, model, optimizer, lr, cfg.optim.grad_clip, logging_now)
        clamp_logit_scale(core.clip, cfg.objective.max_logit_scale)

        step += 1
        samples_seen += global_batch
        window.add(samples=global_batch, wait_s=t_compute - t_fetch, total_s=time.perf_counter() - t_fetch)
        progress.update(1)
        if logging_now:
            # Each rank's loss covers its rows against all columns: the mean over ranks is the global loss.
            names = list(losses)
            values = accelerator.reduce(torch.stack([loss, *(losses[k] for k in names)]).float(), "mean")
            record = {"kind": "train", "step": step, "samples_seen": samples_seen,
                      "elapsed_s": time.monotonic() - started, "loss": values[0].item(),
                      **{f"loss/{k}": v.item() for k, v in zip(names, values[1:])}, **report, "lr": lr,
                      "grad_norm": grad_norm, **window.summary(world.world_size),
                      **{f"data/{k}": v for k, v in stream.counters().items()}}
            log.write(record)
            if interactive:
                progress.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            else:
                print0(world, f"step {step}/{cfg.train.steps} loss {record['loss']:.4f} lr {lr:.3g} "
                              f"{record['samples_per_s']:.0f} samples/s")
            window = metrics.Window()
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps
                and train_eval.enabled(cfg.eval)):  # the final evaluation follows the loop
            evaluate()

        if step == cfg.train.steps:
            break  # done: a signal now changes nothing (the final checkpoint follows)
        # Every rank agrees on stopping at this step boundary, so the checkpoint covers the same step everywhere.
        stopped = policy.check()
        if stopped:
            save_checkpoint()
            print0(world, f"stopping at step {step} ({stopped}); checkpoint saved")
            break
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save_checkpoint()
    progress.close()

    if step >= cfg.train.steps and (resume_from is None or step > resumed_step):  # not when resuming a done run
        save_checkpoint()
    exit_code = EXIT_REQUEUE if stopped == "signal" else 0
    result = {"steps": step, "samples_seen": samples_seen, "wall_s": time.monotonic() - started,
              "exit_code": exit_code, "stopped": stopped, "checkpoint": str(checkpointer.latest())}
    if exit_code == 0 and train_eval.enabled(cfg.eval):
        result.update(evaluate())
    if world.is_main:
        result = write_report(run_dir, result)
    log.close()
    stop_flag.restore()
    # Every rank leaves together and the process group is destroyed: a rank exiting early left its peer in a
    # 300 s exit barrier (NOTES.md).
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
