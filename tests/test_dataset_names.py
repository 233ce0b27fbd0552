"""Names a dataset's own files give (manifest.json's shards, sizes.json's keys) are joined to the dataset's
folder: a name that is a path would make score, filter, verify or the loader read or write outside it. Each is
refused with the file and the name."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from data_prep.cli import main
from data_prep.curate.score_set import open_dataset
from data_prep.shards.layout import check_shard_name
from pipeline.data.shardspec import parse_spec
from tests.helpers.prep_corpus import real_photos

BAD_NAMES = ["../victim.tar", "../../somewhere/victim.tar", "/etc/victim.tar", "sub/x.tar", "..\\x.tar",
             "C:x.tar", ".hidden.tar", "x.tar\0.jpg", 7, None]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_only_plain_tar_names_pass(name):
    with pytest.raises(ValueError, match="is not a plain .tar file name in its folder"):
        check_shard_name(name, "manifest.json")
    assert check_shard_name("00003.tar", "m") == "00003.tar"


@pytest.fixture()
def dataset(tmp_path):
    for i, p in enumerate(real_photos(limit=3)):
        shutil.copy(p, tmp_path / f"{i}.jpg")
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption"]] + [[f"{i}.jpg", f"photo {i}"] for i in range(3)])
    out = tmp_path / "ds"
    main(["shard", "--input", str(table), "--output", str(out), "--processes", "1", "--no-progress",
          "--image-size", "32"])
    return out


def test_a_manifest_naming_a_path_is_refused_by_score_filter_and_verify(dataset, tmp_path, capsys):
    victim = tmp_path / "victim.tar"
    shutil.copy(dataset / "00000.tar", victim)  # a readable tar outside the dataset, where the name points
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../victim.tar"
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: shard name '../victim.tar' is not a plain .tar file"):
        open_dataset(str(dataset))  # score's and filter's view of a dataset
    capsys.readouterr()
    assert main(["verify", str(dataset)]) == 1
    assert "shard name '../victim.tar' is not a plain .tar file name" in capsys.readouterr().out
    assert not (tmp_path / "victim.parquet").exists() and not (tmp_path / "victim_stats.json").exists()


def test_a_sizes_file_naming_a_path_is_refused_by_the_loader(dataset):
    (dataset / "sizes.json").write_text(json.dumps({"00000.tar": 3, "../../x.tar": 5}))
    with pytest.raises(ValueError, match=r"sizes.json: shard name '../../x.tar' is not a plain .tar file name"):
        parse_spec(str(dataset / "00000.tar"))
