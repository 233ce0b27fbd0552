"""`plait prep score` and `plait prep filter` on real Fashion-MNIST shards: scores equal open_clip's own, the filter
keeps the best-scored samples byte for byte into a dataset that verifies and trains, resumes, refuses bad input."""
from __future__ import annotations

import io
import itertools
import json
import shutil
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import plait
from data_prep.maintenance import merge as merge_mod
from data_prep.curate.dedup import near_duplicates
from data_prep.curate.filter import FilterOptions, filter_dataset
from data_prep.options import JobOptions, SourceOptions
from data_prep.job.run import run_task
from data_prep.curate.score import ScoreOptions, score
from data_prep.input.sources import fashion_mnist_caption, read_rows
from data_prep.shards.tarwalk import TarFormatError, iter_samples
from data_prep.maintenance.verify import verify
from pipeline.artifacts.export import export_open_clip, load_checkpoint_model
from pipeline.models.towers import build_clip

from tests.helpers.fmnist_fixture import FMNIST, TEST_MODEL_CFG, register_test_model, trained_run, write_shards

REPO = Path(__file__).resolve().parents[1]


def noisy_dataset(folder: Path, n: int = 600, per_shard: int = 200, noise: float = 0.4, seed: int = 0) -> set[str]:
    """A plait dataset of the first `n` Fashion-MNIST test images, `noise` of the captions replaced by a caption of
    another class; returns the keys of the corrupted samples."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
    rng = random.Random(seed)
    corrupted = set()
    rows = []
    for row in itertools.islice(read_rows(SourceOptions(str(FMNIST), "fashion-mnist", split="test")), n):
        if rng.random() < noise:
            other = (row.extra["cls"] + rng.randrange(1, 10)) % 10
            row.caption = fashion_mnist_caption(row.index, other)
            corrupted.add(f"{row.index:09d}")
        rows.append(row)
    opts = JobOptions(output=str(folder), source=SourceOptions(str(FMNIST), "fashion-mnist", split="test"),
                      samples_per_shard=per_shard)
    run_task(opts, rows=iter(rows), progress=False, log=lambda s: None)
    merge_mod.merge(str(folder))
    return corrupted


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorefilter")
    corrupted = noisy_dataset(root / "noisy")
    torch.manual_seed(0)
    export_open_clip(build_clip(TEST_MODEL_CFG).state_dict(), TEST_MODEL_CFG, root / "untrained")
    return {"root": root, "noisy": root / "noisy", "corrupted": corrupted, "untrained": root / "untrained"}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = trained_run(tmp_path_factory)
    state, cfg = load_checkpoint_model(run["run_dir"])
    return export_open_clip(state, cfg, data["root"] / "trained")


def read_scores(folder: Path) -> dict[str, dict]:
    rows = {}
    for f in sorted(folder.glob("0*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["key"]] = r
    return rows


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_scores_are_open_clips_cosine_and_filter_keeps_the_best_byte_for_byte(data, trained, tmp_path):
    scores_dir = tmp_path / "scores"
    summary = score(ScoreOptions(str(data["noisy"]), str(trained), out=str(scores_dir), batch_size=64,
                                 num_workers=1, embeddings=True, progress=False))
    assert summary["num_samples"] == summary["num_scored"] == 600 and summary["num_null"] == 0
    rows = read_scores(scores_dir)
    manifest_keys = set(pq.read_table(data["noisy"] / "samples.parquet").column("key").to_pylist())
    assert set(rows) == manifest_keys

    # The same numbers through open_clip's own loader and preprocess (float path, no plait code).
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{trained}")
    members = tar_members(data["noisy"] / "00001.tar")
    keys = sorted({n.split(".")[0] for n in members})[:16]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(members[f"{k}.jpg"]))) for k in keys])
        fi = model.encode_image(images, normalize=True)  # [16, E]
        ft = model.encode_text(tokenizer([members[f"{k}.txt"].decode() for k in keys]), normalize=True)
    expected = (fi * ft).sum(-1).numpy()
    got = np.array([rows[k]["score"] for k in keys])
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))
    emb = np.array([rows[k]["image_embedding"] for k in keys], np.float32)
    np.testing.assert_allclose(emb, fi.numpy(), atol=2e-3)  # float16 storage

    # Even a 30-step model scores matching pairs above corrupted ones on average.
    clean = [r["score"] for k, r in rows.items() if k not in data["corrupted"]]
    bad = [r["score"] for k, r in rows.items() if k in data["corrupted"]]
    assert np.mean(clean) > np.mean(bad)

    out = tmp_path / "kept"
    result = filter_dataset(FilterOptions(str(data["noisy"]), str(out), scores=str(scores_dir), top_fraction=0.5,
                                          progress=False), log=lambda s: None)
    assert result["num_ok"] == 300 and result["num_input_rows"] == 600
    report = verify(str(out), decode_fraction=1.0)
    assert report.ok, report.problems
    records = pq.read_table(out / "samples.parquet").to_pylist()
    kept = {r["key"] for r in records if r["status"] == "ok"}
    cutoff = min(rows[k]["score"] for k in kept)
    assert all(rows[r["key"]]["score"] <= cutoff and r["reason"].startswith("score not in top fraction")
               for r in records if r["status"] != "ok")
    # members copied byte for byte
    for shard in ("00000.tar", "00002.tar"):
        src, dst = tar_members(data["noisy"] / shard), tar_members(out / shard)
        assert dst == {n: p for n, p in src.items() if n.split(".")[0] in kept}
    plan = json.loads((out / "_plan.json").read_text())["filter"]
    assert plan["top_fraction"] == 0.5 and plan["source"] == str(data["noisy"])
    assert plan["model"]["path"] == str(Path(trained).resolve())
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 300


def test_filtered_dataset_trains(data, tmp_path):
    from pipeline.config import load_config
    from pipeline.train.loop import run

    scores_dir = tmp_path / "scores"
    score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(scores_dir), num_workers=0,
                       progress=False))
    out = tmp_path / "kept"
    filter_dataset(FilterOptions(str(data["noisy"]), str(out), scores=str(scores_dir), min_score=-1.0,
                                 caption_rules=("exclude=sneaker",), progress=False))
    records = pq.read_table(out / "samples.parquet").to_pylist()
    assert {r["reason"].split(" (")[0] for r in records if r["status"] != "ok"} == {"caption rule exclude"}
    cfg = load_config(None, ["model.name='plait-test-fmnist'", f"data.train_shards='{out}/{{00000..00002}}.tar'",
                             "data.batch_size=32", "data.num_workers=0", "train.steps=2", f"train.run_dir='{tmp_path}/r'",
                             "train.device='cpu'", "optim.warmup_steps=1"])
    register_test_model(tmp_path)
    assert run(cfg)["steps"] == 2


def test_undecodable_sample_gets_null_with_reason_and_is_not_kept(data, tmp_path):
    ds = tmp_path / "ds"
    noisy_dataset(ds, n=200, per_shard=100)
    with tarfile.open(ds / "00001.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    key = member.name.split(".")[0]
    with open(ds / "00001.tar", "r+b") as f:  # same length, not an image any more
        f.seek(member.offset_data)
        f.write(b"\x00garbage" * (member.size // 8) + b"\x00" * (member.size % 8))
    summary = score(ScoreOptions(str(ds), str(data["untrained"]), num_workers=0, progress=False))
    assert summary["num_null"] == 1 and summary["num_scored"] == 199
    row = read_scores(ds / "scores")[key]
    assert row["score"] is None and row["reason"].startswith("undecodable (UnidentifiedImageError")
    result = filter_dataset(FilterOptions(str(ds), str(tmp_path / "out"), min_score=-1.0, progress=False))
    assert result["num_ok"] == 199 and result["reasons"] == {"not scored": 1}
    rec = next(r for r in pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist() if r["key"] == key)
    assert rec["status"] == "rejected" and "undecodable" in rec["reason"]


def test_score_and_filter_resume_per_shard(data, tmp_path):
    # an array task scores its contiguous range of shards only
    score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(tmp_path / "part"), num_workers=0,
                       progress=False, task_index=1, num_tasks=3))
    assert [p.name for p in (tmp_path / "part").glob("0*_stats.json")] == ["00001_stats.json"]
    scores_dir = tmp_path / "scores"
    opts = ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(scores_dir), num_workers=0,
                        embeddings=True, progress=False)
    score(opts)
    before = {p.name: p.stat().st_mtime_ns for p in scores_dir.glob("0*.parquet")}
    first = read_scores(scores_dir)
    (scores_dir / "00001_stats.json").unlink()  # as if killed before shard 1 finished
    summary = score(opts)
    assert summary["samples_this_run"] == 200
    after = {p.name: p.stat().st_mtime_ns for p in scores_dir.glob("0*.parquet")}
    assert after["00000.parquet"] == before["00000.parquet"] and after["00001.parquet"] != before["00001.parquet"]
    assert read_scores(scores_dir)["000000250"]["score"] == pytest.approx(first["000000250"]["score"], abs=1e-6)

    out = tmp_path / "kept"
    fopts = FilterOptions(str(data["noisy"]), str(out), scores=str(scores_dir), top_fraction=0.7,
                          dedup_embeddings=0.999, progress=False)
    filter_dataset(fopts)
    tar_before = (out / "00002.tar").read_bytes()
    (out / "00002_stats.json").unlink()
    (out / "00002.tar").write_bytes(b"partial")
    result = filter_dataset(fopts)
    assert result["shards_copied"] == 1 and (out / "00002.tar").read_bytes() == tar_before
    assert verify(str(out)).ok
    with pytest.raises(ValueError, match="other settings.*top_fraction"):
        filter_dataset(FilterOptions(str(data["noisy"]), str(out), scores=str(scores_dir), top_fraction=0.5,
                                     progress=False))


def test_near_duplicates_match_a_plain_greedy_reference():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 16))
    copies = base[rng.integers(0, 60, 90)] + rng.normal(scale=0.05, size=(90, 16))  # near-duplicates
    emb = np.concatenate([base, copies])
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    order = rng.permutation(len(emb))
    threshold = 0.98
    kept: list[int] = []
    expected = []
    for i in order:  # the definition: drop when cosine to an already kept one reaches the threshold
        e = emb[i].astype(np.float32)
        sims = [float(emb[k].astype(np.float32) @ e) for k in kept]
        expected.append(bool(sims) and max(sims) >= threshold)
        if not expected[-1]:
            kept.append(i)
    dropped, dup_of, cos = near_duplicates(lambda idx: emb[idx], order, threshold, chunk=7, block=5, capacity=4)
    assert dropped.tolist() == expected
    assert 80 <= dropped.sum() <= 90
    for p in np.flatnonzero(dropped):
        assert not dropped[dup_of[p]] and dup_of[p] < p
        assert cos[p] == pytest.approx(float(emb[order[p]].astype(np.float32) @ emb[order[dup_of[p]]].astype(
            np.float32)), abs=1e-5) and cos[p] >= threshold


def test_foreign_webdataset_folder_is_scored_and_tarwalk_reads_tarfiles_tars(data, tmp_path):
    urls = write_shards(tmp_path / "wds", "test", 40, 20, fmt="png")
    summary = score(ScoreOptions(str(tmp_path / "wds"), f"local-dir:{data['untrained']}", num_workers=0,
                                 progress=False))
    assert summary["num_scored"] == 40
    with pytest.raises(ValueError, match="not a plait dataset"):
        filter_dataset(FilterOptions(str(tmp_path / "wds"), str(tmp_path / "o"), min_score=0.0))
    # long member names (GNU and pax headers) and a truncated tar
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, payload in ((f"{'d' * 120}/k1.txt", b"a"), (f"{'d' * 120}/k1.jpg", b"bb"), ("k2.txt", b"c")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        samples = list(iter_samples(io.BytesIO(buf.getvalue())))
        assert [(s.key, s.members) for s in samples] == [(f"{'d' * 120}/k1", [("txt", b"a"), ("jpg", b"bb")]),
                                                        ("k2", [("txt", b"c")])]
    with pytest.raises(TarFormatError):
        list(iter_samples(io.BytesIO(Path(urls[0]).read_bytes()[:1500])))


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_give_the_single_process_scores(data, tmp_path):
    single = tmp_path / "one"
    score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(single), num_workers=0, progress=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "data_prep.curate.score", str(data["noisy"]), "--model", str(data["untrained"]), "--out",
                    str(tmp_path / "two"), "--num-workers", "0", "--no-progress"], check=True, env=env, cwd=REPO,
                   timeout=600)
    one, two = read_scores(single), read_scores(tmp_path / "two")
    assert one.keys() == two.keys()
    np.testing.assert_allclose([two[k]["score"] for k in one], [one[k]["score"] for k in one], atol=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_scored"] == 600


def test_bad_input_is_named(data, tmp_path, capsys):
    noisy, untrained = str(data["noisy"]), str(data["untrained"])
    (tmp_path / "notwds").mkdir()
    (tmp_path / "notwds" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="notwds.*not a WebDataset folder"):
        score(ScoreOptions(str(tmp_path / "notwds"), untrained))
    # a model whose preprocessing does not fit its image tower
    bad = tmp_path / "badmodel"
    bad.mkdir()
    for f in data["untrained"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "open_clip_config.json").read_text())
    cfg["preprocess_cfg"]["size"] = 32
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="badmodel.*preprocess_cfg size 32 does not match.*image_size 28"):
        score(ScoreOptions(noisy, str(bad), out=str(tmp_path / "s0")))
    # weights of another embedding size than the config says
    cfg["preprocess_cfg"]["size"] = 28
    cfg["model_cfg"]["embed_dim"] = 32
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="badmodel.*weights do not match its config.*size mismatch"):
        score(ScoreOptions(noisy, str(bad), out=str(tmp_path / "s0")))
    # one score folder holds one model's scores
    sdir = tmp_path / "s"
    score(ScoreOptions(noisy, untrained, out=str(sdir), num_workers=0, progress=False))
    cfg["model_cfg"]["embed_dim"] = 64
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    (bad / "extra.json").write_text("{}")  # a different folder content: another model fingerprint
    with pytest.raises(ValueError, match="holds scores of another run.*model"):
        score(ScoreOptions(noisy, str(bad), out=str(sdir)))
    # scores of another dataset
    other = tmp_path / "other"
    noisy_dataset(other, n=200, per_shard=100, seed=1)
    with pytest.raises(ValueError, match="computed on .*noisy.*not on .*other"):
        filter_dataset(FilterOptions(str(other), str(tmp_path / "o1"), scores=str(sdir), min_score=0.0))
    with pytest.raises(FileNotFoundError, match="no score folder"):
        filter_dataset(FilterOptions(str(other), str(tmp_path / "o1"), min_score=0.0))
    with pytest.raises(ValueError, match="needs image embeddings"):
        filter_dataset(FilterOptions(noisy, str(tmp_path / "o1"), scores=str(sdir), dedup_embeddings=0.9))
    with pytest.raises(ValueError, match="keeps nothing of the 600 samples.*score below threshold: 600"):
        filter_dataset(FilterOptions(noisy, str(tmp_path / "o2"), scores=str(sdir), min_score=1.0))
    assert not (tmp_path / "o2" / "_plan.json").exists()
    for kwargs, words in (({"min_score": 1.5}, "--min-score 1.5"), ({"top_fraction": 0.0}, "--top-fraction 0.0"),
                          ({"dedup_embeddings": 1.2}, "--dedup-embeddings 1.2"),
                          ({"caption_rules": ("max-words=x",)}, "max-words=x")):
        with pytest.raises(ValueError, match=words):
            FilterOptions(noisy, str(tmp_path / "o3"), **kwargs)
    # through the CLI: one line naming the flag, exit 2
    assert plait.main(["prep", "filter", noisy, "--output", str(tmp_path / "o4"), "--top-fraction", "1.5"]) == 2
    assert "plait prep: error: --top-fraction 1.5: must be in (0, 1]" in capsys.readouterr().err
    assert plait.main(["prep", "score", str(tmp_path / "notwds"), "--model", untrained]) == 2
    assert "not a WebDataset folder" in capsys.readouterr().err


def test_launch_score_renders_a_quoted_array_and_a_dependent_filter(tmp_path, capsys):
    import shlex

    from launch import cli as launch_cli

    dataset, model = str(tmp_path / "web data $(touch pwned)"), "/m/it's"
    assert launch_cli.main(["score", "--tasks", "3", "--run-dir", str(tmp_path / "run"), "--dry-run", "--filter",
                            "--output 'new set' --top-fraction 0.3", "--", dataset, "--model", model, "--out",
                            f"{dataset}/s"]) == 0
    array, filt = capsys.readouterr().out.split("# ---- filter job")
    assert "#SBATCH --array=0-2" in array
    line = next(x for x in array.splitlines() if x.startswith("exec "))
    assert shlex.split(line)[1:] == [sys.executable, "-m", "data_prep.cli", "score", dataset, "--model", model,
                                     "--out", f"{dataset}/s", "--task-index", "$SLURM_ARRAY_TASK_ID", "--num-tasks",
                                     "3"]
    line = next(x for x in filt.splitlines() if x.startswith("exec "))
    assert shlex.split(line)[1:] == [sys.executable, "-m", "data_prep.cli", "filter", dataset, "--output", "new set",
                                     "--top-fraction", "0.3", "--scores", f"{dataset}/s"]
    assert "pwned" not in filt.replace(line, "")


def test_truncated_shard_records_every_missing_key(data, tmp_path):
    ds = tmp_path / "ds"
    noisy_dataset(ds, n=200, per_shard=100)
    tar = ds / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # killed copy: half a tar
    summary = score(ScoreOptions(str(ds), str(data["untrained"]), num_workers=1, progress=False))
    rows = read_scores(ds / "scores")
    assert len(rows) == 200 and summary["num_samples"] == 200
    lost = [r for r in rows.values() if r["score"] is None]
    assert 40 <= len(lost) <= 60 and all(r["reason"].startswith("unreadable shard (TarFormatError") for r in lost)
    assert list(summary["shard_errors"]) == ["00001.tar"]


def test_filter_reruns_and_resumes_without_scores_flag(data, tmp_path):
    # The default score folder (DATASET/scores) is resolved before the plan is compared: the same command after
    # a finished run, or after a kill between shards, continues instead of "filtered with other settings".
    dataset = tmp_path / "ds"
    shutil.copytree(data["noisy"], dataset)
    score(ScoreOptions(str(dataset), str(data["untrained"]), num_workers=0, progress=False))
    out = tmp_path / "kept"
    opts = FilterOptions(str(dataset), str(out), top_fraction=0.5, progress=False)
    first = filter_dataset(opts, log=lambda s: None)
    assert filter_dataset(opts, log=lambda s: None)["num_ok"] == first["num_ok"]
    (out / "00001_stats.json").unlink()  # as if killed while copying shard 1
    assert filter_dataset(opts, log=lambda s: None)["shards_copied"] == 1
    plan = json.loads((out / "_plan.json").read_text())["filter"]
    assert plan["scores"] == f"{dataset}/scores"


def test_score_and_filter_write_only_into_new_empty_or_their_own_folders(data, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000_stats.json").write_text('{"successes": 9}')  # img2dataset's, not a finished score shard
    (foreign / "00003.tar").write_bytes(b"someone's shard")
    untouched = {p.name: p.read_bytes() for p in foreign.iterdir()}
    with pytest.raises(ValueError, match="--out .*holds 2 entries .*not an earlier output of `plait prep score`"):
        score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(foreign), num_workers=0,
                           progress=False))
    with pytest.raises(ValueError, match="--out .*not an earlier output of `plait prep score`"):
        score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(data["noisy"]), num_workers=0,
                           progress=False))  # the dataset itself
    with pytest.raises(ValueError, match="--output .*not an earlier output of `plait prep filter`"):
        filter_dataset(FilterOptions(str(data["noisy"]), str(foreign), min_image_size=1, progress=False))
    scores_dir = tmp_path / "scores"
    score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(scores_dir), num_workers=0,
                       progress=False))
    with pytest.raises(ValueError, match="--output .*not an earlier output of `plait prep filter`"):
        filter_dataset(FilterOptions(str(data["noisy"]), str(scores_dir), scores=str(scores_dir),
                                     top_fraction=0.5, progress=False))  # a neighbouring plait folder
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == untouched


@pytest.mark.parametrize("damage", ["inf score", "large score", "nan score", "duplicate key", "string scores",
                                    "no score column", "plan is an array", "plan without embedding_dim",
                                    "huge embedding_dim", "string embedding_dim", "nan embedding"])
def test_damaged_score_files_are_one_line_errors(data, tmp_path, damage):
    import pyarrow as pa

    scores_dir = tmp_path / "scores"
    score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(scores_dir), num_workers=0,
                       embeddings=True, progress=False))
    shard = scores_dir / "00001.parquet"
    table = pq.read_table(shard)
    plan_file = scores_dir / "_score_plan.json"
    plan = json.loads(plan_file.read_text())
    col = table.column("score").to_pylist()
    if damage in ("inf score", "large score", "nan score"):
        col[3] = {"inf score": float("inf"), "large score": 1e30, "nan score": float("nan")}[damage]
        table = table.set_column(table.schema.get_field_index("score"), "score", pa.array(col, pa.float32()))
    elif damage == "duplicate key":
        table = pa.concat_tables([table, table.slice(0, 1)])
    elif damage == "string scores":
        table = table.set_column(table.schema.get_field_index("score"), "score", pa.array([str(c) for c in col]))
    elif damage == "no score column":
        table = table.drop(["score"])
    elif damage == "nan embedding":
        emb = table.column("image_embedding").to_pylist()
        emb[2] = [float("nan")] * len(emb[2])
        table = table.set_column(table.schema.get_field_index("image_embedding"), "image_embedding",
                                 pa.array(emb, table.schema.field("image_embedding").type))
    else:
        plan = {"plan is an array": [plan], "plan without embedding_dim": {**plan, "embedding_dim": None},
                "huge embedding_dim": {**plan, "embedding_dim": 10**12},
                "string embedding_dim": {**plan, "embedding_dim": "64"}}[damage]
        plan_file.write_text(json.dumps(plan))
    pq.write_table(table, shard)
    opts = FilterOptions(str(data["noisy"]), str(tmp_path / "o"), scores=str(scores_dir), top_fraction=0.5,
                         dedup_embeddings=0.99, progress=False)
    with pytest.raises(ValueError, match=r"--scores .*(score|embedding|_score_plan)") as exn:
        filter_dataset(opts, log=lambda s: None)
    assert "\n" not in str(exn.value)


def test_filter_on_cuda_without_a_gpu_is_a_one_line_error(data, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    scores_dir = tmp_path / "scores"
    score(ScoreOptions(str(data["noisy"]), str(data["untrained"]), out=str(scores_dir), num_workers=0,
                       embeddings=True, progress=False))
    assert plait.main(["prep", "filter", str(data["noisy"]), "--output", str(tmp_path / "o"), "--scores",
                       str(scores_dir), "--dedup-embeddings", "0.99", "--device", "cuda"]) == 2


def test_a_garbage_tar_in_the_caption_pass_is_named(data, tmp_path):
    dataset = tmp_path / "ds"
    shutil.copytree(data["noisy"], dataset)
    (dataset / "00001.tar").write_bytes(b"\x01" * 4096)
    with pytest.raises(ValueError, match=r"00001.tar: unreadable tar in the caption rules' pass"):
        filter_dataset(FilterOptions(str(dataset), str(tmp_path / "o"), caption_rules=("min-words=1",),
                                     progress=False), log=lambda s: None)


@pytest.mark.parametrize("damage,words", [
    ("vocab 10^11", r"open_clip_config.json: the config describes a model of at least 6,400,[\d,]+ parameters"),
    ("width a string", r"open_clip_config.json: vision_cfg.width '64' is not a positive integer"),
    ("weights linked out", r"links to .*elsewhere.safetensors, outside its folder"),
])
def test_an_export_whose_config_or_weights_cannot_be_its_own_is_named(data, tmp_path, capsys, damage, words):
    """Fixture: a copy of the module's untrained export with one change to its config or its weights file."""
    bad = tmp_path / "export"
    shutil.copytree(data["untrained"], bad)
    where = bad / "open_clip_config.json"
    cfg = json.loads(where.read_text())
    if damage == "vocab 10^11":  # open_clip would allocate 10^11 x width floats
        cfg["model_cfg"]["text_cfg"]["vocab_size"] = 10 ** 11
    elif damage == "width a string":
        cfg["model_cfg"]["vision_cfg"]["width"] = "64"
    else:
        weights = next(bad.glob("*.safetensors"))
        shutil.move(weights, tmp_path / "elsewhere.safetensors")
        weights.symlink_to(tmp_path / "elsewhere.safetensors")
    where.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=words):
        score(ScoreOptions(str(data["noisy"]), str(bad), out=str(tmp_path / "s"), progress=False))
    assert plait.main(["eval", str(bad), "--data", str(data["noisy"]), "--task", "retrieval"]) == 2
    err = capsys.readouterr().err
    assert re.search(words, err) and err.count("\n") == 1, err
