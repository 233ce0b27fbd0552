"""Config parsing: presets, overrides, and the errors users see for bad keys and values."""
import dataclasses

import pytest

from pipeline.config import Config, describe, field_docs, load_config, save_config


def test_defaults_validate_and_every_field_is_documented():
    cfg = load_config()
    assert cfg.model.name == "fmnist-vit"
    for section in dataclasses.fields(Config):
        cls = type(getattr(cfg, section.name))
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{section.name}] fields without a docstring: {missing}"


def test_toml_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[optim]\nlr = 0.01\n[train]\nsteps = 50\n[eval]\ntemplates = ["a {}"]\n')
    cfg = load_config(preset, ["optim.lr=5e-4", "train.precision=bf16", "data.train_shards=a/{0..3}.tar",
                               'eval.classnames=["cat", "dog"]'])
    assert cfg.optim.lr == 5e-4 and cfg.train.steps == 50 and cfg.train.precision == "bf16"
    assert cfg.data.train_shards == "a/{0..3}.tar"
    assert cfg.eval.classnames == ("cat", "dog") and cfg.eval.templates == ("a {}",)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "objective.siglip=0.5", 'eval.classnames=["a", "b"]'])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("train.precision=fp8", "'train.precision': 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
    ("train.steps=ten", "'train.steps' expects int"),
    ("train.steps=0", "'train.steps': must be positive"),
    ("data.batch_size=true", "'data.batch_size' expects int"),
    ("objective.mae=1.0", "'objective.mae': needs objective.flip.mask_ratio > 0"),
    ("train=3", "'train' is a section"),
    ("justakey", "--set expects section.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)


def test_describe_lists_every_key_with_choices():
    text = "\n".join(describe())
    assert "train.precision = 'fp32'  (one of fp32, bf16, fp16)" in text
    assert "data.train_shards" in text and "objective.flip.mask_ratio" in text
