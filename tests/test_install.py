"""plait as users install it: the wheel (what `pip install .` and docker/Dockerfile build), installed into a fresh
venv, run from a directory outside the checkout. Also the Docker and Apptainer images, where those tools run.

The fresh venv gets the heavy dependencies (torch, open_clip, ...) from this interpreter's site-packages through
a plain path in a .pth file, which adds that folder only (its own .pth files, among them an editable install of
this checkout, are not executed), so `import pipeline` can only find the installed wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "plait.py", "README.md", "pipeline", "data_prep", "launch")


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding plait from its wheel only; returns the venv folder."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # what the Dockerfile copies: building in a copy leaves no build/ in the checkout
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (REPO / name).is_dir() else {}))
    # every step without the caller's PYTHONPATH: with the checkout on it, pip sees the checkout's plait.egg-info as
    # plait already installed and skips the wheel
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(src)], cwd=root, env=_env())
    wheel = next((root / "dist").glob("plait-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=_env())
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root,
                     env=_env()).strip())
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "zz_plait_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=root, env=_env())
    return venv


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.mark.install
@pytest.mark.slow
def test_wheel_carries_the_presets_and_imports_from_the_install(installed, tmp_path):
    out = _run([str(installed / "bin" / "python"), "-c", "import pipeline, data_prep, launch, plait; "
                "from pipeline.presets import resolve; print(pipeline.__file__); print(resolve('tiny'))"],
               cwd=tmp_path, env=_env())
    assert all(line.startswith(str(installed)) for line in out.split()), out  # nothing from the checkout
    help_text = _run([str(installed / "bin" / "plait"), "--help"], cwd=tmp_path, env=_env())
    assert "demo" in help_text and "prep" in help_text


@pytest.mark.install
@pytest.mark.slow
def test_installed_demo_runs_from_any_directory(installed, tmp_path):
    from tests.helpers.fmnist_subset import SOURCE, write_subset
    if not SOURCE.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    write_subset(tmp_path / "fm", num_train=512, num_test=200)
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _run([str(installed / "bin" / "plait"), "demo", "--fashion-mnist", str(tmp_path / "fm"),
                "--samples-per-shard", "256", "--set", "train.steps=6", "--set", "data.batch_size=32",
                "--set", "optim.warmup_steps=2", "--set", "train.log_every=2", "--set", "data.num_workers=0",
                "--set", "eval.batch_size=200"], cwd=work, env=_env(), timeout=600)
    assert "[4/4] report" in out and "zero-shot top-1" in out
    assert (work / "runs" / "demo" / "report.json").is_file()
    assert (work / "runs" / "demo" / "export" / "open_clip_config.json").is_file()


def _works(cmd: list[str]) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.install
@pytest.mark.slow
@pytest.mark.skipif(not _works(["docker", "info"]), reason="no Docker daemon on this machine (CI runners have one)")
def test_docker_image_builds_and_trains(tmp_path):
    from tests.helpers.fmnist_fixture import write_shards
    tag = "plait:test"
    _run(["docker", "build", "-f", "docker/Dockerfile", "-t", tag, "."], cwd=REPO, timeout=3600)
    assert "usage: plait" in _run(["docker", "run", "--rm", tag, "--help"], cwd=REPO)
    write_shards(tmp_path / "shards", "train", 64, per_shard=32, fmt="jpg")
    os.chmod(tmp_path, 0o777)
    _run(["docker", "run", "--rm", "-v", f"{tmp_path}:/data", tag, "train", "--config", "tiny",
          "--set", "data.train_shards=/data/shards/{00000..00001}.tar", "--set", "train.steps=2",
          "--set", "data.batch_size=16", "--set", "train.run_dir=/data/run"], cwd=REPO, timeout=600)
    assert (tmp_path / "run" / "report.json").is_file()


@pytest.mark.install
@pytest.mark.slow
@pytest.mark.skipif(not _works(["apptainer", "--version"]), reason="Apptainer is not installed on this machine")
def test_apptainer_image_builds_and_trains(tmp_path):
    from tests.helpers.fmnist_fixture import write_shards
    sif = tmp_path / "plait.sif"
    _run(["apptainer", "build", str(sif), "docker/plait.def"], cwd=REPO, timeout=3600)
    write_shards(tmp_path / "shards", "train", 64, per_shard=32, fmt="jpg")
    _run(["apptainer", "run", "--bind", f"{tmp_path}:/data", str(sif), "train", "--config", "tiny",
          "--set", "data.train_shards=/data/shards/{00000..00001}.tar", "--set", "train.steps=2",
          "--set", "data.batch_size=16", "--set", "train.run_dir=/data/run"], cwd=REPO, timeout=600)
    assert (tmp_path / "run" / "report.json").is_file()


def test_config_takes_a_preset_name_or_a_path_from_any_directory(tmp_path, monkeypatch):
    from pipeline.config import load_config
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").train.steps == load_config("tiny.toml").train.steps > 0
    own = tmp_path / "tiny.toml"
    own.write_text("[train]\nsteps = 3\n")
    assert load_config("tiny.toml").train.steps == 3  # an existing file wins over the preset
    with pytest.raises(FileNotFoundError, match="nor a preset name: clip-vit-b32-gpu, demo, .*tiny"):
        load_config("tinyy")
