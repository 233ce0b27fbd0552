"""Experiment trackers through Accelerate (train.report_to): TensorBoard, wandb (offline) and MLflow (a local
database) get what metrics.jsonl gets, the config as parameters, and a resumed run continues the same runs."""
from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from data_prep.input.sources import FASHION_MNIST_CLASSES as CLASSES
from pipeline.config import TRACKERS, load_config, to_dict
from pipeline.train import metrics
from pipeline.train.optim import schedule_signature
from pipeline.train.state import TrainState
from tests.helpers.train_cli import finish, records, shards, spawn, train_args  # noqa: F401 (shards)

ALL = '["tensorboard", "wandb", "mlflow"]'


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> dict:
    """wandb offline with its files in tmp_path, MLflow in a SQLite file there: nothing leaves the machine."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return env


def wandb_records(path: Path):
    """The protobuf records of a wandb transaction log (run-ID.wandb: LevelDB's log format, 32 KiB blocks, each
    record in one or more chunks with a 7-byte header), which wandb offline writes and `wandb sync` uploads."""
    from wandb.proto import wandb_internal_pb2
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header or data[pos + 6] == 0:  # the zero-padded tail of a block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 whole, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(wandb_dir: Path) -> list[dict]:
    """Each offline run of `wandb_dir`, oldest first: its id, config and history rows by step."""
    runs = []
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        run = {"id": None, "config": {}, "history": {}}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
            if kind in ("run", "config"):
                items = (record.run.config if kind == "run" else record.config).update
                run["config"].update({i.key: json.loads(i.value_json) for i in items})
            if kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["history"].setdefault(row["_step"], {}).update(row)
        runs.append(run)
    return runs


def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def both_records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's train and eval records of each step, merged as the trackers see them."""
    out = {step: dict(r) for step, r in records(run_dir).items()}
    for step, r in records(run_dir, "eval").items():
        out.setdefault(step, {}).update(r)
    return out


@pytest.mark.slow
def test_trackers_log_what_metrics_jsonl_logs_and_a_resumed_run_continues_their_runs(tmp_path, shards, tracker_env):
    import mlflow
    run_dir = tmp_path / "run"
    common = ("train.steps=5", f"train.report_to={ALL}", f"eval.zeroshot_shards={shards['test']}",
              f"eval.classnames={json.dumps(CLASSES)}", "eval.batch_size=32")
    # Out of time after the first step (checkpointed); the next segment, with no time limit, runs to the end.
    code, out = finish(spawn(train_args(run_dir, shards, *common, "train.max_time_s=1e-6")))
    assert code == 0 and "stopping at step 1 (max_time_s)" in out, out
    first = torch.load(run_dir / "checkpoints/step-00000001/trainer.pt", weights_only=True)["tracker_runs"]
    assert sorted(first) == ["mlflow", "wandb"]
    code, out = finish(spawn(train_args(run_dir, shards, *common, "train.max_time_s=0") + ["--resume", "auto"]))
    assert code == 0 and "resumed from" in out, out
    final = torch.load(run_dir / "checkpoints/step-00000005/trainer.pt", weights_only=True)["tracker_runs"]
    assert final == first

    logged = both_records(run_dir)
    assert sorted(logged) == [1, 2, 3, 4, 5] and all("eval/zeroshot/top1" in logged[s] for s in (1, 5))
    keys = [k for k in logged[1] if k.startswith(("loss", "lr", "eval/", "samples_per_s", "data_wait"))]
    assert "loss/contrastive" in keys and "data_wait_fraction" in keys

    # wandb: one offline run per segment, both with the checkpoint's run id; every value at every step.
    segments = wandb_runs(tmp_path)
    assert [s["id"] for s in segments] == [first["wandb"]] * 2
    history = {step: row for s in segments for step, row in s["history"].items()}
    assert sorted(history) == [1, 2, 3, 4, 5]
    for step, record in logged.items():
        assert {k: history[step][k] for k in keys if k in record} == {k: record[k] for k in keys if k in record}
    assert segments[0]["config"]["train.steps"] == 5 and segments[0]["config"]["data.batch_size"] == 16
    assert segments[0]["config"]["train.max_time_s"] == 1e-6 and segments[1]["config"]["train.max_time_s"] == 0
    assert json.loads(segments[0]["config"]["train.report_to"]) == json.loads(ALL)

    # MLflow: one run in the `plait` experiment, the same across segments; params are the first segment's.
    client = mlflow.MlflowClient(tracker_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(metrics.PROJECT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first["mlflow"] and run.info.status == "FINISHED"
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(s, r[key]) for s, r in sorted(logged.items()) if key in r], key  # each step once
    params = run.data.params
    assert (params["train.steps"], params["data.batch_size"], params["train.max_time_s"]) == ("5", "16", "1e-06")

    # TensorBoard: RUN_DIR/tensorboard/plait, float32 scalars; the config as hparams.
    board = run_dir / "tensorboard" / metrics.PROJECT
    for key in ("loss", "loss/contrastive", "samples_per_s", "eval/zeroshot/top1"):
        expected = {s: float(np.float32(r[key])) for s, r in logged.items() if key in r}
        assert tensorboard_scalars(board, key) == expected, key
    assert any("train.steps: 5" in p.read_text() for p in board.glob("*/hparams.yml"))


@pytest.mark.dist
@pytest.mark.slow
def test_only_the_main_process_logs(tmp_path, shards, tracker_env):
    import mlflow
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, "train.steps=3", "data.batch_size=8", f"train.report_to={ALL}")
    results = [finish(p) for p in [spawn(args, 2, rank, port) for rank in range(2)]]
    assert [code for code, _ in results] == [0, 0], results
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    (segment,) = wandb_runs(tmp_path)
    assert sorted(segment["history"]) == [1, 2, 3]
    client = mlflow.MlflowClient(tracker_env["MLFLOW_TRACKING_URI"])
    assert len(client.search_runs([client.get_experiment_by_name(metrics.PROJECT).experiment_id])) == 1
    assert len(list((run_dir / "tensorboard" / metrics.PROJECT).glob("events.out.tfevents.*"))) == 1
    assert sorted(tensorboard_scalars(run_dir / "tensorboard" / metrics.PROJECT, "loss")) == [1, 2, 3]


def train_state(run_dir: str) -> TrainState:
    cfg = load_config("tiny", [f"train.run_dir={run_dir}"])
    return TrainState(world_size=1, schedule=schedule_signature(cfg.optim, cfg.train.steps), model_cfg={},
                      config_text=tomli_w.dumps(to_dict(cfg)))


def test_tracker_runs_are_kept_for_the_same_run_dir_only():
    saved = train_state("runs/a")
    saved.tracker_runs = {"wandb": "abc123", "mlflow": "0123abcd"}
    state = saved.state_dict()
    assert state["tracker_runs"] == {"wandb": "abc123", "mlflow": "0123abcd"}
    same, other, old = train_state("runs/a"), train_state("runs/b"), train_state("runs/a")
    same.load_state_dict(state)
    other.load_state_dict(state)  # a checkpoint resumed into another run dir: a branch, with new tracker runs
    old.load_state_dict({k: v for k, v in state.items() if k != "tracker_runs"})  # a checkpoint without the key
    assert (same.tracker_runs, other.tracker_runs, old.tracker_runs) == (saved.tracker_runs, {}, {})


def test_config_is_flattened_to_scalars():
    flat = metrics.flat_config(to_dict(load_config("tiny", ["eval.classnames=['a', 'b']"])))
    assert flat["train.steps"] == 20 and flat["optim.lr"] == 1e-3 and flat["train.device"] == "cpu"
    assert flat["eval.classnames"] == '["a", "b"]' and flat["objective.contrastive.weight"] == 1.0
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_a_tracker_that_is_not_installed_is_a_config_error():
    from accelerate.tracking import get_available_trackers
    missing = [t for t in TRACKERS if t not in {str(a) for a in get_available_trackers()}]
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed")
    with pytest.raises(ValueError, match=rf"train.report_to: {missing[0]} not installed"):
        metrics.check_trackers(("tensorboard", missing[0]))
    assert metrics.check_trackers(()) is None and metrics.check_trackers(("tensorboard",)) == ["tensorboard"]


def test_an_mlflow_store_that_cannot_hold_plaits_metrics_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    with pytest.raises(ValueError, match="file store .* cannot hold both `loss` and `loss/<part>`"):
        metrics.check_trackers(("mlflow",))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert metrics.check_trackers(("mlflow",)) == ["mlflow"]
