"""Elastic resume with real processes (gloo, CPU): a run on 4 processes is killed, resumed on 2 with another
worker count, killed again, resumed on 3. Each process logs every sample it trains on (data.log_keys); the
samples trained on up to each checkpoint, across the three topologies, are the epoch's once each; the global
batch is kept by the accumulation steps; the optimizer state carries on (its step count is not restarted).

Fixture: the module's 256 Fashion-MNIST training samples in 4 shards; micro-batches of 4, global batch 48
(4 x 4 x 3, then 4 x 2 x 6, then 4 x 3 x 4)."""
from __future__ import annotations

import collections
import signal
import socket

import pytest
import torch

from tests.helpers.train_cli import shards  # noqa: F401 (a fixture)
from tests.helpers.train_cli import finish, spawn, train_args, wait_for_step

pytestmark = [pytest.mark.dist, pytest.mark.slow]
STEPS = 8
COMMON = (f"train.steps={STEPS}", "train.checkpoint_every=2", "train.keep_last=10", "data.batch_size=4",
          "data.log_keys=true", "optim.warmup_steps=2", "data.shuffle_buffer=16")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, shards, world_size: int, *overrides: str, resume: str | None = None):
    args = train_args(run_dir, shards, *COMMON, *overrides) + (["--resume", resume] if resume else [])
    port = _port()
    return [spawn(args, world_size=world_size, rank=r, port=port) for r in range(world_size)]


def _kill_after(run_dir, procs, step: int) -> None:
    wait_for_step(run_dir, procs[0], step)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def _kept(run_dir, upto: int) -> list[tuple[int, int, str]]:
    """(step, epoch, key) of the steps up to the checkpoint a killed run resumes from; the log is then cleared,
    as the steps after it are trained again by the resumed run."""
    out = []
    for log in sorted((run_dir / "keys").glob("rank-*.txt")):
        for line in log.read_text().splitlines():
            step, epoch, key = line.split(" ", 2)
            if int(step) <= upto:
                out.append((int(step), int(epoch), key))
        log.unlink()
    return out


def test_four_then_two_then_three_processes_read_the_epoch_once(tmp_path, shards):
    run = tmp_path / "run"
    _kill_after(run, _launch(run, shards, 4, "train.accum_steps=3", "data.num_workers=1"), 3)
    trained = _kept(run, 2)
    ckpt2 = run / "checkpoints/step-00000002"
    procs = _launch(run, shards, 2, "train.accum_steps=3", "data.num_workers=2", resume=str(ckpt2))
    _kill_after(run, procs, 5)
    trained += _kept(run, 4)
    ckpt4 = run / "checkpoints/step-00000004"
    assert torch.load(ckpt4 / "trainer.pt", weights_only=True)["world_size"] == 2
    procs = _launch(run, shards, 3, "train.accum_steps=3", "data.num_workers=1", resume=str(ckpt4))
    outs = [finish(p) for p in procs]
    assert all(code == 0 for code, _ in outs), outs[0][1][-4000:]
    log = outs[0][1]
    assert "resuming on 3 processes (the checkpoint ran on 2): global batch 48 kept with data.batch_size 4 x " \
           "train.accum_steps 4" in log, log[-3000:]
    trained += _kept(run, STEPS)

    per_step = collections.Counter(step for step, _, _ in trained)
    assert per_step == {s: 48 for s in range(1, STEPS + 1)}, per_step  # the global batch held on every topology
    epoch0 = [key for _, epoch, key in trained if epoch == 0]
    assert len(epoch0) == len(set(epoch0)), "a sample of epoch 0 was trained on twice"
    assert 256 - len(epoch0) < 4 * 3  # only the last topology's tail (less than one of its global batches) left
    # the optimizer went on counting its steps: AdamW's step 8 at the end, not 8 - 4 (re-initialised at a resume)
    optim = torch.load(run / "checkpoints/step-00000008/optimizer.pt", weights_only=True)["optimizer"]
    steps = {int(v["step"]) for v in optim["state"].values() if "step" in v}
    assert steps == {STEPS}, steps


def test_a_world_size_that_breaks_the_global_batch_is_refused_with_the_valid_ones(tmp_path, shards):
    run = tmp_path / "run"
    procs = _launch(run, shards, 2, "train.accum_steps=3", "data.num_workers=1", "train.steps=2")
    assert all(finish(p)[0] == 0 for p in procs)
    code, out = finish(spawn(train_args(run, shards, *COMMON[1:], "train.steps=2", "train.accum_steps=3") +
                             ["--resume", str(run / "checkpoints/step-00000002")], world_size=1))
    assert code == 0, out[-2000:]  # 1 process: 24 = 4 x 6 keeps it
    port = _port()
    procs = [spawn(train_args(run, shards, *COMMON[1:], "train.steps=2", "train.accum_steps=3") +
                   ["--resume", str(run / "checkpoints/step-00000002")], world_size=5, rank=r, port=port,
                   module="pipeline.train")  # what rendered sbatch scripts run
             for r in range(5)]
    outs = [finish(p) for p in procs]
    assert outs[0][0] == 2, outs[0][1][-2000:]
    assert ("cannot resume on 5 processes: the checkpoint's global batch 24 (2 processes) is not data.batch_size 4 "
            "x accum_steps x 5; processes that keep it: 1, 2, 3, 6") in outs[0][1], outs[0][1][-2000:]
    assert "Traceback" not in outs[0][1]


def test_an_fsdp_checkpoint_of_four_ranks_resumes_on_two(tmp_path, shards):
    """FSDP checkpoints hold the whole model and the optimizer state by parameter name (gathered on save), so
    2 ranks scatter what 4 wrote."""
    run = tmp_path / "run"
    fsdp = ("train.strategy=fsdp", "train.steps=4", "data.num_workers=1")
    _kill_after(run, _launch(run, shards, 4, "train.accum_steps=1", *fsdp), 3)
    ckpt = run / "checkpoints/step-00000002"
    procs = _launch(run, shards, 2, "train.accum_steps=1", *fsdp, resume=str(ckpt))
    outs = [finish(p) for p in procs]
    assert all(code == 0 for code, _ in outs), outs[0][1][-4000:]
    assert "global batch 16 kept with data.batch_size 4 x train.accum_steps 2" in outs[0][1], outs[0][1][-3000:]
    assert f"resumed from {ckpt} at step 2" in outs[0][1]
    optim = torch.load(run / "checkpoints/step-00000004/optimizer.pt", weights_only=True)["optimizer"]
    assert {int(v["step"]) for v in optim["state"].values() if "step" in v} == {4}
