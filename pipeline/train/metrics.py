"""Training metrics: throughput windows, RUN_DIR/metrics.jsonl and the experiment trackers (main process only).

Every record goes to metrics.jsonl (plait's own log, read by the report and the model card) and, through
Accelerate's tracker API, to each tracker of `train.report_to`: TensorBoard under RUN_DIR/tensorboard/, wandb and
MLflow where their environment points them (WANDB_MODE/WANDB_DIR, MLFLOW_TRACKING_URI). wandb and MLflow runs
are continued on resume: their run ids travel in the checkpoint (`TrainState.tracker_runs`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import urllib.parse
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers

PROJECT = "plait"
"""The wandb project, the MLflow experiment (MLFLOW_EXPERIMENT_NAME overrides it) and the TensorBoard folder."""
RUN_IDS = {"wandb": lambda run: run.id, "mlflow": lambda run: run.info.run_id}
"""How to read the run id of each tracker whose run a resumed run continues (the others start a new run in each
segment of a run)."""


class Window:
    """Throughput and data-wait over the steps since the last log record."""

    def __init__(self):
        self.samples, self.wait_s, self.total_s = 0, 0.0, 0.0

    def add(self, samples: int, wait_s: float, total_s: float) -> None:
        self.samples += samples
        self.wait_s += wait_s
        self.total_s += total_s

    def summary(self, num_devices: int) -> dict:
        sps = self.samples / max(self.total_s, 1e-9)
        return {"samples_per_s": sps, "samples_per_s_per_device": sps / num_devices,
                "data_wait_fraction": self.wait_s / max(self.total_s, 1e-9)}


def check_trackers(report_to: tuple[str, ...]) -> list[str] | None:
    """`train.report_to` as Accelerate's `log_with` (None for no tracker). Accelerate silently drops a tracker
    whose package is missing; here that is a ValueError naming the key, raised on every rank."""
    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in report_to if t not in available]
    if missing:
        raise ValueError(f"train.report_to: {', '.join(missing)} not installed (pip install 'plait[trackers]' "
                         "installs wandb and mlflow-skinny; the others by their own name)")
    if "mlflow" in report_to:
        check_mlflow_store()
    return list(report_to) or None


def check_mlflow_store() -> None:
    """MLflow's tracking store (MLFLOW_TRACKING_URI; unset, sqlite:///mlflow.db in the working directory) must hold
    plait's metric names, and its packages must be installed: a ValueError before training, not at the first log."""
    import mlflow
    uri = mlflow.get_tracking_uri()
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file"):  # a file per metric: the file `loss` cannot also be the folder of `loss/contrastive`
        raise ValueError(f"train.report_to: mlflow's file store {uri} cannot hold both `loss` and `loss/<part>`; "
                         "set MLFLOW_TRACKING_URI to a database (sqlite:///mlflow.db) or a tracking server")
    if scheme.partition("+")[0] in ("sqlite", "postgresql", "mysql", "mssql") \
            and importlib.util.find_spec("sqlalchemy") is None:
        raise ValueError(f"train.report_to: mlflow's database store {uri} needs SQLAlchemy and alembic, which "
                         "mlflow-skinny leaves out: pip install 'plait[trackers]'")


def flat_config(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """The nested config as `section.key` scalars, the form every tracker takes as run parameters; lists as
    JSON text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value
        else:
            out[prefix + key] = json.dumps(value)
    return out


def scalars(record: dict) -> dict[str, int | float]:
    """The numbers of a record, without its step (the trackers' own axis)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl and logs them to the accelerator's trackers, on the main process.
    A resumed run appends to the same file; the report keeps the newest record of each step."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, enabled: bool):
        self.run_dir, self.accelerator, self.enabled = run_dir, accelerator, enabled
        self.path = run_dir / "metrics.jsonl"

    def start_trackers(self, config: dict, continuing: dict[str, str]) -> dict[str, str]:
        """Starts each tracker's run, or continues the one named in `continuing` (tracker name -> run id, from the
        checkpoint), with the resolved `config` as parameters; returns the run ids for the next checkpoints.
        MLflow's parameters cannot change once logged: a continued MLflow run keeps its first segment's."""
        if not self.enabled or not self.accelerator.log_with:
            return {}
        init_kwargs = {"wandb": {"name": self.run_dir.name}, "mlflow": {"run_name": self.run_dir.name}}
        if "WANDB_DIR" not in os.environ:
            init_kwargs["wandb"]["dir"] = str(self.run_dir)  # wandb's local files under RUN_DIR/wandb/
        if "wandb" in continuing:
            init_kwargs["wandb"].update(id=continuing["wandb"], resume="allow")
        if "mlflow" in continuing:
            init_kwargs["mlflow"] = {"run_id": continuing["mlflow"]}
        self.accelerator.init_trackers(PROJECT, init_kwargs=init_kwargs)
        params = flat_config(config)
        for tracker in self.accelerator.trackers:
            if not (tracker.name == "mlflow" and "mlflow" in continuing):
                tracker.store_init_configuration(params)
        return {t.name: RUN_IDS[t.name](t.tracker) for t in self.accelerator.trackers if t.name in RUN_IDS}

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log(scalars(record), step=record["step"])
