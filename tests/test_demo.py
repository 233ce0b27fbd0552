"""The demo path at a small budget: real Fashion-MNIST rows -> shards -> training -> zero-shot -> export -> reload."""
import json

import open_clip
import pytest
import torch

from pipeline.demo import main as demo
from tests.helpers.fmnist_subset import SOURCE, write_subset


@pytest.mark.slow
@pytest.mark.skipif(not SOURCE.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_demo_end_to_end_small(tmp_path):
    write_subset(tmp_path / "fm", num_train=1536, num_test=500)
    run_dir = tmp_path / "run"
    assert demo(["--run-dir", str(run_dir), "--fashion-mnist", str(tmp_path / "fm"), "--samples-per-shard", "512",
                 "--set", "train.steps=24", "--set", "data.batch_size=64", "--set", "optim.warmup_steps=4",
                 "--set", "train.log_every=4", "--set", "data.num_workers=0"]) == 0

    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 24 and report["samples_seen"] == 24 * 64
    assert 0.0 <= report["zero_shot_top1"] <= 1.0 and len(report["zero_shot_per_class"]) == 10
    assert (run_dir / "loss.png").stat().st_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], "contrastive loss did not decrease"
    sizes = json.loads((run_dir / "shards" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 1536

    # The export loads in plain open_clip, without plait, and gives normalised embeddings.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a photo of a sneaker"])
    with torch.no_grad():
        emb = model.encode_text(tokens, normalize=True)
    assert emb.shape == (1, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert report["reload_max_abs_diff"] <= 1e-5
