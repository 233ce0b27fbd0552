"""The benchmarks that this machine cannot run at full size still run, in their smoke modes, so they cannot rot:
the GPU check (tiny model on CPU), the internet-scale simulation (small sizes) and the clustered dedup (20k rows)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_gpu_check_smoke_reports_every_figure(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--work", str(tmp_path),
                          "--out", str(tmp_path / "result.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _last_json(out.stdout)
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert [r["objective"] for r in result["train"]] == ["contrastive", "flip50", "flip50+mae+mlm"]
    for row in result["train"]:
        assert row["plait_samples_per_s"] > 0 and row["open_clip_samples_per_s"] > 0 and row["ratio"] > 0
        assert 0 < row["plait_mfu"] < 1
    assert result["loader"]["plait"] > 0
    tower = result["text_tower"]
    assert tower["packed_ms"] > 0 and tower["padded_ms"] > 0 and tower["verdict"]
    assert "| objective | plait samples/s" in out.stdout


def test_scale_simulation_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--smoke", "--work", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _last_json(out.stdout)
    prep, = result["prep"]
    assert prep["shards"] == 20 and prep["task_stream_s"] > 0
    loader, = result["loader"]
    assert loader["resume_state_bytes"] < 1000 and loader["pieces"] >= 16
    merge, = result["merge"]
    assert merge["records"] == 5000


def test_dedup_quick(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_dedup.py", "--quick", "--work", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _last_json(out.stdout)
    assert result["rows"] == 20_000 and result["clustered"]["total_s"] > 0
    assert result["planted"]["at_or_above_threshold"] > 1000 and result["planted"]["recall"] >= 0.99
    assert result["exact_queries"]["recall"] >= 0.99 and result["subsample"]["equal_verdicts"] >= 0.99
