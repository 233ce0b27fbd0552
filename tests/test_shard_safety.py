"""Shards are untrusted: reading one never unpickles a member or runs a shell command, in training, `plait eval`
and `plait finetune` (eval_data.batches), while the images, captions and labels beside the traps still load."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import plait
from pipeline.config import DataConfig
from pipeline.data.loader import TrainStream
from pipeline.train.distributed import World
from pipeline.eval.datasets import batches, resolve
from pipeline.data.shardspec import parse_spec
from data_prep.cli import main
from data_prep.shards.tarseek import PipeRefused, open_url
from data_prep.shards.members import MAX_DECODE_PIXELS
from pipeline.data.transforms import decode_fields, decode_member


class _Payload:
    """Unpickling this (pickle.load, or torch.load with weights_only=False) writes `marker`: code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _trap_members(marker: Path) -> dict[str, bytes]:
    torch_file = io.BytesIO()
    torch.save(_Payload(marker), torch_file)
    return {"pyd": pickle.dumps(_Payload(marker)), "pickle": pickle.dumps(_Payload(marker)),
            "pkl": pickle.dumps(_Payload(marker)), "pth": torch_file.getvalue()}


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def trapped(tmp_path) -> dict:
    """A folder with one shard of 6 samples: jpg + txt + cls, and beside them .pyd/.pickle/.pkl/.pth traps."""
    marker = tmp_path / "marker"
    traps = _trap_members(marker)
    samples = [{"jpg": _jpeg(i), "txt": f"a photo of item {i}".encode(), "cls": str(i % 3).encode(), **traps}
               for i in range(6)]
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(folder / "00000.tar", samples)
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 6}))
    return {"folder": folder, "shard": folder / "00000.tar", "marker": marker, "traps": traps}


def test_the_trap_members_do_run_code_when_unpickled(tmp_path):
    """The fixture's payloads are real: loading them the way webdataset's default decoders do runs code."""
    marker = tmp_path / "marker"
    traps = _trap_members(marker)
    pickle.loads(traps["pyd"])
    assert marker.read_text() == "code ran"
    marker.unlink()
    torch.load(io.BytesIO(traps["pth"]), weights_only=False)
    assert marker.exists()


def _transform(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)  # [3,8,8]


@pytest.mark.parametrize("field", ["cls", "txt"])
def test_eval_and_finetune_batches_decode_only_image_and_target(trapped, field):
    """eval_data.batches serves `plait eval` (zero-shot, retrieval, linear probe) and `plait finetune`."""
    got = list(batches([str(trapped["shard"])], _transform, field, batch_size=4))
    images = torch.cat([b[0] for b in got])
    targets = [t for b in got for t in b[1]]
    assert images.shape == (6, 3, 8, 8) and images.abs().sum() > 0
    assert targets == ([i % 3 for i in range(6)] if field == "cls" else [[f"a photo of item {i}"] for i in range(6)])
    assert not trapped["marker"].exists()
    shuffled = list(batches([str(trapped["shard"])], _transform, field, batch_size=4, shuffle=8, num_workers=1))
    assert sum(len(b[1]) for b in shuffled) == 6 and not trapped["marker"].exists()


def test_training_stream_decodes_only_image_and_caption(trapped):
    tokenize = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    stream = TrainStream(DataConfig(train_shards=str(trapped["shard"]), batch_size=3, num_workers=0),
                         World(), open_clip.image_transform(16, is_train=True), tokenize)
    it = iter(stream)
    first = [next(it) for _ in range(2)]
    assert all(b["image"].shape == (3, 3, 16, 16) for b in first)
    assert stream.counters()["bad"] == 0 and not trapped["marker"].exists()


def test_decode_fields_is_the_shared_safe_decoder(trapped):
    sample = {"__key__": "s0", "jpg": _jpeg(0), "txt": b"caption", "cls": b" 7\n", "json": b'{"w": 3}',
              **trapped["traps"]}
    image, caption, label, meta = decode_fields(sample, "png;jpg", "txt", "cls", "json")
    assert image.size == (24, 20) and image.mode == "RGB" and (caption, label, meta) == ("caption", 7, {"w": 3})
    for ext in ("pyd", "pickle", "pth"):
        with pytest.raises(ValueError, match=f"no safe decoder for .{ext} members"):
            decode_fields(sample, ext)
    with pytest.raises(KeyError, match="s0: no webp member"):
        decode_fields(sample, "webp")
    assert not trapped["marker"].exists()


def test_image_decoder_refuses_other_formats_and_pixel_bombs():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # PIL would hand EPS to Ghostscript
    with pytest.raises(Exception, match="cannot identify image file"):
        decode_member("jpg", eps)
    side = int(MAX_DECODE_PIXELS ** 0.5) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")  # a few KB that claim ~67M+ pixels
    with pytest.raises(ValueError, match="above the .*-pixel limit"):
        decode_member("png", buf.getvalue())


def test_pipe_specs_are_refused_unless_allowed(trapped, tmp_path):
    ran = tmp_path / "pipe-ran"
    command = f"pipe:touch {ran}; cat {trapped['shard']}"
    for spec in (command, f"{trapped['shard']}::{command}", "{" + command + ",x}"):
        with pytest.raises(PipeRefused, match="pipe: URL, which runs a shell command: refused; pass --allow-pipe"):
            resolve(spec, flag="--allow-pipe")
        with pytest.raises(PipeRefused, match="runs a shell command: refused$"):  # finetune: no such switch
            resolve(spec)
    with pytest.raises(ValueError, match="data.train_shards: .* holds a pipe: command"):
        parse_spec(command)
    with pytest.raises(PipeRefused):
        open_url(command)
    with pytest.raises(PipeRefused):
        list(batches([command], _transform, "cls", 4))
    assert plait.main(["eval", str(tmp_path / "no-model"), "--data", command]) == 2
    assert plait.main(["finetune", str(tmp_path / "no-model"), "--train-data", command, "--test-data", command]) == 2
    assert not ran.exists()
    # The user's own command, explicitly allowed, runs and its output is read like the shard itself.
    allowed = resolve(command, allow_pipe=True)
    got = list(batches(list(allowed.urls), _transform, "cls", 4, allow_pipe=True))
    assert ran.exists() and sum(len(b[1]) for b in got) == 6 and not trapped["marker"].exists()


def test_eval_templates_are_checked_before_the_model_loads(trapped, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\na {0} next to a {1}.\n")
    assert plait.main(["eval", str(tmp_path / "no-model"), "--data", str(trapped["folder"]),
                       "--templates", str(templates)]) == 2
    err = capsys.readouterr().err
    assert str(templates) in err and "'a {0} next to a {1}.'" in err and "(found: {0}, {1})" in err


def test_damaged_index_and_stats_files_are_named(tmp_path, caplog):
    """A corrupt member index is named and ignored (the samples are found by their tar headers); a corrupt stats
    file or sizes.json is an error naming the file."""
    from data_prep.shards.tarseek import read_piece, sample_index, sample_offsets
    samples = [{"jpg": _jpeg(i), "txt": f"c{i}".encode()} for i in range(6)]
    shard = tmp_path / "00000.tar"
    _write_tar(shard, samples)
    index = tmp_path / "00000.idx.json"
    for damaged in ("{not json", json.dumps({"format": "plait-tar-index/1", "offsets": [0, 9, 3]})):
        index.write_text(damaged)
        sample_index.cache_clear()
        assert sample_offsets(str(shard)) is None
        assert str(index) in caplog.text and "damaged index" in caplog.text
        caplog.clear()
        assert [s["__key__"] for s in read_piece(str(shard), 3, 6)] == ["s0003", "s0004", "s0005"]
    (tmp_path / "00000_stats.json").write_text("{oops")
    with pytest.raises(ValueError, match="00000_stats.json"):
        parse_spec(str(shard))
    (tmp_path / "sizes.json").write_text('{"00000.tar": "six"}')
    with pytest.raises(ValueError, match="sizes.json"):
        parse_spec(str(shard))


def test_an_index_whose_offsets_were_shifted_is_caught_at_the_seek(tmp_path, caplog):
    # Offsets still increasing (the index's own check passes) but shifted by one sample: a read of samples 2-4
    # returned 3-5, sample 2 never read and 5 read twice. Each seek now checks the key the index names there.
    from data_prep.shards.tarseek import read_piece, sample_index
    samples = [{"jpg": _jpeg(i), "txt": f"c{i}".encode()} for i in range(6)]
    shard = tmp_path / "00000.tar"
    _write_tar(shard, samples)
    assert main(["index", str(tmp_path), "--no-progress"]) == 0
    index_file = tmp_path / "00000.idx.json"
    index = json.loads(index_file.read_text())
    index["offsets"] = index["offsets"][1:] + [index["offsets"][-1] + 1]
    index_file.write_text(json.dumps(index))
    sample_index.cache_clear()
    got = [s["__key__"] for s in read_piece(str(shard), 2, 5)]
    assert got == ["s0002", "s0003", "s0004"]
    assert "the index's offset of sample 2 holds sample 's0003', not 's0002'" in caplog.text
