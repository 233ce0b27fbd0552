"""Training metrics: throughput windows, JSONL + TensorBoard records, and the end-of-run report and plots."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    """Appends records to RUN_DIR/metrics.jsonl and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.records: list[dict] = []
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()


def finish(run_dir: Path, records: list[dict]) -> dict:
    """Writes loss.png and returns the run's summary figures (final loss, mean throughput)."""
    if not records:
        return {}
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in sorted({k for r in records for k in r if k == "loss" or k.startswith("loss/")}):
        axes[0].plot(steps, [r.get(key) for r in records], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["samples_per_s"] for r in records])
    axes[1].set_xlabel("step")
    axes[1].set_title("samples/s")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    tail = records[len(records) // 2:] or records
    return {"final_loss": records[-1]["loss"],
            "samples_per_s": sum(r["samples_per_s"] for r in tail) / len(tail),
            "data_wait_fraction": sum(r["data_wait_fraction"] for r in tail) / len(tail)}
