"""The end-of-run report: RUN_DIR/report.json and PNG plots of losses, throughput and evaluations over steps."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_records(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl, including those of earlier (preempted) segments of the run."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed segment repeats the steps after its checkpoint: keep the last record of each step and kind.
    latest = {(r.get("kind", "train"), r["step"]): r for r in records}
    return sorted(latest.values(), key=lambda r: r["step"])


def _plot(path: Path, series: dict[str, tuple[list, list]], title: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series(records: list[dict], keys) -> dict[str, tuple[list, list]]:
    return {k: ([r["step"] for r in records if k in r], [r[k] for r in records if k in r]) for k in keys}


def write_report(run_dir: Path, summary: dict) -> dict:
    """Writes report.json (summary + figures from the metrics log) and loss.png, throughput.png, eval.png."""
    records = read_records(run_dir)
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    report = dict(summary)
    if train:
        tail = train[len(train) // 2:]
        report.update(final_loss=train[-1]["loss"],
                      samples_per_s=sum(r["samples_per_s"] for r in tail) / len(tail),
                      data_wait_fraction=sum(r["data_wait_fraction"] for r in tail) / len(tail))
        losses = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")})
        _plot(run_dir / "loss.png", _series(train, losses), "training loss", "loss")
        _plot(run_dir / "throughput.png", _series(train, ["samples_per_s", "samples_per_s_per_device"]),
              "throughput", "samples/s")
    if evals:
        report["evals"] = evals
        keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
        _plot(run_dir / "eval.png", _series(evals, keys), "evaluation", "metric")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
