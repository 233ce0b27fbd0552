"""Files from others never make plait contact a hub: an export, a pretrained folder or a config naming a hub
model (`hf_model_name: "org/repo"`) is refused with a one-line error, and no request leaves the process (seen
by a local endpoint standing in for the Hub through HF_ENDPOINT)."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def hub(tmp_path):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()


@pytest.fixture()
def hub_export(tmp_path):
    """An open_clip export whose config names a hub text tower."""
    from pipeline.artifacts.export import export_open_clip
    from pipeline.models.towers import build_clip
    from tests.helpers.fmnist_fixture import TEST_MODEL_CFG

    out = export_open_clip(build_clip(TEST_MODEL_CFG).state_dict(), TEST_MODEL_CFG, tmp_path / "export")
    config = json.loads((out / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"] = {"hf_model_name": "org/repo", "hf_tokenizer_name": "org/repo",
                                       "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler"}
    (out / "open_clip_config.json").write_text(json.dumps(config))
    return out


def _run(args, endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"))
    return subprocess.run([sys.executable, "-c", "import sys, plait; sys.exit(plait.main(sys.argv[1:]))", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_eval_and_pretrained_refuse_a_hub_model_without_a_request(hub, hub_export, tmp_path):
    endpoint, seen = hub
    import io

    import webdataset as wds
    from PIL import Image

    shards = tmp_path / "shards"
    shards.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "JPEG")
    with wds.TarWriter(str(shards / "00000.tar")) as w:
        w.write({"__key__": "a", "jpg": buf.getvalue(), "cls": b"0", "txt": b"red"})
    (shards / "classnames.txt").write_text("red\nblue\n")
    proc = _run(["eval", str(hub_export), "--data", str(shards)], endpoint, tmp_path)
    assert proc.returncode != 0
    assert "text_cfg.hf_model_name 'org/repo' is not a local folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(["train", "--config", "tiny", "--set", f"model.pretrained='{hub_export}'",
                 "--set", f"data.train_shards='{shards}/00000.tar'"], endpoint, tmp_path)
    assert proc.returncode != 0 and "is not a local folder" in proc.stderr, proc.stderr[-2000:]
    assert seen == []


def test_the_loader_of_every_model_form_refuses_hub_names(hub_export):
    from pipeline.artifacts.load import load_model

    with pytest.raises(ValueError, match="open_clip_config.json: text_cfg.hf_model_name 'org/repo' is not a local"):
        load_model(hub_export)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # and the HF libraries run offline in every plait process


@pytest.mark.parametrize("damage", ["config is an array", "bogus image_mean", "zero image_std", "string size",
                                    "weights symlinked to a non-weights file", "only a pickled .bin"])
def test_damaged_exports_are_one_line_errors(hub_export, tmp_path, damage):
    import pickle

    from pipeline.artifacts.load import load_model

    out = hub_export
    config = json.loads((out / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                       "layers": 1}
    vision = config["model_cfg"]["vision_cfg"]
    weights = out / "open_clip_model.safetensors"
    if damage == "config is an array":
        config = [config]
    elif damage == "bogus image_mean":
        vision["image_mean"] = ["a", "b", "c"]
    elif damage == "zero image_std":
        vision["image_std"] = [0, 0, 0]
    elif damage == "string size":
        vision["image_size"] = "big"
    elif damage == "weights symlinked to a non-weights file":
        other = tmp_path / "notes.txt"
        other.write_text("not weights")
        weights.unlink()
        weights.symlink_to(other)
    else:
        for f in out.glob("*.safetensors"):
            f.unlink()
        (out / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps({"weights": "a pickle"}))
    (out / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as exn:
        load_model(out)
    assert "\n" not in str(exn.value) and str(out) in str(exn.value)
