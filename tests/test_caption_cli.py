"""`plait caption` and `plait eval --task caption` (pipeline/eval/caption.py): captions per sample as Parquet or
JSON lines, BLEU-4/CIDEr/class naming on hand-made cases, and one-line errors."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

import plait
from pipeline.eval.caption import caption_metrics, names_class
from tests.helpers.captioner import exported
from tests.helpers.fmnist_fixture import spec, write_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    _, _, out = exported(root, steps=5)
    return out, spec(write_shards(root / "shards", "test", 12, per_shard=6, fmt="png"))


def test_caption_writes_one_caption_per_sample_as_jsonl_and_parquet(setup, tmp_path, capsys):
    model, data = setup
    assert plait.main(["caption", str(model), "--data", data, "--out", str(tmp_path / "c.jsonl"),
                       "--batch-size", "5", "--max-length", "8", "--min-length", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12 and set(rows[0]) == {"key", "caption"}
    assert plait.main(["caption", str(model), "--data", data, "--out", str(tmp_path / "c.parquet"), "--beams", "2",
                       "--max-length", "6", "--min-length", "2", "--max-samples", "4"]) == 0
    table = pq.read_table(tmp_path / "c.parquet").to_pylist()
    assert [r["key"] for r in table] == [r["key"] for r in rows[:4]]


@pytest.mark.parametrize("extra, message", [
    (["--out", "c.csv"], "expected a .parquet or .jsonl file"),
    (["--out", "c.jsonl", "--max-length", "40"], "--max-length 40: must lie in [2, 16]"),
    (["--out", "c.jsonl", "--beams", "0"], "--beams must be >= 1"),
])
def test_caption_errors_are_one_line(setup, tmp_path, monkeypatch, capsys, extra, message):
    model, data = setup
    monkeypatch.chdir(tmp_path)
    assert plait.main(["caption", str(model), "--data", data, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_reports_caption_metrics_for_a_captioner(setup, tmp_path, capsys):
    model, data = setup
    assert plait.main(["eval", str(model), "--data", data, "--task", "caption", "--batch-size", "6",
                       "--caption-max-length", "8", "--output", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["caption"]
    assert result["num_samples"] == 12 and result["num_with_references"] == 12
    assert 0 <= result["bleu_4"] <= 1 and result["cider"] >= 0 and 0 <= result["names_true_class"] <= 1


def test_metrics_on_hand_made_captions():
    rows = [{"key": "a", "caption": "A photo of a shirt.", "references": ["a photo of a shirt"], "label": 0},
            {"key": "b", "caption": "a photo of an ankle boot", "references": ["a photo of an ankle boot"],
             "label": 1},
            {"key": "c", "caption": "a bag", "references": [], "label": 1}]
    out = caption_metrics(rows, ["shirt", "ankle boot"])
    assert out["num_with_references"] == 2 and out["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert out["names_true_class"] == pytest.approx(2 / 3)
    worse = caption_metrics([{**rows[0], "caption": "a bag"}, rows[1]], ["shirt", "ankle boot"])
    assert worse["bleu_4"] < out["bleu_4"] and worse["cider"] < out["cider"]
    assert names_class("two Ankle-Boots", "ankle boot") is False and names_class("an ankle boot!", "ankle boot")
