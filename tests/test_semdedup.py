"""The clustered near-duplicate search (data_prep/curate/clusters.py): pairs across a cluster boundary are found,
its verdicts equal the exact greedy's, a killed unit task reruns to the same verdicts, and bad embeddings are
refused in one line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.curate import clusters
from data_prep.curate.clusters import ClusterOptions
from data_prep.curate.dedup import near_duplicates, near_duplicates_of

REPO = Path(__file__).resolve().parents[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def blobs_with_copies(n: int = 1500, dim: int = 32, modes: int = 12, copies: int = 300, seed: int = 0):
    """Rows of `modes` Gaussian blobs plus `copies` near-copies of random rows (cosine ~0.99 to their original),
    shuffled: the priority order is the row order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(modes, dim))
    x = centres[rng.integers(0, modes, n)] + rng.normal(scale=0.6, size=(n, dim))
    x = _unit(x)
    dup = x[rng.integers(0, n, copies)] + rng.normal(scale=0.02, size=(copies, dim))
    x = _unit(np.concatenate([x, dup]))
    return x[rng.permutation(len(x))].astype(np.float16)


def _exact(x: np.ndarray, threshold: float) -> np.ndarray:
    xf = x.astype(np.float32)  # the stored rows as they are, as the filter hands them over
    dropped, dup_of, _ = near_duplicates(lambda idx: xf[idx], np.arange(len(x)), threshold)
    return np.where(dropped, dup_of, -1)


def _clustered(work: Path, x: np.ndarray, processes: int = 1, **kw) -> np.ndarray:
    clusters.write_embeddings(work, lambda a, b: x[a:b], len(x), x.shape[1])
    dup_of, cos = clusters.near_duplicates_clustered(work, ClusterOptions(**kw), processes=processes)
    assert ((cos >= kw["threshold"]) == (dup_of >= 0)).all()
    return dup_of


def test_a_pair_straddling_two_clusters_is_found_with_probe_2_only(tmp_path):
    rng = np.random.default_rng(1)
    dim = 16
    a, b = np.eye(dim)[0], np.eye(dim)[1]  # two centroids 90 degrees apart
    blob = lambda c: _unit(c + rng.normal(scale=0.08, size=(200, dim)))
    mid, across = _unit(a + b), (a - b) / np.sqrt(2)
    pair = _unit(np.stack([mid + 0.04 * across, mid - 0.04 * across]))  # one on each side of the boundary
    assert float(pair[0] @ pair[1]) > 0.99
    x = np.concatenate([pair, blob(a), blob(b)]).astype(np.float16)  # rows 0 and 1: the pair, best first
    verdicts = {}
    for probe in (1, 2):
        work = tmp_path / f"probe{probe}"
        verdicts[probe] = _clustered(work, x, threshold=0.98, num_clusters=2, probe=probe)
        home = clusters.assignment(work)[:, 0]
        assert home[0] != home[1], "the pair must sit in two clusters for this test to mean anything"
    assert verdicts[1][1] == -1  # within home clusters only, the pair is never compared
    assert verdicts[2][1] == 0  # the better-ranked row 0 is kept, row 1 named its duplicate
    assert (verdicts[2] == _exact(x, 0.98)).all()


def test_clustered_verdicts_equal_the_exact_greedy_and_do_not_depend_on_processes(tmp_path):
    x = blobs_with_copies()
    ref = _exact(x, 0.95)
    assert 250 <= (ref >= 0).sum() <= 320  # the copies, and next to nothing else
    one = _clustered(tmp_path / "one", x, threshold=0.95, num_clusters=20)
    assert (one == ref).all()
    two = _clustered(tmp_path / "two", x, processes=2, threshold=0.95, num_clusters=20)
    assert (two == one).all()


def test_the_array_split_covers_every_unit_once():
    for num_units in (1, 7, 100, 2237):
        for num_tasks in (1, 3, 64, 5000):
            got = [u for t in range(num_tasks) for u in clusters.task_units(num_units, t, num_tasks)]
            assert got == list(range(num_units))
            sizes = [len(clusters.task_units(num_units, t, num_tasks)) for t in range(num_tasks)]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="--task-index 3: must be in 0..2"):
        clusters.task_units(10, 3, 3)


def test_a_killed_unit_task_reruns_to_the_same_verdicts(tmp_path):
    x = blobs_with_copies(n=12000, dim=64, modes=40, copies=2000, seed=2)
    opts = ClusterOptions(threshold=0.95, num_clusters=300)
    ref_work, work = tmp_path / "ref", tmp_path / "killed"
    for w in (ref_work, work):
        clusters.write_embeddings(w, lambda a, b: x[a:b], len(x), x.shape[1])
        clusters.prepare(w, opts)
    clusters.run_assign(work)
    ref = clusters.near_duplicates_clustered(ref_work, opts)
    task = subprocess.Popen([sys.executable, "-m", "data_prep.curate.clusters", "units", str(work),
                             "--task-index", "0", "--num-tasks", "1", "--no-progress"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any((work / "units").glob("*.done")) and task.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(task.pid, signal.SIGKILL)
    task.wait()
    done = len(list((work / "units").glob("*.done")))
    assert task.returncode == -signal.SIGKILL and 0 < done < 300, (done, task.stderr.read()[-2000:])
    with pytest.raises(ValueError, match=r"dedup units not done \(first: \d+\)"):
        clusters.resolve(work)
    assert clusters.main(["units", str(work), "--no-progress"]) == 0  # the rerun skips the units done
    got = clusters.resolve(work)
    assert (got[0] == ref[0]).all() and (got[1] == ref[1]).all()
    for f in (ref_work / "units").glob("*.pairs.npz"):
        assert f.read_bytes() == (work / "units" / f.name).read_bytes(), f.name


@pytest.mark.parametrize("damage", ["nan", "inf", "zero"])
def test_non_finite_or_zero_embeddings_are_refused_in_one_line(tmp_path, damage):
    x = blobs_with_copies(n=300, copies=20).astype(np.float32)
    x[17, 3] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[damage]
    if damage == "zero":
        x[17] = 0.0
    clusters.write_embeddings(tmp_path, lambda a, b: x[a:b], len(x), x.shape[1])
    with pytest.raises(ValueError, match=r"embeddings.npy: row 17 is a (zero|non-finite) .*cannot be compared") as e:
        clusters.prepare(tmp_path, ClusterOptions())
    assert "\n" not in str(e.value)


def test_embeddings_of_the_wrong_dimension_or_shape_are_refused_in_one_line(tmp_path):
    x = blobs_with_copies(n=300, dim=48, copies=20)
    clusters.write_embeddings(tmp_path / "a", lambda a, b: x[a:b], len(x), 48)
    with pytest.raises(ValueError, match=r"embeddings of dimension 48, expected 512") as e:
        clusters.prepare(tmp_path / "a", ClusterOptions(), dim=512)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"embeddings of dimension 48, expected 64"):
        clusters.write_embeddings(tmp_path / "b", lambda a, b: x[a:b], len(x), 64)
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / clusters.EMBEDDINGS, np.zeros(10, np.float16))
    with pytest.raises(ValueError, match=r"must be a non-empty \[N, D\] float16/float32 array, not float16\[10\]"):
        clusters.prepare(tmp_path / "c", ClusterOptions())
    (tmp_path / "c" / clusters.EMBEDDINGS).write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a numpy array file"):
        clusters.prepare(tmp_path / "c", ClusterOptions())
    # a prepared folder does not take other settings or other candidates
    clusters.prepare(tmp_path / "a", ClusterOptions(threshold=0.9))
    with pytest.raises(ValueError, match=r"prepared with other settings \(threshold\)"):
        clusters.prepare(tmp_path / "a", ClusterOptions(threshold=0.8))
    xf = x.astype(np.float32)
    order = np.arange(len(x))
    near_duplicates_of(lambda i: xf[i], order, 48, 0.9, "clustered", tmp_path / "d")
    with pytest.raises(ValueError, match="holds the search of other candidates"):
        near_duplicates_of(lambda i: xf[i], order[::-1].copy(), 48, 0.9, "clustered", tmp_path / "d")
    with pytest.raises(ValueError, match=r"--threshold 1.5: must be"):
        ClusterOptions(threshold=1.5)


def test_the_unit_task_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        clusters.main(["units", str(tmp_path), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a prepared dedup work folder" in err


def test_auto_picks_exact_below_the_size_and_both_methods_agree(tmp_path):
    x = blobs_with_copies(n=800, copies=100).astype(np.float32)  # float16 values: what the work folder stores
    order = np.arange(len(x))[::-1].copy()  # another priority order than the row order
    method, exact_dup, exact_cos = near_duplicates_of(lambda i: x[i], order, x.shape[1], 0.95)
    assert method == "exact"
    method, dup, cos = near_duplicates_of(lambda i: x[i], order, x.shape[1], 0.95, "clustered", tmp_path,
                                          ClusterOptions(num_clusters=8))
    assert method == "clustered" and (dup == exact_dup).all()
    np.testing.assert_allclose(cos, exact_cos, rtol=1e-5, atol=1e-5 * float(np.abs(exact_cos).max()))


def test_plait_launch_dedup_renders_four_jobs_and_its_array_scripts_run_the_parts_and_units(tmp_path, capsys):
    from launch import cli
    assert cli.main(["dedup", "--tasks", "2", "--run-dir", str(tmp_path / "run"), "--dry-run", "--",
                     "/data/ds", "--output", "/data/kept", "--dedup-embeddings", "0.95", "--top-fraction", "0.5"]) == 0
    text = capsys.readouterr().out
    prepare, assign, array, final = text.split("# ---- ")[1:]
    filter_line = ("-m data_prep.cli filter /data/ds --output /data/kept --dedup-embeddings 0.95 --top-fraction 0.5 "
                   "--dedup-method clustered --dedup-units array --dedup-work /data/kept/_dedup")
    assert prepare.startswith("dedup_prepare.sbatch") and filter_line in prepare
    assert final.startswith("dedup_filter.sbatch") and filter_line in final  # the same command resolves
    assert "#SBATCH --array=0-1" in array and "clusters units /data/kept/_dedup" in array
    assert "#SBATCH --array=0-1" in assign and "clusters assign /data/kept/_dedup" in assign
    with pytest.raises(SystemExit):  # --dedup-units local contradicts the array
        cli.main(["dedup", "--tasks", "2", "--run-dir", str(tmp_path / "run"), "--dry-run", "--", "/data/ds",
                  "--output", "/k", "--dedup-embeddings", "0.9", "--dedup-units", "local"])
    assert "the array runs the units" in capsys.readouterr().err
    # the rendered array script, run as SLURM runs task 0 and task 1 of it, does every unit of a prepared folder
    from launch import render
    from launch.spec import PrepJob, Resources
    x = blobs_with_copies(n=600, copies=60)
    work = tmp_path / "work"
    clusters.write_embeddings(work, lambda a, b: x[a:b], len(x), x.shape[1])
    clusters.prepare(work, ClusterOptions(threshold=0.95, num_clusters=9, part_rows=250))  # parts 0, 1, 2
    job = PrepJob(run_dir=tmp_path / "run", output_dir=str(tmp_path), prep_args=(), num_tasks=2, throttle=None,
                  resources=Resources(), job_name="t", python=sys.executable, container=None)
    for stage, done_of, count in (("assign", clusters.part_done, 3), ("units", clusters.unit_done, 9)):
        script = tmp_path / f"{stage}.sbatch"
        script.write_text(render.render_dedup_array(job, str(work), stage))
        for task in (0, 1):
            done = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task)})
            assert done.returncode == 0, done.stderr[-2000:]
            first_share = len(clusters.task_units(count, 0, 2))
            assert [done_of(work, u) for u in range(count)] == [u < (first_share if task == 0 else count)
                                                                for u in range(count)]
    assert (clusters.resolve(work)[0] == _exact(x, 0.95)).all()


@pytest.mark.slow
def test_filter_clustered_and_array_flow_give_the_exact_search_s_verdicts(tmp_path):
    """plait prep filter on real Fashion-MNIST shards scored with embeddings: --dedup-method clustered equals
    exact, and --dedup-units array (prepare, the unit task CLI, the same command again) gives the same dataset."""
    import itertools
    import torch
    import pyarrow.parquet as pq
    from data_prep.curate.filter import DECISIONS, FilterOptions, filter_dataset
    from data_prep.curate.score import ScoreOptions, score
    from data_prep.input.sources import read_rows
    from data_prep.job.run import run_task
    from data_prep.maintenance import merge as merge_mod
    from data_prep.options import JobOptions, SourceOptions
    from pipeline.artifacts.export import export_open_clip
    from pipeline.models.towers import build_clip
    from tests.helpers.fmnist_fixture import FMNIST, TEST_MODEL_CFG

    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
    source = SourceOptions(str(FMNIST), "fashion-mnist", split="test")
    dataset = tmp_path / "ds"
    rows = list(itertools.islice(read_rows(source), 400))
    run_task(JobOptions(output=str(dataset), source=source, samples_per_shard=200), rows=iter(rows),
             progress=False, log=lambda s: None)
    merge_mod.merge(str(dataset))
    torch.manual_seed(0)
    export_open_clip(build_clip(TEST_MODEL_CFG).state_dict(), TEST_MODEL_CFG, tmp_path / "model")
    score(ScoreOptions(str(dataset), str(tmp_path / "model"), out=str(tmp_path / "scores"), num_workers=0,
                       embeddings=True, progress=False))
    decisions = {}
    # 4 clusters, each sample compared in all 4: every pair is compared, so the verdicts must be the exact ones
    clustered = {"dedup_method": "clustered", "dedup_clusters": 4, "dedup_probe": 4}
    for name, extra in (("exact", {"dedup_method": "exact"}), ("clustered", clustered),
                        ("array", {**clustered, "dedup_units": "array"})):
        opts = FilterOptions(str(dataset), str(tmp_path / name), scores=str(tmp_path / "scores"),
                             dedup_embeddings=0.98, progress=False, **extra)
        summary = filter_dataset(opts)
        if name == "array":
            assert "run them as a job array" in summary["dedup_pending"]
            assert not (tmp_path / name / DECISIONS).exists()
            for stage in ("assign", "units"):  # what the two arrays run
                assert clusters.main([stage, str(tmp_path / name / "_dedup"), "--no-progress"]) == 0
            summary = filter_dataset(opts)
        assert summary["filter"]["dedup_method_used"] == extra["dedup_method"]
        decisions[name] = pq.read_table(tmp_path / name / DECISIONS).column("reason").to_pylist()
    dropped = [r for r in decisions["exact"] if r]
    assert 20 < len(dropped) < 400 and all(r.startswith("near-duplicate (of ") for r in dropped)
    assert decisions["clustered"] == decisions["array"]  # the same search, run here or by the "array"
    # the same samples named; the cosines (4 decimals) computed by another matmul may round apart in the last one
    parse = lambda r: (r.split(",")[0], float(r.rsplit(" ", 1)[1].rstrip(")"))) if r else (None, 0.0)
    for got, want in zip(decisions["clustered"], decisions["exact"]):
        assert parse(got)[0] == parse(want)[0] and abs(parse(got)[1] - parse(want)[1]) <= 1e-4 + 1e-6
