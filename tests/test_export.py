"""train -> export -> load in open_clip and transformers, with the training model's embeddings/logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import plait
from pipeline.artifacts import export as ex
from pipeline.artifacts.hf import export_hf, hf_config
from pipeline.models.sizes import model_config
from pipeline.models.towers import build_clip, tokenizer_for
from tests.helpers.tolerance import assert_close
from tests.helpers.fmnist_fixture import BATCH, STEPS, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def training_model(run_dir: Path):
    state, cfg = ex.load_checkpoint_model(run_dir)
    model = build_clip(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def all_pt_load_weights_only(folder: Path) -> int:
    files = list(folder.rglob("*.pt"))
    for f in files:
        torch.load(f, weights_only=True)
    return len(files)


def test_open_clip_export_loads_both_ways_with_training_embeddings(run, tmp_path):
    out = tmp_path / "oc"
    assert plait.main(["export", str(run["run_dir"]), "--format", "open_clip", "--out", str(out)]) == 0
    reference, cfg = training_model(run["run_dir"])
    images, tokens = ex.fixed_batch(cfg)
    expected = ex.embeddings(reference, images, tokens)

    from_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert ex.max_error(expected, ex.embeddings(from_dir, images, tokens)) < 1e-5
    meta = json.loads((out / "plait_metadata.json").read_text())
    open_clip.add_model_config(out / f"{meta['name']}.json")
    from_pt = open_clip.create_model(meta["name"], pretrained=str(out / "open_clip_model.pt"))
    assert ex.max_error(expected, ex.embeddings(from_pt, images, tokens)) < 1e-5
    assert all_pt_load_weights_only(out) == 1
    assert all_pt_load_weights_only(run["run_dir"]) >= 3  # the training checkpoint's own .pt files

    # The model card: history, datasets' manifest hashes, preprocess and tokenizer settings.
    assert meta["training"]["step"] == STEPS and meta["training"]["samples_seen"] == STEPS * BATCH
    assert meta["training"]["objectives"] == {"contrastive": 1.0}
    manifests = meta["training"]["datasets"][0]["manifests"]
    sizes = [p for p in manifests if p.endswith("sizes.json")]
    assert sizes and manifests[sizes[0]] == __import__("hashlib").sha256(Path(sizes[0]).read_bytes()).hexdigest()
    assert meta["preprocess_cfg"]["size"] == 28 and meta["tokenizer"]["context_length"] == 16
    assert meta["self_check"]["max_abs_error"] < 1e-5
    readme = (out / "README.md").read_text()
    assert f"| steps | {STEPS} |" in readme and "local-dir:" in readme


def test_hf_export_matches_open_clip_logits_and_tokenizer(run, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    out = tmp_path / "hf"
    assert plait.main(["export", str(run["run_dir"]), "--format", "hf", "--out", str(out)]) == 0
    reference, cfg = training_model(run["run_dir"])
    images, tokens = ex.fixed_batch(cfg)
    img, txt = ex.embeddings(reference, images, tokens)
    expected = reference.logit_scale.exp() * img @ txt.T
    hf = CLIPModel.from_pretrained(out).eval()
    assert hf.config.text_config.hidden_act == "gelu" and hf.config.vision_config.hidden_act == "gelu"
    with torch.no_grad():
        got = hf(input_ids=tokens, pixel_values=images).logits_per_image
    assert_close(got, expected, rtol=1e-5)

    texts = ["A photo of a Sneaker!", "an ankle boot", "t-shirt/top"]
    hf_ids = CLIPTokenizer.from_pretrained(out)(texts, padding="max_length", max_length=16).input_ids
    ours = tokenizer_for(cfg)(texts).tolist()
    for a, b in zip(hf_ids, ours):
        end = b.index(49407) + 1
        assert a[:end] == b[:end]  # identical up to end-of-text; padding ids differ and are masked out


def test_quick_gelu_models_export_with_quick_gelu_and_bf16(tmp_path):
    from transformers import CLIPModel

    cfg = dict(model_config("fmnist-vit"), quick_gelu=True)
    torch.manual_seed(0)
    model = build_clip(cfg)
    out = export_hf(model.state_dict(), cfg, tmp_path / "q", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == "quick_gelu"
    assert load_file(out / "model.safetensors")["logit_scale"].dtype == torch.bfloat16
    assert CLIPModel.from_pretrained(out).config.vision_config.hidden_act == "quick_gelu"
    meta = json.loads((out / "plait_metadata.json").read_text())
    assert meta["dtype"] == "bf16" and 0 < meta["self_check"]["dtype_error"] < 0.05


@pytest.mark.parametrize("change, words", [
    ({"init_logit_bias": -10.0}, "sigmoid-loss"),
    ({"vision_cfg": {"ls_init_value": 0.1}}, "vision_cfg.ls_init_value"),
    ({"text_cfg": {"pool_type": "last"}}, "text_cfg.pool_type"),
])
def test_hf_refuses_architectures_it_cannot_express(change, words):
    cfg = model_config("fmnist-vit")
    for key, value in change.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    with pytest.raises(ValueError, match=words):
        hf_config(cfg)


def test_sigmoid_model_carries_init_logit_bias_and_loads_strictly(tmp_path):
    cfg = model_config("fmnist-vit")
    sig = build_clip(dict(cfg, init_logit_bias=-7.5))
    with torch.no_grad():
        sig.logit_bias.fill_(-6.25)
    # A compiled/DDP-wrapped state dict: prefixes must not reach the export.
    state = {f"module._orig_mod.{k}": v for k, v in sig.state_dict().items()}
    out = ex.export_open_clip(state, cfg, tmp_path / "sig")
    saved = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert saved["init_logit_bias"] == -6.25
    keys = load_file(out / "open_clip_model.safetensors").keys()
    assert "logit_bias" in keys and not any("module" in k or "_orig_mod" in k for k in keys)
    loaded = open_clip.create_model_and_transforms(f"local-dir:{out}")[0]
    assert loaded.logit_bias.item() == -6.25
    assert torch.load(out / "open_clip_model.pt", weights_only=True)["logit_bias"].item() == -6.25


def test_safetensors_export_with_heads_and_dtype(run, tmp_path):
    # A checkpoint with an objective head (written here the way the loop would).
    src = Path(ex.checkpoint_dir(run["run_dir"]))
    ckpt = tmp_path / "run" / "checkpoints" / src.name
    shutil.copytree(src, ckpt)
    model = load_file(ckpt / "model.safetensors")
    model["heads.mae.decoder.weight"] = torch.randn(8, 4)
    save_file(model, ckpt / "model.safetensors")

    out = tmp_path / "raw"
    assert plait.main(["export", str(ckpt), "--format", "safetensors", "--heads", "--dtype", "fp16",
                       "--out", str(out)]) == 0
    towers, heads = load_file(out / "towers.safetensors"), load_file(out / "heads.safetensors")
    assert towers["visual.conv1.weight"].dtype == torch.float16
    assert torch.equal(towers["logit_scale"], model["clip.logit_scale"].half())
    assert list(heads) == ["mae.decoder.weight"]


def test_failed_self_check_keeps_nothing(run, tmp_path, monkeypatch):
    import pipeline.artifacts.hf as hf_mod

    original = hf_mod.to_hf_state

    def corrupt(state, cfg):  # a mapping bug: one block's q and k swapped
        out = original(state, cfg)
        q = "text_model.encoder.layers.0.self_attn.q_proj.weight"
        k = q.replace("q_proj", "k_proj")
        out[q], out[k] = out[k], out[q]
        return out

    monkeypatch.setattr(hf_mod, "to_hf_state", corrupt)
    with pytest.raises(RuntimeError, match="self-check failed"):
        ex.export(ex.load_source(run["run_dir"]), "hf", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    assert plait.main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_export_refuses_a_directory_it_did_not_write_and_replaces_its_own(run, tmp_path, capsys):
    # --out pointing at the run directory once replaced the run's checkpoints and metrics with the export.
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert plait.main(["export", str(run_dir), "--out", str(run_dir)]) == 2
    assert "not a plait export" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert plait.main(["export", str(run_dir), "--format", "safetensors", "--out", str(notes)]) == 2
    assert (notes / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert plait.main(["export", str(run_dir), "--out", str(tmp_path / "file")]) == 2

    # New, empty, or an earlier export: written (and re-written) in place.
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    assert plait.main(["export", str(run_dir), "--format", "safetensors", "--out", str(empty)]) == 0
    assert plait.main(["export", str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    assert plait.main(["export", str(run_dir), "--format", "safetensors", "--dtype", "bf16", "--out", str(out)]) == 0
    assert load_file(out / "towers.safetensors")["logit_scale"].dtype == torch.bfloat16
    assert (out / ".plait-export").is_file() and (empty / "towers.safetensors").is_file()


def test_exported_and_checkpoint_files_follow_the_umask(run, tmp_path):
    import os
    previous = os.umask(0o022)
    try:
        out = ex.export(ex.load_source(run["run_dir"]), "safetensors", tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes["towers.safetensors"] == 0o644 and modes["out"] == 0o755, modes
    assert set(modes.values()) <= {0o644, 0o755}, modes
    ckpt = ex.checkpoint_dir(run["run_dir"])  # written by the fixture's training run under the default umask
    mask = os.umask(0)
    os.umask(mask)
    assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
