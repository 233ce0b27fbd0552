"""Shards sized by bytes (--shard-bytes): the pilot's rows per shard hit the target on real photos, respect the
--samples-per-shard cap, are recorded once in _plan.json and reused by resumes and array tasks (same dataset as
one uninterrupted run), and bad sizes are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import plait
from data_prep.job import run
from data_prep.cli import build_parser, job_options, main
from data_prep.maintenance.merge import read_plan
from pipeline.options import parse_size
from data_prep.job.plan import rows_for_bytes
from data_prep.input.sources import read_rows
from data_prep.shards.writer import OutputDir
from tests.helpers.prep_corpus import real_photos
from tests.helpers.prep_tables import dataset_digest, photo_table

TARGET = 150_000

PHOTOS = "/usr/share/doc/opencv-doc"  # the tables name photos here: a folder the tests allow explicitly


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    photos = real_photos()
    assert len(photos) >= 60, "opencv-doc examples missing (make install)"
    return photo_table(tmp_path_factory.mktemp("in"), photos * 2)  # ~160 rows: more than the 64-row pilot


def _args(table: Path, out: Path, *extra: str) -> list[str]:
    return ["shard", "--no-progress", "--processes", "1", "--image-size", "64", "--no-dedup", "--local-root", PHOTOS,
            "--input", str(table),
            "--output", str(out), *extra]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_shards_come_out_near_the_byte_target(tmp_path, table, capsys):
    out = tmp_path / "o"
    main(_args(table, out, "--shard-bytes", "150kB"))
    plan = json.loads((out / "_plan.json").read_text())
    sizing = plan["sizing"]
    assert plan["shard_bytes"] == TARGET and plan["samples_per_shard"] is None  # no cap unless asked
    assert sizing["pilot_rows"] == 64 and 5 <= sizing["samples_per_shard"] <= 60
    shards = _manifest(out)["shards"]
    assert len(shards) >= 4
    for s in shards[:-1]:
        assert abs(s["bytes"] - TARGET) <= 0.25 * TARGET, (s["name"], s["bytes"])
    assert shards[-1]["bytes"] <= 1.25 * TARGET
    sizes = json.loads((out / "sizes.json").read_text())
    assert set(sizes.values()) >= {sizing["samples_per_shard"]}
    printed = capsys.readouterr().out
    assert f"-> {sizing['samples_per_shard']} rows per shard" in printed  # derived value, when planned
    assert "shard bytes: mean" in printed and "target 150 kB" in printed  # actual vs target, in the summary
    assert main(["verify", str(out)]) == 0
    assert read_plan(OutputDir(str(out))).samples_per_shard == sizing["samples_per_shard"]  # what repair cuts by


def test_samples_per_shard_caps_the_byte_target(tmp_path, table):
    main(_args(table, tmp_path / "capped", "--shard-bytes", "1GiB", "--samples-per-shard", "40"))
    assert json.loads((tmp_path / "capped" / "_plan.json").read_text())["sizing"]["samples_per_shard"] == 40
    assert max(json.loads((tmp_path / "capped" / "sizes.json").read_text()).values()) == 40
    # a small target under a loose cap: the bytes decide
    main(_args(table, tmp_path / "bytes", "--shard-bytes", "60KB", "--samples-per-shard", "40"))
    per = json.loads((tmp_path / "bytes" / "_plan.json").read_text())["sizing"]["samples_per_shard"]
    assert 1 <= per < 40
    assert max(json.loads((tmp_path / "bytes" / "sizes.json").read_text()).values()) == per


def test_resume_and_array_tasks_reuse_the_plan_and_match_one_run(tmp_path, table, monkeypatch):
    args = ("--shard-bytes", "100KB", "--extra-cols", "source")
    main(_args(table, tmp_path / "ref", *args))

    # a job that dies in the middle of the input, after some shards are finished
    resumed = tmp_path / "resumed"
    opts = job_options(build_parser().parse_args(_args(table, resumed, *args)))

    def dies_at_row_120():
        for row in read_rows(opts.source):
            if row.index == 120:
                raise RuntimeError("killed")
            yield row

    with pytest.raises(RuntimeError, match="killed"):
        run.run_task(opts, rows=dies_at_row_120(), progress=False, log=lambda _: None)
    assert 1 <= len(list(resumed.glob("*_stats.json"))) < len(list((tmp_path / "ref").glob("*.tar")))

    def no_second_pilot(*_a, **_k):
        raise AssertionError("the rows per shard must come from _plan.json, not a new pilot")

    with monkeypatch.context() as m:
        m.setattr(run, "resolve_sizing", no_second_pilot)
        main(_args(table, resumed, *args))
    assert dataset_digest(resumed) == dataset_digest(tmp_path / "ref")

    # array: task 1 finds no _plan.json and runs the pilot itself; task 0 reuses what it recorded
    array = tmp_path / "array"
    main(_args(table, array, *args, "--task-index", "1", "--num-tasks", "2"))
    with monkeypatch.context() as m:
        m.setattr(run, "resolve_sizing", no_second_pilot)
        main(_args(table, array, *args, "--task-index", "0", "--num-tasks", "2"))
    main(["merge", str(array)])
    assert dataset_digest(array) == dataset_digest(tmp_path / "ref")
    plans = [json.loads((d / "_plan.json").read_text()) for d in (tmp_path / "ref", resumed, array)]
    assert plans[0]["sizing"] == plans[1]["sizing"] == plans[2]["sizing"]  # independent pilots agree


def test_plan_is_written_once_and_refuses_other_settings(tmp_path, table):
    out = tmp_path / "o"
    opts = job_options(build_parser().parse_args(_args(table, out, "--shard-bytes", "100KB")))
    rows = list(read_rows(opts.source))
    # the first writer's sizing (from a 3-row pilot here) wins; a later task adopts it instead of measuring
    first = run.ensure_plan(OutputDir(str(out)), opts, lambda k: rows[:3], log=lambda _: None)
    later = run.ensure_plan(OutputDir(str(out)), opts, lambda k: rows[:k], log=lambda _: None)
    assert first.sizing["pilot_rows"] == 3 and later.sizing == first.sizing
    assert later.rows_per_shard == first.sizing["samples_per_shard"]
    assert not list(out.glob("_plan.json.candidate-*"))
    for changed, key in ((["--shard-bytes", "200KB"], "--shard-bytes"), ([], "--shard-bytes"),
                         (["--shard-bytes", "100KB", "--samples-per-shard", "10"], "--samples-per-shard")):
        with pytest.raises(ValueError, match=key):
            main(_args(table, out, *changed))


def test_bad_sizes_are_one_line_errors(tmp_path, table, capsys):
    assert parse_size("500MB") == 500_000_000 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    assert parse_size("1.5 kb") == 1500
    for bad in ("12XB", "lots", "0", "-5MB", "1e6"):
        with pytest.raises(ValueError, match=rf"--shard-bytes '{bad}'"):
            main(_args(table, tmp_path / "o", f"--shard-bytes={bad}"))
    capsys.readouterr()
    assert plait.main(["prep", *_args(table, tmp_path / "o", "--shard-bytes", "2 parsecs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shard-bytes '2 parsecs'" in err
    assert not (tmp_path / "o").exists()  # refused before anything is written
    help_text = build_parser()._subparsers._group_actions[0].choices["shard"].format_help()
    assert "--shard-bytes SIZE" in help_text and "default: off" in help_text


def test_rows_for_bytes_is_pure_arithmetic():
    assert rows_for_bytes(1_000_000, 10_000.0, 10_240, None) == 98
    assert rows_for_bytes(1_000_000, 10_000.0, 10_240, 50) == 50  # the cap wins
    assert rows_for_bytes(1_000, 10_000.0, 10_240, None) == 1  # never an empty shard
    assert rows_for_bytes(1_000_000, 0.0, 10_240, 7) == 7  # a pilot that kept nothing: the cap


def test_a_job_with_fewer_shards_than_processes_says_how_to_use_them_all(tmp_path, table, capsys):
    """Processes own whole shards: one big shard on 2 processes leaves one idle, and the summary says so."""
    main(["shard", "--no-progress", "--processes", "2", "--image-size", "64", "--no-dedup", "--local-root", PHOTOS,
          "--input", str(table),
          "--output", str(tmp_path / "o")])
    rows = _manifest(tmp_path / "o")["num_input_rows"]
    assert f"1 shard(s) for 2 processes, so 1 sat idle; --samples-per-shard {-(-rows // 4)} or less" in \
        capsys.readouterr().out
