"""Training metrics: throughput windows and the JSONL + TensorBoard log (rank 0 writes)."""
from __future__ import annotations

import json
from pathlib import Path


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


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl and TensorBoard. A resumed run appends to the same files;
    the report keeps the newest record of each step."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
