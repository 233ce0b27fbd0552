"""`plait prep filter --decontaminate EVAL`: training samples that are re-encoded or cropped copies of evaluation
images are removed with the set and sample named, a clean set loses nothing, and bad evaluation inputs are
one-line errors. Real photos from the Debian package mate-backgrounds."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_prep import cli as prep_cli
from data_prep.curate.decontaminate import nearest_cosine, nearest_hamming, phash_bits
from data_prep.curate.filter import FilterOptions, filter_dataset
from data_prep.curate.score import ScoreOptions, score
from pipeline.artifacts.export import export_open_clip
from pipeline.models.towers import build_clip

from tests.helpers.fmnist_fixture import TEST_MODEL_CFG
from tests.helpers.prep_corpus import MATE

# Photographs whose pHashes lie >= 18 bits apart (the package's flat gradients and stripes hash alike: left out).
PHOTOS = ["nature/Aqua.jpg", "nature/Blinds.jpg", "nature/Dune.jpg", "nature/FreshFlower.jpg", "nature/Garden.jpg",
          "nature/GreenMeadow.jpg", "nature/LadyBird.jpg", "nature/RainDrops.jpg", "nature/Storm.jpg",
          "nature/TwoWings.jpg", "nature/Wood.jpg", "nature/YellowFlower.jpg", "abstract/Elephants.jpg",
          "desktop/GreenTraditional.jpg"]
NUM_EVAL = 4
COSINE = 0.998
"""The embedding test's threshold for the untrained test model: it puts unrelated photos at cosine up to 0.994
(a weak model's embeddings crowd together: the threshold belongs to the model), the planted copies at >= 0.9996."""


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    if not all((Path(MATE) / p).is_file() for p in PHOTOS):
        pytest.skip("mate-backgrounds photos not installed (Debian package mate-backgrounds)")
    out = []
    for p in PHOTOS:
        img = Image.open(Path(MATE) / p)
        img.draft("RGB", (400, 400))
        img = img.convert("RGB")
        img.thumbnail((320, 320))
        out.append(img)
    return out


def write_eval(folder: Path, images: list[Image.Image]) -> Path:
    """A plain WebDataset folder (no plait manifest) of the evaluation images, keys eval0000..."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "000000.tar", "w") as tar:
        for i, img in enumerate(images):
            for ext, data in (("jpg", jpeg(img)), ("txt", f"evaluation photo {i}".encode())):
                info = tarfile.TarInfo(f"eval{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def write_training(folder: Path, files: dict[str, bytes]) -> Path:
    """A plait dataset of `files` (name -> JPEG bytes) through `plait prep shard` of a folder with captions."""
    src = folder.parent / f"{folder.name}_src"
    src.mkdir(parents=True)
    for name, data in files.items():
        (src / f"{name}.jpg").write_bytes(data)
        (src / f"{name}.txt").write_text(f"a photo called {name}")
    prep_cli.main(["shard", "--input", str(src), "--input-format", "folder", "--output", str(folder),
                   "--samples-per-shard", "8", "--processes", "1", "--no-progress"])
    return folder


@pytest.fixture(scope="module")
def sets(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("decontaminate")
    evals = photos[:NUM_EVAL]
    w, h = evals[1].size
    planted = {
        "copy_reencoded": jpeg(evals[0], quality=25),  # the same photo, heavily re-encoded
        "copy_cropped": jpeg(evals[1].crop((w // 25, h // 25, w - w // 25, h - h // 25))),  # 4% cut off each side
        "copy_small": jpeg(evals[2].resize((w // 3, h // 3)), quality=60),  # downscaled and re-encoded
    }
    clean = {f"clean{i:02d}": jpeg(img) for i, img in enumerate(photos[NUM_EVAL:])}
    torch.manual_seed(0)
    model = export_open_clip(build_clip(TEST_MODEL_CFG).state_dict(), TEST_MODEL_CFG, root / "model")
    out = {"root": root, "eval": write_eval(root / "eval", evals), "model": model}
    for name, files in (("clean", clean), ("contaminated", {**clean, **planted})):
        ds = write_training(root / name, files)
        score(ScoreOptions(str(ds), str(model), out=str(ds / "scores"), batch_size=16, num_workers=0,
                           embeddings=True, progress=False))
        out[name] = ds
    return out


def verdicts(folder: Path) -> dict[str, str | None]:
    """Source file name -> reject reason (None: kept), through the records' source column."""
    rows = pq.read_table(folder / "samples.parquet").to_pylist()
    return {Path(r["url"]).stem: r["reason"] for r in rows}


def test_planted_copies_of_evaluation_images_are_removed_and_named(sets, tmp_path):
    out = tmp_path / "kept"
    result = filter_dataset(FilterOptions(str(sets["contaminated"]), str(out), decontaminate=(str(sets["eval"]),),
                                          decontaminate_cosine=COSINE, progress=False), log=lambda s: None)
    got = verdicts(out)
    expected = {"copy_reencoded": "eval0000", "copy_cropped": "eval0001", "copy_small": "eval0002"}
    for name, eval_key in expected.items():
        assert got[name] is not None and got[name].startswith(
            f"contaminated: near-duplicate of {sets['eval']}/{eval_key} ("), (name, got[name])
    assert all(reason is None for name, reason in got.items() if name.startswith("clean")), got
    assert result["num_ok"] == len(PHOTOS) - NUM_EVAL
    info = json.loads((out / "_plan.json").read_text())["filter"]
    record = info["decontamination"]
    assert info["decontaminate"] == [str(sets["eval"])]
    assert record["cosine"] == COSINE and record["hamming"] == 8
    assert record["model"]["path"] == str(Path(sets["model"]).resolve())
    (entry,) = record["sets"]
    assert entry["url"] == str(sets["eval"]) and len(entry["fingerprint"]) == 64
    assert entry["num_images"] == NUM_EVAL and entry["near_duplicates"] == entry["rejected"] == 3


def test_phash_alone_catches_the_crop_and_the_reencode(sets, tmp_path):
    """pHash without embeddings (no score folder needed): the copies are still found, by Hamming distance."""
    out = tmp_path / "kept"
    filter_dataset(FilterOptions(str(sets["contaminated"]), str(out), decontaminate=(str(sets["eval"]),),
                                 decontaminate_cosine=0.0, progress=False), log=lambda s: None)
    got = verdicts(out)
    for name in ("copy_reencoded", "copy_cropped", "copy_small"):
        assert got[name] is not None and "(phash distance " in got[name], got[name]
        assert int(got[name].rsplit(" ", 1)[1].rstrip(")")) <= 8
    assert sum(r is None for r in got.values()) == len(PHOTOS) - NUM_EVAL


def test_a_clean_set_loses_nothing(sets, tmp_path):
    out = tmp_path / "kept"
    result = filter_dataset(FilterOptions(str(sets["clean"]), str(out), decontaminate=(str(sets["eval"]),),
                                          decontaminate_cosine=COSINE, progress=False), log=lambda s: None)
    assert result["num_ok"] == result["num_input_rows"] == len(PHOTOS) - NUM_EVAL
    assert all(r is None for r in verdicts(out).values())
    (entry,) = json.loads((out / "_plan.json").read_text())["filter"]["decontamination"]["sets"]
    assert entry["near_duplicates"] == 0


def test_nearest_searches_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2**63, 300, dtype=np.uint64)
    evals = rng.integers(0, 2**63, 70, dtype=np.uint64)
    idx, dist = nearest_hamming(train, evals)
    ref = np.array([[bin(int(a) ^ int(b)).count("1") for b in evals] for a in train])
    np.testing.assert_array_equal(dist, ref.min(1))
    np.testing.assert_array_equal(ref[np.arange(300), idx], ref.min(1))
    a = rng.standard_normal((300, 16)).astype(np.float32)
    b = rng.standard_normal((70, 16)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    idx, cos = nearest_cosine(a.astype(np.float16), b)
    sims = a.astype(np.float16).astype(np.float32) @ b.T
    np.testing.assert_array_equal(idx, sims.argmax(1))
    np.testing.assert_allclose(cos, sims.max(1), rtol=1e-5, atol=1e-6)


def test_phash_is_imagehashs(photos):
    import imagehash
    h = imagehash.phash(photos[0])
    assert bin(phash_bits(photos[0]) ^ phash_bits(photos[0])).count("1") == 0
    assert phash_bits(photos[0]) == int(str(h), 16)  # imagehash's hex string is the same bits, row-major


def test_bad_evaluation_inputs_are_one_line_errors(sets, tmp_path):
    not_dataset = tmp_path / "notes"
    not_dataset.mkdir()
    (not_dataset / "readme.txt").write_text("not shards")
    no_images = tmp_path / "captions_only"
    no_images.mkdir()
    with tarfile.open(no_images / "000000.tar", "w") as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    cases = [(not_dataset, "not an evaluation dataset"), (tmp_path / "missing", "no such folder"),
             (no_images, "no images in its 1 sample")]
    for i, (folder, words) in enumerate(cases):
        with pytest.raises(ValueError) as e:
            filter_dataset(FilterOptions(str(sets["clean"]), str(tmp_path / f"out{i}"), decontaminate=(str(folder),),
                                         progress=False), log=lambda s: None)
        assert str(folder) in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    for kw, words in (({"decontaminate_cosine": 1.5}, "--decontaminate-cosine 1.5"),
                      ({"decontaminate_hamming": 65}, "--decontaminate-hamming 65"),
                      ({"decontaminate_cosine": 0.0, "decontaminate_hamming": -1}, "tests nothing")):
        with pytest.raises(ValueError, match=words):
            FilterOptions(str(sets["clean"]), str(tmp_path / "x"), decontaminate=(str(sets["eval"]),), **kw)


def test_embeddings_of_the_wrong_dimension_are_named(sets, tmp_path):
    """A score plan whose embedding_dim is not the scoring model's: refused, naming both sizes."""
    ds = tmp_path / "ds"
    import shutil
    shutil.copytree(sets["clean"], ds)
    plan_path = ds / "scores" / "_score_plan.json"
    plan = json.loads(plan_path.read_text())
    plan["dataset"] = str(ds)
    plan["embedding_dim"] = 32
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ValueError) as e:
        filter_dataset(FilterOptions(str(ds), str(tmp_path / "out"), decontaminate=(str(sets["eval"]),),
                                     progress=False), log=lambda s: None)
    assert "dimension" in str(e.value) and "\n" not in str(e.value), str(e.value)
