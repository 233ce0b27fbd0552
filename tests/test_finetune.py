"""Fine-tuning from an exported model on Fashion-MNIST shards improves over its zero-shot head."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import plait
from pipeline.artifacts.load import load_model
from pipeline.eval.finetune import Classifier, ClassifierHead, evaluate_classifier, layer_id, param_groups
from pipeline.models.sizes import model_config
from pipeline.models.towers import build_clip
from tests.helpers.fmnist_fixture import EVAL_TEMPLATES, STEPS, trained_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    out = run["root"] / "export"
    if not out.exists():
        assert plait.main(["export", str(run["run_dir"]), "--out", str(out)]) == 0
    return run, out


def test_layer_decay_scales_lr_by_depth():
    clip = build_clip(model_config("fmnist-vit"))  # 4 image blocks
    model = Classifier(clip, nn.Linear(128, 10))
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5, num_layers=4, train_tower=True)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == 1.0
    assert lr_of[id(named["clip.visual.proj"])] == 1.0
    assert lr_of[id(named["clip.visual.transformer.resblocks.3.mlp.c_fc.weight"])] == 0.5
    assert lr_of[id(named["clip.visual.transformer.resblocks.0.mlp.c_fc.weight"])] == 0.5 ** 4
    assert lr_of[id(named["clip.visual.conv1.weight"])] == 0.5 ** 5
    assert id(named["clip.token_embedding.weight"]) not in lr_of  # the text tower is not trained
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(named["clip.visual.ln_post.weight"])] == 0.0
    assert layer_id("hf.vision_model.encoder.layers.2.mlp.fc1.weight", 4) == 3


@pytest.mark.parametrize("mode, extra", [("linear", ["--epochs", "3", "--lr", "3e-3"]),
                                         pytest.param("full", ["--epochs", "2", "--lr", "3e-4", "--layer-decay", "0.8"],
                                                      marks=pytest.mark.slow)])
def test_finetune_improves_over_zero_shot_and_exports(exported, tmp_path, mode, extra):
    run, model_dir = exported
    root = run["root"]
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(EVAL_TEMPLATES) + "\n")
    out, result_file = tmp_path / "ft", tmp_path / "result.json"
    assert plait.main(["finetune", str(model_dir), "--train-data", f"{root}/train/{{00000..00001}}.tar",
                       "--test-data", f"{root}/test/{{00000..00001}}.tar", "--templates", str(templates),
                       "--mode", mode, "--batch-size", "64", "--out", str(out), "--output", str(result_file),
                       *extra]) == 0
    result = json.loads(result_file.read_text())
    zero_shot, tuned = result["zero_shot"]["top1"], result["finetuned"]["top1"]
    assert result["zero_shot"]["num_samples"] == 600
    assert tuned > zero_shot + 0.05, (zero_shot, tuned)

    # The export reloads as an open_clip model; with the saved head it scores what the run reported.
    loaded = load_model(out)
    head = ClassifierHead(loaded.model_cfg["embed_dim"], 10)
    head.load_state_dict(load_file(out / "classifier.safetensors"))
    names = (out / "classnames.txt").read_text().split("\n")[:10]
    again = evaluate_classifier(Classifier(loaded.model, head), run["test"], loaded.transform, names, 128, "cpu")
    assert again["top1"] == pytest.approx(tuned, abs=1 / 600)
    meta = json.loads((out / "plait_metadata.json").read_text())
    assert meta["finetune"]["mode"] == mode and meta["eval"]["finetuned"]["top1"] == pytest.approx(tuned)
    assert meta["training"]["step"] == STEPS  # the pretraining history travels with the fine-tuned model
    if mode == "linear":  # the image tower is untouched in linear mode
        before = load_file(model_dir / "open_clip_model.safetensors")
        after = load_file(out / "open_clip_model.safetensors")
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_user_errors(exported, tmp_path, capsys):
    run, model_dir = exported
    assert plait.main(["finetune", str(model_dir), "--train-data", str(tmp_path / "none"),
                       "--test-data", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [(["--weight-decay", "-1"], "--weight-decay"),
                                          (["--layer-decay", "1.5"], "--layer-decay"),
                                          (["--max-test-samples", "-3"], "--max-test-samples")])
def test_finetune_config_is_validated_once_and_names_the_flag(tmp_path, capsys, flags, words):
    # Checked when the typed config is built, before any model or data is read.
    assert plait.main(["finetune", str(tmp_path / "none"), "--train-data", "x", "--test-data", "y", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "not found" not in err


def test_finetune_help_comes_from_the_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        plait.main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "Layer-wise LR decay in full mode" in out and "--model ARCH" in out and "(default: 128)" in out
