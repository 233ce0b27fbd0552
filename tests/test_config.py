"""Config parsing: presets, overrides, and the errors users see for bad keys and values."""
import dataclasses
import json
import re
import typing

import pytest

from pipeline.config import Config, check_template, describe, field_docs, load_config, save_config


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


@pytest.mark.parametrize("override, message", [
    ("train.timeout_s=inf", "'train.timeout_s' must be a finite number, got inf"),
    ("train.max_time_s=nan", "'train.max_time_s' must be a finite number, got nan"),
    ("model.patch_dropout=1.5", "'model.patch_dropout': must lie in [0, 1)"),
    ("train.seed=-1", "'train.seed': must lie in [0, 2147483647]"),
    (f"data.seed={2**65}", "'data.seed': 36893488147419103232 does not fit in 64 bits"),
    (f"data.seed={2**40}", "'data.seed': must lie in [0, 2147483647]"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay': must be >= 0"),
    ("optim.beta2=1.0", "'optim.beta2': must lie in [0, 1)"),
    ("optim.eps=0", "'optim.eps': must be positive"),
    ("optim.grad_clip=-1", "'optim.grad_clip': must be >= 0"),
    ("train.checkpoint_every=-5", "'train.checkpoint_every': must be >= 0"),
    ("train.eval_every=-1", "'train.eval_every': must be >= 0"),
    ("data.max_bad_fraction=nan", "'data.max_bad_fraction' must be a finite number"),
])
def test_out_of_range_numbers_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def _numeric_keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _numeric_keys(hints[f.name], prefix + f.name + ".")
        elif hints[f.name] in (int, float):
            yield prefix + f.name, hints[f.name]


@pytest.mark.parametrize("key, kind", list(_numeric_keys()))
def test_every_numeric_key_refuses_non_finite_and_oversized_values(key, kind):
    """A sweep over every int and float field, including ones added later: nan/inf and numbers beyond 64 bits are
    a one-line error naming the key, never a run that fails (or hangs) later."""
    bad = ("nan", "inf", "-inf") if kind is float else (str(2**65), str(-(2**65)))
    for value in bad:
        with pytest.raises(ValueError) as err:
            load_config(None, [f"{key}={value}"])
        assert repr(key) in str(err.value) and "\n" not in str(err.value), (value, str(err.value))


@pytest.mark.parametrize("template, found", [
    ("a photo of a {c}.", "{c}"), ("{0} and {1}", "{0}, {1}"), ("a {} or a {}", "{}, {}"), ("a {name}", "{name}"),
    ("no placeholder", "none"),
])
def test_eval_templates_need_exactly_one_empty_placeholder(template, found):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"eval.templates={json.dumps([template])}"])
    assert f"template {template!r}" in str(err.value) and f"(found: {found})" in str(err.value)
    with pytest.raises(ValueError, match="is malformed"):
        check_template("a {", "eval.templates")
    assert check_template("a {{literal}} {}.", "eval.templates")  # escaped braces are text


def test_tracker_names_are_accelerates():
    import accelerate.tracking
    from pipeline.config import TRACKERS
    assert set(TRACKERS) == set(accelerate.tracking.LOGGER_TYPE_TO_CLASS)


@pytest.mark.parametrize("override,words", [
    ("train.run_dir=s3://runs/r1", "'s3://runs/r1' is not a local directory: checkpoints go to object storage "
                                   "through train.remote_dir"),
    ("train.report_to=['tensorboard', 'neptune']", "'neptune' is not a tracker Accelerate has"),
    ("data.cache_dir=s3://b/cache", "'data.cache_dir': 's3://b/cache' must be a local folder"),
    ("data.cache_bytes=lots", "data.cache_bytes': 'lots': expected a size"),
])
def test_storage_and_tracker_keys_are_checked(override, words):
    """A run dir on object storage was written into a local folder named `s3:`; now it is refused."""
    with pytest.raises(ValueError, match=re.escape(words)):
        load_config("tiny", [override])
