"""`plait train`: the Accelerate training loop. Reads top to bottom; helpers live in their own modules."""
from __future__ import annotations

import argparse
import inspect
import json
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from pipeline import metrics
from pipeline.checkpoint import Checkpointer, rng_state, set_rng_state
from pipeline.config import Config, describe, load_config, save_config
from pipeline.data import TrainStream
from pipeline.distributed import World, all_reduce_max, print0
from pipeline.evaluate import zero_shot
from pipeline.models.model import build_model
from pipeline.models.towers import count_parameters, resolved_model_config, tokenizer_for
from pipeline.objective import Objective, clamp_logit_scale
from pipeline.optim import build_optimizer, lr_factor, schedule_signature
from pipeline.transforms import image_transform

# Exit status of a run that checkpointed because it was asked to stop (SIGTERM/SIGUSR1, max_time_s):
# the launcher requeues it. EX_TEMPFAIL from sysexits.h.
EXIT_REQUEUE = 75


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop reads it at step boundaries so every rank stops at the same step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def run(cfg: Config, resume: str | None = None) -> dict:
    """Trains per `cfg`; returns the final report (also written to RUN_DIR/report.json)."""
    accelerator = Accelerator(cpu=cfg.train.device == "cpu",
                              mixed_precision={"fp32": "no"}.get(cfg.train.precision, cfg.train.precision))
    world = World.from_accelerator(accelerator)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")
    set_seed(cfg.train.seed)

    model_cfg = resolved_model_config(cfg.model)
    model = build_model(model_cfg, cfg.objective)
    if cfg.model.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    objective = Objective(cfg.objective, world)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.optim, cfg.train.steps))
    if cfg.train.compile:
        model = torch.compile(model)
    # The loader is never passed through prepare(): it already splits shards by rank and worker.
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    tokenize = tokenizer_for(model_cfg)
    stream = TrainStream(cfg.data, world, image_transform(model_cfg, is_train=True), tokenize)
    print0(world, f"plait train: {count_parameters(model) / 1e6:.1f}M parameters, {stream.num_samples} samples, "
                  f"{world.world_size} process(es), global batch {cfg.data.batch_size * world.world_size}")

    checkpointer = Checkpointer(run_dir, cfg.train.keep_last)
    step, samples_seen = 0, 0
    signature = schedule_signature(cfg.optim, cfg.train.steps)
    resume_from = checkpointer.latest() if resume == "auto" else (Path(resume) if resume else None)
    if resume_from is not None:
        state = Checkpointer.load(resume_from, world.rank)
        if state["trainer"]["schedule"] != signature:
            raise ValueError(f"cannot resume {resume_from}: its LR schedule {state['trainer']['schedule']} differs "
                             f"from this config's {signature}; the LR would jump")
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"]["optimizer"])
        scheduler.load_state_dict(state["optim"]["scheduler"])
        step, samples_seen = state["trainer"]["step"], state["trainer"]["samples_seen"]
        stream.load_state_dict(state["rank"]["loader"])
        set_rng_state(state["rank"]["rng"])
        print0(world, f"resumed from {resume_from} at step {step}")

    def save_checkpoint() -> None:
        checkpointer.write_rank_state(step, world.rank, {"rng": rng_state(), "loader": stream.state_dict()})
        accelerator.wait_for_everyone()
        if world.is_main:
            checkpointer.write_main_state(
                step, accelerator.unwrap_model(model).state_dict(),
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                {"step": step, "samples_seen": samples_seen, "schedule": signature,
                 "model_cfg": json.dumps(model_cfg), "config": (run_dir / "config.toml").read_text()})
            checkpointer.publish(step)
        accelerator.wait_for_everyone()

    # Transitional (objectives issue): PlaitModel.forward moves to forward(batch) and Objective gains augment().
    dict_forward = len(inspect.signature(accelerator.unwrap_model(model).forward).parameters) == 1
    augment = objective.augment if hasattr(objective, "augment") else (lambda batch, step: batch)
    counters = stream.counters if hasattr(stream, "counters") else dict

    log = metrics.MetricsLog(run_dir, enabled=world.is_main)
    stop = StopFlag()
    started = time.monotonic()
    batches = iter(stream)
    progress = tqdm(total=cfg.train.steps, initial=step, disable=not world.is_main, desc="train", unit="step")
    exit_code = 0
    window = metrics.Window()
    while step < cfg.train.steps:
        t_fetch = time.perf_counter()
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
        t_compute = time.perf_counter()

        batch = augment(batch, step)
        with accelerator.autocast():
            outputs = model(batch) if dict_forward else model(batch["image"], batch["text"])
            loss, losses, report = objective(outputs, batch, step)
        accelerator.backward(loss)
        grad_norm = (accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                     if cfg.optim.grad_clip else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(accelerator.unwrap_model(model).clip)

        step += 1
        samples_seen += cfg.data.batch_size * world.world_size
        window.add(samples=cfg.data.batch_size * world.world_size, wait_s=t_compute - t_fetch,
                   total_s=time.perf_counter() - t_fetch)
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            record = {"step": step, "samples_seen": samples_seen, "loss": loss.item(),
                      **{f"loss/{k}": v.item() for k, v in losses.items()}, **report,
                      "lr": scheduler.get_last_lr()[0], **window.summary(world.world_size),
                      **{f"data/{k}": v for k, v in counters().items()}}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            window = metrics.Window()

        # Every rank agrees on stopping at this step boundary, so the checkpoint covers the same step everywhere.
        out_of_time = cfg.train.max_time_s and time.monotonic() - started > cfg.train.max_time_s
        if all_reduce_max(float(stop.requested or bool(out_of_time)), accelerator.device) > 0:
            save_checkpoint()
            exit_code = EXIT_REQUEUE if stop.requested else 0
            print0(world, f"stopping at step {step} ({'signal' if stop.requested else 'max_time_s'}); checkpoint saved")
            break
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            save_checkpoint()
    progress.close()

    if step >= cfg.train.steps:
        save_checkpoint()
    result = {"steps": step, "samples_seen": samples_seen, "wall_s": time.monotonic() - started,
              "exit_code": exit_code, "checkpoint": str(checkpointer.latest())}
    if cfg.eval.zeroshot_shards and exit_code == 0 and world.is_main:
        clip = accelerator.unwrap_model(model).clip
        result["zeroshot"] = zero_shot(clip, tokenize, cfg.eval.zeroshot_shards, cfg.eval.classnames,
                                       cfg.eval.templates, image_transform(model_cfg, is_train=False),
                                       cfg.eval.batch_size, accelerator.device, cfg.eval.max_samples)
        print0(world, f"zero-shot top-1 {result['zeroshot']['top1']:.2%} on {result['zeroshot']['num_samples']}")
    if world.is_main:
        result.update(metrics.finish(run_dir, log.records))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain image-text towers (open_clip architectures) on WebDataset shards with Accelerate.",
        epilog=f"Exit status: 0 done, {EXIT_REQUEUE} checkpointed on SIGTERM/SIGUSR1 (requeue me), 2 bad input.\n"
               "Config keys (--set section.key=value):\n" + "\n".join(describe()))
    parser.add_argument("--config", help="TOML preset (e.g. configs/tiny.toml); defaults apply to missing keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=5e-4 (repeatable)")
    parser.add_argument("--resume", metavar="auto|CKPT",
                        help="auto: the newest complete checkpoint of train.run_dir, if any; or a checkpoint dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    result = run(cfg, args.resume)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
