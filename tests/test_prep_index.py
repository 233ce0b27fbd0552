"""Foreign WebDataset folders (webdataset.ShardWriter, img2dataset layout, hand-made tars) as first-class input:
`plait prep index` writes sizes.json, the offset index and stats beside them; `plait train` without them estimates
(resampled) or names the exact command (exact); bad sizes.json counts are refused naming the file and key."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pytest
import webdataset as wds

import plait
from data_prep.cli import main as prep
from data_prep.shards import tarseek
from pipeline.data.shardspec import parse_spec

from tests.helpers.fmnist_fixture import encode, read_fmnist

from data_prep.input.sources import fashion_mnist_caption


def shardwriter_folder(folder: Path, n: int = 96, per_shard: int = 32) -> str:
    """Real Fashion-MNIST photos written by webdataset's own ShardWriter: no sizes.json, no stats, no index."""
    folder.mkdir(parents=True)
    images, labels = read_fmnist("train", n)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"sample{i:06d}", "jpg": encode(images[i], "jpg"),
                        "txt": fashion_mnist_caption(i, int(labels[i])), "cls": int(labels[i])})
    return f"shard-{{000000..{n // per_shard - 1:06d}}}.tar"


def train_argv(run_dir: Path, shards: str, *overrides: str) -> list[str]:
    return ["train", "--config", "tiny", "--set", f"data.train_shards={shards}",
            "--set", f"train.run_dir={run_dir}", "--set", "data.batch_size=16", "--set", "data.num_workers=0",
            "--set", "train.steps=2", "--set", "train.checkpoint_every=0", "--set", "train.log_every=1",
            *[a for o in overrides for a in ("--set", o)]]


def test_shardwriter_folder_trains_before_and_after_index(tmp_path, monkeypatch, capsys, caplog):
    pattern = shardwriter_folder(tmp_path / "foreign")
    monkeypatch.chdir(tmp_path / "foreign")  # a relative pattern: the messages must name real paths

    # exact mode without counts: a one-line error with the command that fixes it, and the right path
    assert plait.main(train_argv(tmp_path / "run-exact", pattern)) == 2
    err = capsys.readouterr().err
    assert f"plait prep index '{pattern}'" in err and "./sizes.json" in err and " /sizes.json" not in err
    assert len(err.strip().splitlines()) == 1

    # resampled mode works without counts: estimated, and said so
    with caplog.at_level("WARNING", logger="plait.data"):
        assert plait.main(train_argv(tmp_path / "run-resampled", pattern, "data.mode=resampled")) == 0
    assert "estimated from their file sizes" in caplog.text and "plait prep index" in caplog.text
    estimated = parse_spec(pattern, estimate=True).sizes
    assert estimated[0] == 32 and all(0.85 * 32 <= n <= 32 for n in estimated)  # never above the truth

    # index: exact counts, the loader's offsets, stats; the tars untouched
    tars = {p.name: p.read_bytes() for p in Path(".").glob("*.tar")}
    assert prep(["index", ".", "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in Path(".").glob("*.tar")} == tars
    sizes = json.loads(Path("sizes.json").read_text())
    assert sizes == {f"shard-{i:06d}.tar": 32 for i in range(3)}
    for name in sizes:
        offsets = tarseek.sample_offsets(name)
        assert offsets is not None and len(offsets) == 32
        with open(name, "rb") as f:
            for i in (0, 1, 17, 31):
                f.seek(0)
                tarseek.seek_by_headers(f, i)
                assert f.tell() == offsets[i]
        stats = json.loads(Path(name.replace(".tar", "_stats.json")).read_text())
        assert stats["num_samples"] == 32 and stats["extensions"] == {"cls": 32, "jpg": 32, "txt": 32}
    assert plait.main(train_argv(tmp_path / "run-exact", pattern)) == 0
    assert not list(Path(".").glob("*.tmp"))


def _tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_index_keeps_img2dataset_stats_and_handles_long_names_and_bad_tars(tmp_path):
    images, _ = read_fmnist("train", 6)
    folder = tmp_path / "i2d"
    folder.mkdir()
    long = "d" * 120  # > 100 characters: a pax header before the member, part of the sample's offset
    _tar(folder / "00000.tar", [(f"{long}{i}.{ext}", data) for i in range(3)
                                for ext, data in (("jpg", encode(images[i], "jpg")), ("txt", b"a caption"))])
    _tar(folder / "00001.tar", [(f"k{i}.{ext}", data) for i in range(3)
                                for ext, data in (("png", encode(images[i], "png")), ("json", b"{}"))])
    (folder / "00001_stats.json").write_text(json.dumps({"successes": 3, "count": 3}))
    good = (folder / "00000.tar").read_bytes()
    (folder / "00002.tar").write_bytes(good[:1200])  # truncated inside the first sample's payload
    (folder / "sizes.json").write_text(json.dumps({"00002.tar": 3, "other.tar": 7}))

    assert prep(["index", str(folder), "--no-progress", "--threads", "2"]) == 1  # a bad tar: non-zero
    sizes = json.loads((folder / "sizes.json").read_text())
    assert sizes == {"00000.tar": 3, "00001.tar": 3, "other.tar": 7}  # the bad one left out, others kept
    assert json.loads((folder / "00001_stats.json").read_text()) == {"successes": 3, "count": 3}
    assert json.loads((folder / "00001.idx.json").read_text())["keys"] == ["k0", "k1", "k2"]
    stats = json.loads((folder / "00000_stats.json").read_text())
    assert stats["samples_without_image"] == 0 and stats["samples_without_text"] == 0
    offsets = tarseek.sample_offsets(str(folder / "00000.tar"))
    with open(folder / "00000.tar", "rb") as f:
        for i in range(3):
            f.seek(0)
            tarseek.seek_by_headers(f, i)
            assert f.tell() == offsets[i]
    assert json.loads((folder / "00001_stats.json").read_text()).get("format") is None


def test_index_on_an_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    images, _ = read_fmnist("train", 4)
    for shard in range(2):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for i in range(2):
                sink.write({"__key__": f"s{shard}{i}", "jpg": encode(images[2 * shard + i], "jpg"), "txt": "x"})
        fs.pipe(f"/remote/{shard:05d}.tar", buf.getvalue())
    try:
        assert prep(["index", "memory://remote/{00000..00001}.tar", "--no-progress"]) == 0
        assert json.loads(fs.cat("/remote/sizes.json")) == {"00000.tar": 2, "00001.tar": 2}
        assert fs.exists("/remote/00001.idx.json")
        assert parse_spec("memory://remote/{00000..00001}.tar").sizes == (2, 2)
    finally:
        fs.rm("/remote", recursive=True)


@pytest.mark.parametrize("bad", [-3, 2.5, "12", True, None])
def test_bad_counts_in_sizes_json_are_refused_naming_file_and_key(tmp_path, bad):
    _tar(tmp_path / "00000.tar", [("a.txt", b"x")])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": bad}))
    with pytest.raises(ValueError, match=r"sizes\.json: count of '00000\.tar' must be a non-negative integer"):
        parse_spec(str(tmp_path / "00000.tar"))
    (tmp_path / "sizes.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="sizes.json: expected an object"):
        parse_spec(str(tmp_path / "00000.tar"))


def test_merge_of_a_foreign_folder_indexes_it_and_a_bad_sizes_json_is_rewritten(tmp_path):
    folder = tmp_path / "wds"
    shardwriter_folder(folder, n=8, per_shard=4)
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": -1}))
    with pytest.raises(ValueError, match="count of 'shard-000000.tar' must be a non-negative integer"):
        parse_spec(str(folder / "shard-000000.tar"))
    assert prep(["merge", str(folder)]) == 0  # before: "not a plait dataset folder (no _plan.json)"
    assert json.loads((folder / "sizes.json").read_text()) == {"shard-000000.tar": 4, "shard-000001.tar": 4}


def test_a_tar_cut_between_two_members_is_not_indexed(tmp_path):
    folder = tmp_path / "cut"
    shardwriter_folder(folder, n=8, per_shard=8)
    tar = folder / "shard-000000.tar"
    with tarfile.open(tar) as t:
        members = t.getmembers()
    cut = members[-3].offset  # the header of a later member: a writer killed between two members
    tar.write_bytes(tar.read_bytes()[:cut])
    assert prep(["index", str(folder), "--no-progress"]) == 1
    assert json.loads((folder / "sizes.json").read_text()) == {}
