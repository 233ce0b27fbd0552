"""The model card reproduces the training view: its loading code runs as written from the export folder (paths
relative to it) and rebuilds the exported model; it names the background transparent images were composited onto
and the preprocessing; a fine-tuned head's formula gives the classifier's own logits."""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from data_prep.cli import main as prep
from pipeline.export import embeddings, export_open_clip, export_safetensors, fixed_batch
from pipeline.finetune import Classifier, ClassifierHead
from pipeline.model_card import dataset_prep
from pipeline.models.towers import build_clip
from tests.prep_corpus import real_photos

try:
    from tests.fmnist_fixture import TEST_MODEL_CFG
except ModuleNotFoundError:
    from fmnist_fixture import TEST_MODEL_CFG


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory) -> dict:
    """Training metadata as `plait export` reads it, for shards `plait prep` made with a blue background."""
    root = tmp_path_factory.mktemp("card")
    table = root / "in.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption"], *[[f"file://{p}", "a photo"] for p in real_photos(limit=2)]])
    prep(["shard", "--input", str(table), "--output", str(root / "shards"), "--image-size", "32",
          "--background", "0,128,255", "--processes", "1", "--no-progress"])
    return {"step": 10, "samples_seen": 640, "data_prep": dataset_prep(str(root / "shards" / "00000.tar"))}


def _model() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_clip(TEST_MODEL_CFG).eval()
    return model, TEST_MODEL_CFG


def _code(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, re.S)


def test_safetensors_card_builds_the_model_from_relative_paths(tmp_path, monkeypatch, trained_on):
    model, cfg = _model()
    out = export_safetensors(model.state_dict(), cfg, tmp_path / "exported", meta={"training": trained_on})
    readme = (out / "README.md").read_text()
    meta_text = (out / "plait_metadata.json").read_text()
    assert str(tmp_path) not in readme and str(tmp_path) not in json.dumps(json.loads(meta_text)["usage"])
    assert "transparent pixels composited onto RGB (0, 128, 255)" in readme
    assert "Image.new('RGBA', im.size, (0, 128, 255, 255))" in readme
    assert "RandomResizedCrop(28, scale=(0.9, 1.0)" in readme and "CenterCrop(28)" in readme
    assert "resize keep_ratio to 32 px" in readme

    monkeypatch.chdir(out)  # the card's code as a user runs it, from the export folder
    ns: dict = {}
    exec(_code(readme)[0], ns)
    images, tokens = fixed_batch(cfg)
    want, got = embeddings(model, images, tokens), embeddings(ns["model"], images, tokens)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert ns["preprocess"](Image.new("RGB", (40, 30))).shape == (3, 28, 28)


def test_finetuned_card_gives_the_classifier_formula(tmp_path, monkeypatch, trained_on):
    model, cfg = _model()
    finetune = {"mode": "linear", "classifier": "classifier.safetensors", "classnames": "classnames.txt"}
    out = export_open_clip(model.state_dict(), cfg, tmp_path / "ft", meta={"training": trained_on,
                                                                           "finetune": finetune})
    torch.manual_seed(1)
    head = ClassifierHead(cfg["embed_dim"], 3, scale=42.0)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out / "classifier.safetensors")
    (out / "classnames.txt").write_text("shirt\nshoe\nbag\n")
    Image.open(real_photos(limit=1)[0]).convert("RGB").save(out / "photo.jpg")
    readme = (out / "README.md").read_text()
    assert "logits = scale * (normalize(encode_image(preprocess(image))) @ weight.T + bias)" in readme
    assert str(tmp_path) not in readme

    monkeypatch.chdir(out)
    ns: dict = {}
    loading, classify = _code(readme)[:2]
    exec(loading, ns)
    exec(classify, ns)
    with torch.no_grad():
        want = Classifier(model, head)(ns["images"])
    torch.testing.assert_close(ns["logits"].detach(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
