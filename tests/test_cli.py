"""The `plait` console script: every subcommand explains itself, and user mistakes give one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from plait import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]


def plait(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "plait", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_of_every_subcommand(command):
    out = plait(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: plait" in out.stdout and len(out.stdout.splitlines()) > 5


def test_top_level_usage_lists_commands():
    out = plait("--help")
    assert out.returncode == 0
    for command in SUBCOMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "--config", "does/not/exist.toml"], "config file not found: does/not/exist.toml"),
    (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "--set", "data.train_shards=/nonexistent/{0..3}.tar", "--set", "train.device=cpu"],
     "/nonexistent/0.tar"),
    (["train", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["export", "/nonexistent/run", "--out", "x"], "/nonexistent/run"),
    (["prep", "shard", "--input", "/nonexistent/table.parquet", "--output", "out"], "/nonexistent/table.parquet"),
])
@pytest.mark.slow
def test_user_mistakes_are_one_line_errors(args, message, tmp_path):
    out = plait(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr
