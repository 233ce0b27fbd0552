"""Metrics against hand-computed cases; `plait eval` on plait, img2dataset and clip_benchmark layouts, on
exported models and checkpoints, in one process and split over two."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import plait
from pipeline.train.distributed import World
from pipeline.eval.datasets import rank_share, read_classnames, read_lines, read_templates, resolve
from pipeline.eval.evaluate import classification_counts, linear_probe, retrieval_metrics, summarise_classification
from tests.helpers.fmnist_fixture import EVAL_TEMPLATES, trained_run, write_shards

REPO = Path(__file__).resolve().parents[1]


def test_classification_counts_hand_case():
    logits = torch.tensor([[0.9, 0.1, 0.0],   # label 0: right
                           [0.2, 0.5, 0.3],   # label 2: 2nd
                           [0.1, 0.2, 0.7],   # label 2: right
                           [0.6, 0.3, 0.1]])  # label 1: 2nd
    labels = torch.tensor([0, 2, 2, 1])
    result = summarise_classification(classification_counts(logits, labels), ["a", "b", "c"])
    assert result["top1"] == 0.5 and result["top5"] == 1.0 and result["num_samples"] == 4
    assert result["per_class"] == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert result["mean_per_class_recall"] == pytest.approx(0.5)


def test_retrieval_metrics_hand_case():
    # 3 images on the axes; image 0 has two captions. Caption 2 (of image 1) points at image 2 instead.
    images = torch.eye(3)
    texts = torch.nn.functional.normalize(torch.tensor([
        [1.0, 0.0, 0.0],    # image 0
        [0.9, 0.1, 0.0],    # image 0
        [0.0, 0.2, 1.0],    # image 1, but closest to image 2
        [0.0, 0.0, 1.0],    # image 2
    ]), dim=1)
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # image->text top-1: image 0 -> caption 0 (sim 1); image 1 -> caption 2 (0.196 > caption 1's 0.110);
    # image 2 -> caption 3 (1 > 0.981): all hits.
    assert r["image_to_text_R@1"] == 1.0
    # text->image: captions 0, 1 -> image 0 (hits); caption 2 -> image 2 (miss, image 1 is 2nd); caption 3 hit.
    assert r["text_to_image_R@1"] == 0.75 and r["text_to_image_R@2"] == 1.0
    assert (r["num_images"], r["num_texts"]) == (3, 4)


def test_linear_probe_separates_separable_classes_and_sweeps_c():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 8) * 5
    y = rng.integers(0, 4, 400)
    x = centers[y] + rng.normal(size=(400, 8))
    result = linear_probe(x[:300], y[:300], x[300:], y[300:], classnames=list("abcd"))
    assert result["top1"] > 0.95 and set(result["probe_sweep"]) == {"0.01", "0.1", "1.0", "10.0"}
    assert result["C"] in (0.01, 0.1, 1.0, 10.0) and result["num_train"] == 300


def test_rank_share_is_disjoint_and_complete():
    urls = [f"{i}.tar" for i in range(7)]
    shares = [rank_share(urls, World(rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(urls) and shares[0] == ["0.tar", "3.tar", "6.tar"]


def test_clip_benchmark_layout_is_read(tmp_path):
    root = tmp_path / "wds_fmnist"
    write_shards(root / "test", "test", 30, 10, fmt="webp", names="{}.tar", captions=False)
    (root / "test" / "classnames.txt").unlink()
    (root / "classnames.txt").write_text("t-shirt/top\ntrouser\npullover\ndress\ncoat\nsandal\nshirt\nsneaker\n"
                                         "bag\nankle boot\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na sketch of a {c}.\n")
    data = resolve(str(root))
    assert [Path(u).name for u in data.urls] == ["0.tar", "1.tar", "2.tar"]
    assert data.templates == ("a photo of a {}.", "a sketch of a {}.") and data.kind == "classification"
    assert len(data.classnames) == 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def eval_json(tmp_path: Path, name: str, argv: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    assert plait.main(["eval", *argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_zero_shot_on_every_model_form_and_layout(run, tmp_path):
    """Checkpoint, open_clip export and HF export give the same zero-shot scores; plait shards and the same
    images in clip_benchmark's layout (webp) give the same too."""
    root = run["root"]
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(EVAL_TEMPLATES) + "\n")
    test_spec = f"{root}/test/{{00000..00001}}.tar"
    common = ["--data", test_spec, "--classnames", str(root / "test" / "classnames.txt"),
              "--templates", str(templates), "--batch-size", "128"]
    from_ckpt = eval_json(tmp_path, "ckpt", [str(run["run_dir"]), *common])["zeroshot"]
    assert from_ckpt["num_samples"] == 600 and from_ckpt["top1"] > 0.13  # chance: 0.10 +- 0.012

    # A hand computation of the same top-1 from the checkpoint's features.
    from pipeline.artifacts.load import load_model
    from pipeline.eval.evaluate import class_embeddings, labelled_images
    loaded = load_model(run["run_dir"])
    classnames = read_lines(root / "test" / "classnames.txt")
    weights = class_embeddings(loaded.model, loaded.tokenize, classnames, EVAL_TEMPLATES, "cpu")
    hits = total = 0
    with torch.no_grad():
        for images, labels in labelled_images(test_spec, loaded.transform, 100):
            hits += ((loaded.model.encode_image(images, normalize=True) @ weights.T).argmax(1) == labels).sum().item()
            total += len(labels)
    assert from_ckpt["top1"] == pytest.approx(hits / total)

    assert plait.main(["export", str(run["run_dir"]), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    assert plait.main(["export", str(run["run_dir"]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    name = json.loads((tmp_path / "oc" / "plait_metadata.json").read_text())["name"]
    weights_file = [str(tmp_path / "oc" / "open_clip_model.pt"), "--model", str(tmp_path / "oc" / f"{name}.json")]
    for form, argv in (("oc", [str(tmp_path / "oc")]), ("hf", [str(tmp_path / "hf")]), ("pt", weights_file)):
        got = eval_json(tmp_path, form, [*argv, *common])["zeroshot"]
        assert got["top1"] == pytest.approx(from_ckpt["top1"], abs=1 / 600), form

    bench = tmp_path / "bench"
    write_shards(bench / "test", "test", 600, 300, fmt="png", names="{}.tar", captions=False)
    (bench / "test" / "classnames.txt").rename(bench / "classnames.txt")
    (bench / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in EVAL_TEMPLATES) + "\n")
    got = eval_json(tmp_path, "bench", [str(tmp_path / "oc"), "--data", str(bench)])["zeroshot"]
    assert got["top1"] == pytest.approx(from_ckpt["top1"], abs=1e-9)


def test_retrieval_and_linear_probe_on_img2dataset_shards(run, tmp_path):
    # img2dataset's layout: NNNNN.tar with jpg + txt + json, NNNNN_stats.json, no sizes.json, no labels.
    folder = tmp_path / "i2d"
    write_shards(folder, "test", 200, 100, fmt="jpg", labels=False)
    (folder / "sizes.json").unlink()
    (folder / "classnames.txt").unlink()
    for i in range(2):
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"successes": 100, "count": 100}))
    r = eval_json(tmp_path, "ret", [str(run["run_dir"]), "--data", str(folder)])["retrieval"]
    assert r["num_images"] == 200 and r["num_texts"] == 200
    assert r["image_to_text_R@1"] <= r["image_to_text_R@5"] <= r["image_to_text_R@10"]

    root = run["root"]
    probe = eval_json(tmp_path, "probe", [
        str(run["run_dir"]), "--data", f"{root}/test/{{00000..00001}}.tar", "--task", "linear_probe",
        "--train-data", f"{root}/train/{{00000..00001}}.tar", "--classnames", str(root / "test" / "classnames.txt")])
    assert probe["linear_probe"]["top1"] > 0.5 and probe["linear_probe"]["num_train"] == 960


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_give_the_single_process_result(run, tmp_path):
    root = run["root"]
    argv = [str(run["run_dir"]), "--data", f"{root}/test/{{00000..00001}}.tar", "--classnames",
            str(root / "test" / "classnames.txt"), "--task", "zeroshot", "--task", "retrieval", "--batch-size", "100"]
    single = eval_json(tmp_path, "one", argv)
    out = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO / "plait.py"), "eval", *argv, "--output", str(out)], check=True, env=env, cwd=REPO,
                   timeout=600)
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    assert two["zeroshot"]["top1"] == pytest.approx(single["zeroshot"]["top1"])
    assert two["zeroshot"]["per_class"] == pytest.approx(single["zeroshot"]["per_class"])
    for key, value in single["retrieval"].items():
        assert two["retrieval"][key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_zero_shot_suites_come_from_the_installed_open_clip(run, tmp_path):
    """`--classnames imagenet --templates simple|openai` read open_clip.zero_shot_metadata; the report names
    the suite and the open_clip version."""
    from open_clip import zero_shot_metadata as meta
    assert read_classnames("imagenet") == tuple(meta.IMAGENET_CLASSNAMES) and len(read_classnames("imagenet")) == 1000
    assert read_templates("openai")[:2] == ("a bad photo of a {}.", "a photo of many {}.")
    assert len(read_templates("openai")) == 80 and len(read_templates("simple")) == len(meta.SIMPLE_IMAGENET_TEMPLATES)
    own = tmp_path / "imagenet"  # a file of a suite's name is read as the file
    own.write_text("a\nb\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert read_classnames("imagenet") == ("a", "b")
    finally:
        os.chdir(cwd)
    root = run["root"]
    test_spec = f"{root}/test/{{00000..00001}}.tar"
    got = eval_json(tmp_path, "suite", [str(run["run_dir"]), "--data", test_spec, "--classnames", "imagenet",
                                        "--templates", "simple", "--batch-size", "128", "--max-samples", "100"])
    assert got["suite"]["classnames"].startswith(f"imagenet (open_clip {open_clip.__version__} zero_shot_metadata.")
    assert got["suite"]["templates"].startswith("simple (open_clip ")
    assert got["zeroshot"]["num_samples"] == 100 and len(got["zeroshot"]["per_class"]) == 1000
