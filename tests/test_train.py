"""`plait train` end to end on real Fashion-MNIST shards: outputs, checkpoints, resume after kill -9, signals."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.input.sources import FASHION_MNIST_CLASSES as CLASSES
from tests.helpers.fmnist_fixture import spec
from tests.helpers.train_cli import finish, records, shards, spawn, train_args, wait_for_step  # noqa: F401 (shards)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_writes_report_metrics_and_clean_checkpoints(tmp_path, shards):
    from pipeline.train.loop import main
    run_dir = tmp_path / "run"
    code = main(train_args(run_dir, shards, "train.steps=6", "train.checkpoint_every=2", "train.keep_last=2",
                           "train.eval_every=3", f"eval.zeroshot_shards={shards['test']}",
                           f"eval.classnames={json.dumps(CLASSES)}", "eval.batch_size=32"))
    assert code == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 6 and report["samples_seen"] == 6 * 16 and report["exit_code"] == 0
    assert report["zeroshot"]["num_samples"] == 64 and 0 <= report["zeroshot"]["top1"] <= 1
    for png in ("loss.png", "throughput.png", "eval.png"):
        assert (run_dir / png).stat().st_size > 1000, png
    train = records(run_dir)
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    first = train[1]
    for key in ("loss", "loss/contrastive", "lr", "grad_norm", "logit_scale", "samples_per_s",
                "samples_per_s_per_device", "data_wait_fraction"):
        assert key in first, key
    assert any(k.startswith("data/") for k in first), "bad-sample counters of the loader are logged"
    assert sorted(records(run_dir, "eval")) == [3, 6]
    assert list((run_dir / "tensorboard/plait").glob("events.out.tfevents.*"))  # train.report_to's default
    # keep_last=2 of the checkpoints at 2, 4, 6; every file loads weights-only; no wrapper prefixes.
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]
    final = run_dir / "checkpoints/step-00000006"
    for pt in final.glob("*.pt"):
        torch.load(pt, weights_only=True)
    keys = load_file(final / "model.safetensors").keys()
    assert not [k for k in keys if k.startswith(("module.", "_orig_mod."))]
    trainer = torch.load(final / "trainer.pt", weights_only=True)
    assert trainer["step"] == 6 and json.loads(trainer["model_cfg"])["embed_dim"] == 128
    assert "[train]" in trainer["config"]


@pytest.mark.slow
def test_resume_with_a_different_schedule_is_refused(tmp_path, shards):
    from pipeline.train.loop import main
    run_dir = tmp_path / "run"
    assert main(train_args(run_dir, shards, "train.steps=2")) == 0
    with pytest.raises(ValueError, match=r"LR schedule changed \(total_steps 2 -> 4\)"):
        main(train_args(run_dir, shards, "train.steps=4") + ["--resume", "auto"])
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        main(train_args(run_dir, shards, "train.steps=2") + ["--resume", str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_fp16_trains_with_a_gradient_scaler_saved_and_restored_on_resume(tmp_path, shards):
    # Accelerate 1.15 alone would train fp32 on CPU: the loop turns on fp16 autocast and torch's CPU GradScaler.
    probe = ("import torch; from pipeline.config import TrainConfig; from pipeline.train.loop import build_accelerator; "
             "a = build_accelerator(TrainConfig(device='cpu', precision='fp16')); m = torch.nn.Linear(4, 4)\n"
             "with a.autocast(): y = m(torch.ones(2, 4))\n"
             "print(y.dtype, type(a.scaler).__name__, a.scaler.get_scale())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["torch.float16", "GradScaler", "65536.0"], out

    common = ("train.steps=6", "train.checkpoint_every=3", "train.keep_last=3", "optim.warmup_steps=2",
              "train.precision=fp16")
    whole = tmp_path / "whole"
    code, out = finish(spawn(train_args(whole, shards, *common)))
    assert code == 0, out
    losses = [r["loss"] for r in records(whole).values()]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses) and losses[-1] < losses[0]
    scaler = torch.load(whole / "checkpoints/step-00000006/trainer.pt", weights_only=True)["grad_scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 6  # 6 steps without inf/NaN gradients

    resumed = tmp_path / "resumed"
    code, out = finish(spawn(train_args(resumed, shards, *common)
                             + ["--resume", str(whole / "checkpoints/step-00000003")]))
    assert code == 0, out
    a, b = records(whole), records(resumed)
    assert sorted(b) == [4, 5, 6] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    # Restored, the scaler counts on from 3 (a fresh one would stop at 3 steps).
    assert torch.load(resumed / "checkpoints/step-00000006/trainer.pt", weights_only=True)["grad_scaler"] == scaler


@pytest.mark.slow
def test_kill9_then_resume_reproduces_the_uninterrupted_run(tmp_path, shards):
    # 16 batches per epoch: the interruption falls mid-epoch, so the loader state must resume mid-epoch too.
    common = ("train.steps=9", "train.checkpoint_every=3", "train.keep_last=5", "optim.warmup_steps=2")
    whole = tmp_path / "whole"
    code, out = finish(spawn(train_args(whole, shards, *common)))
    assert code == 0, out

    broken = tmp_path / "broken"
    proc = spawn(train_args(broken, shards, *common))
    wait_for_step(broken, proc, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (broken / "checkpoints/step-00000003").is_dir() and not (broken / "report.json").exists()
    code, out = finish(spawn(train_args(broken, shards, *common) + ["--resume", "auto"]))
    assert code == 0, out
    assert "resumed from" in out and "step-00000003" in out

    a, b = records(whole), records(broken)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']} vs {b[step]['loss']}"
    wa = load_file(whole / "checkpoints/step-00000009/model.safetensors")
    wb = load_file(broken / "checkpoints/step-00000009/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_to_one_rank_stops_both_at_the_same_step_with_exit_75(tmp_path, shards, signum):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    # With a periodic evaluation sharded over both ranks on the way (a rank-0-only eval would leave rank 1
    # waiting in the next collective).
    args = train_args(run_dir, shards, "train.steps=1000", "data.batch_size=8", "train.eval_every=2",
                      f"eval.zeroshot_shards={shards['test']}", f"eval.classnames={json.dumps(CLASSES)}")
    procs = [spawn(args, 2, rank, port) for rank in range(2)]
    wait_for_step(run_dir, procs[0], 3)
    procs[1].send_signal(signum)  # only rank 1 is told; rank 0 learns it at the next step boundary
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [75, 75], results
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    step = torch.load(ckpt / "trainer.pt", weights_only=True)["step"]
    assert records(run_dir, "eval")[2]["eval/zeroshot/num_samples"] == 64  # both ranks' shards counted
    assert 3 <= step < 1000 and sorted(p.name for p in ckpt.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    assert f"stopping at step {step} (signal)" in results[0][1]


@pytest.mark.slow
def test_bf16_autocast_with_gradient_checkpointing_and_accumulation_trains(tmp_path, shards):
    run_dir = tmp_path / "run"
    code, out = finish(spawn(train_args(run_dir, shards, "train.steps=3", "train.precision=bf16",
                                        "model.grad_checkpointing=true", "train.accum_steps=2")))
    assert code == 0, out
    losses = [r["loss"] for r in records(run_dir).values()]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert "global batch 32 (2 accumulated micro-batches)" in out


@pytest.mark.slow
def test_time_budget_checkpoints_and_the_next_run_continues(tmp_path, shards):
    from pipeline.train.loop import main
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, "train.steps=4", "train.max_time_s=1e-6")
    assert main(args) == 0  # out of time is not a failure, nor a requeue
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stopped"] == "max_time_s" and report["steps"] == 1
    assert main(args + ["--resume", "auto"]) == 0
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 2
    assert sorted(records(run_dir)) == [1, 2]


GOLDEN = ROOT / "tests/golden/checkpoint_main_fa7f3cd"


@pytest.mark.slow
def test_a_checkpoint_written_by_the_previous_trainer_resumes_identically(tmp_path, shards):
    # trainer.pt and rank-00000.pt of step 3 of this very run, written by plait at commit fa7f3cd (the trainer
    # that wrote every state by hand); the weight files' format did not change, so they come from this run.
    common = ("train.steps=6", "train.checkpoint_every=3", "train.keep_last=3", "optim.warmup_steps=2",
              "train.precision=fp16")
    whole = tmp_path / "whole"
    code, out = finish(spawn(train_args(whole, shards, *common)))
    assert code == 0, out
    old = tmp_path / "old" / "step-00000003"
    old.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt"):
        (old / name).symlink_to(whole / "checkpoints/step-00000003" / name)
    for name in ("trainer.pt", "rank-00000.pt"):
        (old / name).write_bytes((GOLDEN / name).read_bytes())
    assert torch.load(old / "trainer.pt", weights_only=True)["step"] == 3

    resumed = tmp_path / "resumed"
    code, out = finish(spawn(train_args(resumed, shards, *common) + ["--resume", str(old)]))
    assert code == 0, out
    a, b = records(whole), records(resumed)
    assert sorted(b) == [4, 5, 6] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    assert all(a[s]["samples_seen"] == b[s]["samples_seen"] for s in b)
    final = torch.load(resumed / "checkpoints/step-00000006/trainer.pt", weights_only=True)
    assert final["grad_scaler"] == torch.load(whole / "checkpoints/step-00000006/trainer.pt",
                                              weights_only=True)["grad_scaler"]


def test_a_checkpoint_of_an_unknown_layout_is_refused_by_name(tmp_path, shards):
    from pipeline.train.loop import main
    run_dir = tmp_path / "run"
    assert main(train_args(run_dir, shards, "train.steps=2")) == 0
    ckpt = run_dir / "checkpoints/step-00000002"
    rank = torch.load(ckpt / "rank-00000.pt", weights_only=True)
    del rank["loader"]
    torch.save(rank, ckpt / "rank-00000.pt")
    with pytest.raises(ValueError, match=r"lacks rank-00000.pt:loader .*start a new train.run_dir"):
        main(train_args(run_dir, shards, "train.steps=2") + ["--resume", "auto"])


@pytest.mark.slow
def test_an_exception_in_the_loop_exits_non_zero_with_the_loader_shut_down(tmp_path):
    # One sample in eight is not an image: past data.max_bad_fraction the stream raises in the main process at
    # the end of the epoch, with both loader workers running. The run must end with that error (status 1), its
    # workers shut down in the loop's `finally`, not wait for ever.
    import webdataset as wds
    from tests.helpers.fmnist_fixture import encode, read_fmnist
    images, _ = read_fmnist("train", 64)
    urls = []
    for shard in range(2):
        urls.append(str(tmp_path / f"{shard:05d}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for i in range(shard * 32, shard * 32 + 32):
                sink.write({"__key__": f"{i:09d}", "txt": f"photo {i}",
                            "jpg": b"not a jpeg" if i % 8 == 0 else encode(images[i], "jpg")})
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 32, "00001.tar": 32}))
    args = train_args(tmp_path / "run", {"train": spec(urls)}, "train.steps=50", "data.num_workers=2")
    code, out = finish(spawn(args), timeout_s=300)
    assert code == 1 and "samples were bad" in out, out[-3000:]
