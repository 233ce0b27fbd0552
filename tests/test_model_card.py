"""The model card reproduces the training view: its loading code runs as written from the export folder (paths
relative to it) and rebuilds the exported model; it names the background transparent images were composited onto
and the preprocessing; a fine-tuned head's formula gives the classifier's own logits. The demo's export,
`plait export` and `plait finetune` state the same history: steps, samples seen, objectives, dataset hashes and
every evaluation the run recorded, with its step; a run without evaluations says so."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import plait
from data_prep.cli import main as prep
from data_prep.input.sources import FASHION_MNIST_CLASSES
from pipeline.artifacts.export import embeddings, export_open_clip, export_safetensors, fixed_batch
from pipeline.eval.finetune import Classifier, ClassifierHead
from pipeline.artifacts.model_card import METADATA_FILE, dataset_prep, recorded_evals
from pipeline.models.towers import build_clip
from tests.helpers.prep_corpus import real_photos

from tests.helpers.fmnist_fixture import TEST_MODEL_CFG


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory) -> dict:
    """Training metadata as `plait export` reads it, for shards `plait prep` made with a blue background."""
    root = tmp_path_factory.mktemp("card")
    table = root / "in.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption"], *[[f"file://{p}", "a photo"] for p in real_photos(limit=2)]])
    prep(["shard", "--input", str(table), "--output", str(root / "shards"), "--image-size", "32",
          "--background", "0,128,255", "--processes", "1", "--no-progress"])
    return {"step": 10, "samples_seen": 640, "data_prep": dataset_prep(str(root / "shards" / "00000.tar"))}


def _model() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_clip(TEST_MODEL_CFG).eval()
    return model, TEST_MODEL_CFG


def _code(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, re.S)


def test_safetensors_card_builds_the_model_from_relative_paths(tmp_path, monkeypatch, trained_on):
    model, cfg = _model()
    out = export_safetensors(model.state_dict(), cfg, tmp_path / "exported", meta={"training": trained_on})
    readme = (out / "README.md").read_text()
    meta_text = (out / "plait_metadata.json").read_text()
    assert str(tmp_path) not in readme and str(tmp_path) not in json.dumps(json.loads(meta_text)["usage"])
    assert "transparent pixels composited onto RGB (0, 128, 255)" in readme
    assert "Image.new('RGBA', im.size, (0, 128, 255, 255))" in readme
    assert "RandomResizedCrop(28, scale=(0.9, 1.0)" in readme and "CenterCrop(28)" in readme
    assert "resize keep_ratio to 32 px" in readme

    monkeypatch.chdir(out)  # the card's code as a user runs it, from the export folder
    ns: dict = {}
    exec(_code(readme)[0], ns)
    images, tokens = fixed_batch(cfg)
    want, got = embeddings(model, images, tokens), embeddings(ns["model"], images, tokens)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert ns["preprocess"](Image.new("RGB", (40, 30))).shape == (3, 28, 28)


def test_finetuned_card_gives_the_classifier_formula(tmp_path, monkeypatch, trained_on):
    model, cfg = _model()
    finetune = {"mode": "linear", "classifier": "classifier.safetensors", "classnames": "classnames.txt"}
    out = export_open_clip(model.state_dict(), cfg, tmp_path / "ft", meta={"training": trained_on,
                                                                           "finetune": finetune})
    torch.manual_seed(1)
    head = ClassifierHead(cfg["embed_dim"], 3, scale=42.0)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out / "classifier.safetensors")
    (out / "classnames.txt").write_text("shirt\nshoe\nbag\n")
    Image.open(real_photos(limit=1)[0]).convert("RGB").save(out / "photo.jpg")
    readme = (out / "README.md").read_text()
    assert "logits = scale * (normalize(encode_image(preprocess(image))) @ weight.T + bias)" in readme
    assert str(tmp_path) not in readme

    monkeypatch.chdir(out)
    ns: dict = {}
    loading, classify = _code(readme)[:2]
    exec(loading, ns)
    exec(classify, ns)
    with torch.no_grad():
        want = Classifier(model, head)(ns["images"])
    torch.testing.assert_close(ns["logits"].detach(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# --- The card tells the run's history: every export path writes the same one, from the run dir's files. ---

DEMO_STEPS, DEMO_BATCH, DEMO_EVAL_EVERY = 6, 32, 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A real `plait demo` at a tiny budget: it evaluates zero-shot at step 3 and at the end (step 6), keeps
    both checkpoints and exports the last one with its card."""
    from pipeline.demo import FASHION_MNIST_DIR, main as demo
    from tests.helpers.fmnist_subset import write_subset

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("demo_card")
    write_subset(root / "fm", num_train=256, num_test=100)
    run_dir = root / "run"
    assert demo(["--run-dir", str(run_dir), "--fashion-mnist", str(root / "fm"), "--samples-per-shard", "128",
                 "--set", f"train.steps={DEMO_STEPS}", "--set", f"data.batch_size={DEMO_BATCH}",
                 "--set", "optim.warmup_steps=2", "--set", "train.log_every=3", "--set", "data.num_workers=0",
                 "--set", f"train.eval_every={DEMO_EVAL_EVERY}", "--set", f"train.checkpoint_every={DEMO_EVAL_EVERY}",
                 "--set", "train.keep_last=2"]) == 0
    return run_dir


def _logged_evals(run_dir: Path) -> dict[tuple[str, int], float]:
    """What training logged, read straight from metrics.jsonl: {(name, step): value} of `kind: eval` records."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "eval":
            out.update({(k, record["step"]): v for k, v in record.items() if k.startswith("eval/")})
    return out


def _section(readme: str, title: str) -> str:
    return readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(section: str) -> dict[str, str]:
    return {m[0].strip(): m[1].strip() for m in re.findall(r"^\| ([^|]+) \| (.*) \|$", section, re.M)}


def _eval_rows(readme: str) -> dict[tuple[str, str], tuple[str, str]]:
    """{(metric, step): (value, recorded in)} of the card's Evaluation table."""
    rows = re.findall(r"^\| (\S+) \| (\S+) \| ([^|]+) \| ([^|]+) \|$", _section(readme, "Evaluation"), re.M)
    return {(m, s.strip()): (v, src.strip()) for m, v, s, src in rows if m not in ("metric", "---")}


def _fmt4(value: float) -> str:
    return f"{value:.4g}"


def assert_states_the_run(readme: str, meta: dict, run_dir: Path, step: int = DEMO_STEPS) -> None:
    training = _table(_section(readme, "Training"))
    assert training["steps"] == str(step)
    assert training["samples seen"] == str(step * DEMO_BATCH)
    assert training["objectives"] == "contrastive=1.0"
    sizes = run_dir / "shards" / "train" / "sizes.json"
    assert f"sizes.json sha256 {hashlib.sha256(sizes.read_bytes()).hexdigest()[:16]}" in training["dataset"]
    assert meta["training"]["step"] == step and meta["training"]["samples_seen"] == step * DEMO_BATCH

    logged = {k: v for k, v in _logged_evals(run_dir).items() if k[1] <= step}
    assert {s for _, s in logged} == set(range(DEMO_EVAL_EVERY, step + 1, DEMO_EVAL_EVERY))
    rows = _eval_rows(readme)
    for (name, at), value in logged.items():  # every figure training logged, with its step
        assert rows[(name, str(at))] == (_fmt4(value), "metrics.jsonl"), (name, at)
    assert "No evaluation results were recorded" not in readme


def test_demo_card_states_steps_objectives_datasets_and_the_evaluations_with_their_steps(demo_run):
    export_dir = demo_run / "export"
    readme, meta = (export_dir / "README.md").read_text(), json.loads((export_dir / METADATA_FILE).read_text())
    assert_states_the_run(readme, meta, demo_run)
    # the demo's printed zero-shot figure is the card's figure at the final step
    report = json.loads((demo_run / "report.json").read_text())
    assert report["steps"] == DEMO_STEPS
    assert _eval_rows(readme)[("eval/zeroshot/top1", str(DEMO_STEPS))][0] == _fmt4(report["zero_shot_top1"])
    entries = {(e["metric"], e["step"]): e["value"] for e in meta["evals"]}
    assert entries[("eval/zeroshot/top1", DEMO_STEPS)] == pytest.approx(report["zero_shot_top1"])


def test_plait_export_writes_the_demo_card(demo_run, tmp_path):
    """`plait export` of the run (whose report.json the demo has since rewritten under its own key names) states
    the same history and evaluations as the demo's own export, each figure once."""
    out = tmp_path / "exported"
    assert plait.main(["export", str(demo_run), "--out", str(out)]) == 0
    readme, meta = (out / "README.md").read_text(), json.loads((out / METADATA_FILE).read_text())
    assert_states_the_run(readme, meta, demo_run)
    demo_readme = (demo_run / "export" / "README.md").read_text()
    for title in ("Training", "Evaluation"):
        assert _section(readme, title) == _section(demo_readme, title)
    assert not any("zero_shot_top1" in m for m, _ in _eval_rows(readme))  # report.json's copy is not repeated


def test_export_of_an_earlier_checkpoint_leaves_out_later_evaluations(demo_run, tmp_path):
    out = tmp_path / "early"
    step3 = demo_run / "checkpoints" / f"step-{DEMO_EVAL_EVERY:08d}"
    assert (step3 / "model.safetensors").is_file()
    assert plait.main(["export", str(step3), "--out", str(out)]) == 0
    readme, meta = (out / "README.md").read_text(), json.loads((out / METADATA_FILE).read_text())
    assert_states_the_run(readme, meta, demo_run, step=DEMO_EVAL_EVERY)
    assert {s for _, s in _eval_rows(readme)} == {str(DEMO_EVAL_EVERY)}
    assert "are left out: they measured later weights" in readme


def test_finetune_card_carries_the_pretraining_history_and_its_own_evaluations(demo_run, tmp_path):
    out, result_file = tmp_path / "ft", tmp_path / "result.json"
    test_shards = sorted(str(p) for p in (demo_run / "shards" / "test").glob("*.tar"))
    train_shards = sorted(str(p) for p in (demo_run / "shards" / "train").glob("*.tar"))
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("\n".join(FASHION_MNIST_CLASSES) + "\n")
    assert plait.main(["finetune", str(demo_run / "export"), "--train-data", train_shards[0],
                       "--test-data", test_shards[0], "--classnames", str(classnames), "--mode", "linear",
                       "--batch-size", "64",
                       "--out", str(out), "--output", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    readme, meta = (out / "README.md").read_text(), json.loads((out / METADATA_FILE).read_text())
    assert_states_the_run(readme, meta, demo_run)
    rows = _eval_rows(readme)
    assert rows[("zero_shot_before/top1", str(DEMO_STEPS))][0] == _fmt4(result["zero_shot"]["top1"])
    tuned_step = f"{DEMO_STEPS} + {result['training']['steps']} fine-tune steps"
    assert rows[("finetuned/top1", tuned_step)][0] == _fmt4(result["finetuned"]["top1"])


def test_a_run_without_evaluations_says_so(demo_run, tmp_path):
    """The same run as train writes it when no eval data is configured: no eval records, no eval results."""
    from pipeline.train.report import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir, ignore=shutil.ignore_patterns("export", "shards"))
    records = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("kind") != "eval"]
    (run_dir / "metrics.jsonl").write_text("\n".join(records) + "\n")
    (run_dir / "report.json").unlink()
    write_report(run_dir, {"steps": DEMO_STEPS, "samples_seen": DEMO_STEPS * DEMO_BATCH, "exit_code": 0})
    out = tmp_path / "exported"
    assert plait.main(["export", str(run_dir), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert _section(readme, "Evaluation").strip() == "No evaluation results were recorded."
    assert _table(_section(readme, "Training"))["steps"] == str(DEMO_STEPS)
    assert json.loads((out / METADATA_FILE).read_text())["evals"] == []


def test_recorded_evaluations_under_any_key_names_with_their_steps(tmp_path):
    """Retrieval and probe figures, train's nested results and a resumed run's repeated step, as train_eval and
    report.py write them."""
    from pipeline.train.metrics import MetricsLog
    from pipeline.train.report import write_report
    from pipeline.train.evals import log_fields

    from accelerate import Accelerator
    log = MetricsLog(tmp_path, Accelerator(cpu=True), enabled=True)  # no trackers: metrics.jsonl only
    log.write({"kind": "eval", "step": 50, **log_fields({"retrieval": {"image_to_text_R@1": 0.25}})})
    log.write({"kind": "eval", "step": 50, **log_fields({"retrieval": {"image_to_text_R@1": 0.5}})})  # resumed
    log.write({"kind": "eval", "step": 100, **log_fields({"retrieval": {"image_to_text_R@1": 0.75}})})
    write_report(tmp_path, {"steps": 100, "retrieval": {"image_to_text_R@1": 0.75, "num_images": 8},
                            "linear_probe": {"top1": 0.625, "C": 1.0, "probe_sweep": {"1.0": 0.5}},
                            "final_loss": 1.5})
    evals, left_out = recorded_evals(tmp_path, up_to_step=100)
    got = {(e["metric"], e["step"]): (e["value"], e["source"]) for e in evals}
    assert got == {("eval/retrieval/image_to_text_R@1", 50): (0.5, "metrics.jsonl"),
                   ("eval/retrieval/image_to_text_R@1", 100): (0.75, "metrics.jsonl"),
                   ("retrieval/num_images", 100): (8, "report.json"),
                   ("linear_probe/top1", 100): (0.625, "report.json")}
    assert left_out == 0
    assert recorded_evals(tmp_path, up_to_step=60)[1] == 3
