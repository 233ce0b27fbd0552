"""`plait prep verify` and `plait train`'s loader agree by construction on which samples are trainable: a table of
member layouts written by webdataset's own ShardWriter (and by hand), each checked through both."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import webdataset as wds
from PIL import Image

import plait
from data_prep.shards.members import MemberKeys
from data_prep.maintenance.verify import verify
from pipeline.config import DataConfig
from pipeline.data.loader import BadData, TrainStream
from pipeline.train.distributed import World

NUM = 8


def image(fmt: str = "JPEG", seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def caption(i: int) -> bytes:
    return f"a photo number {i}".encode()


# name -> (members of sample i as {extension: bytes}, (image_keys, caption_keys) that make it trainable or None)
LAYOUTS = {
    "txt": (lambda i: {"jpg": image(seed=i), "txt": caption(i)}, None),
    "caption": (lambda i: {"jpg": image(seed=i), "caption": caption(i)}, ("jpg;jpeg;png;webp", "txt;caption")),
    "json_caption": (lambda i: {"jpg": image(seed=i), "json": json.dumps({"caption": f"photo {i}"}).encode()},
                     ("jpg;jpeg;png;webp", "txt;json:caption")),
    "jpeg": (lambda i: {"jpeg": image(seed=i), "txt": caption(i)}, None),
    "upper_JPG": (lambda i: {"JPG": image(seed=i), "txt": caption(i)}, None),
    "png": (lambda i: {"png": image("PNG", i), "txt": caption(i)}, None),
    "bmp": (lambda i: {"bmp": image("BMP", i), "txt": caption(i)}, "never"),
    "tiff": (lambda i: {"tiff": image("TIFF", i), "txt": caption(i)}, "never"),
    "dotted_key": (lambda i: {"b.jpg": image(seed=i), "b.txt": caption(i)}, "never"),
    "video_frames": (lambda i: {"f0000.jpg": image(seed=i), "f0001.jpg": image(seed=i + 100), "txt": caption(i)},
                     None),
}


def write(folder: Path, layout: str, dunder: bool = False) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    members = LAYOUTS[layout][0]
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=NUM // 2, verbose=0) as sink:
        for i in range(NUM):
            sink.write({"__key__": f"__{i:04d}" if dunder else f"s{i:04d}", **members(i)})
    assert plait.main(["prep", "index", str(folder), "--no-progress"]) == 0
    return f"{folder}/{{00000..00001}}.tar"


def train_reads(spec: str, keys: MemberKeys) -> tuple[bool, str]:
    """Whether one epoch of the real training stream reads every sample, and the first reason if not."""
    cfg = DataConfig(train_shards=spec, batch_size=2, num_workers=0, shuffle_buffer=0, max_bad_fraction=1.0,
                     image_keys=keys.image_spec, caption_keys=keys.caption_spec)
    stream = TrainStream(cfg, World(), open_clip.image_transform(16, is_train=True),
                         open_clip.get_tokenizer("ViT-B-32", context_length=16))
    try:
        it = iter(stream)
        for _ in range(stream.batches_per_epoch):
            next(it)
    except BadData as exn:
        return False, str(exn)
    counters = stream.counters()
    return counters["bad"] == 0, f"{counters}"


def verify_passes(folder: Path, keys: MemberKeys) -> tuple[bool, str]:
    report = verify(str(folder), decode_fraction=1.0, threads=1, keys=keys)
    return report.ok, "\n".join(report.problems)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_what_verify_passes_train_reads(tmp_path, layout):
    spec = write(tmp_path / layout, layout)
    fix = LAYOUTS[layout][1]
    tried = [MemberKeys.parse()] + ([MemberKeys.parse(*fix)] if isinstance(fix, tuple) else [])
    for keys in tried:
        ok_verify, why_verify = verify_passes(tmp_path / layout, keys)
        ok_train, why_train = train_reads(spec, keys)
        assert ok_verify == ok_train, (f"{layout} {keys}: verify {ok_verify} ({why_verify}), "
                                       f"train {ok_train} ({why_train})")
        if not ok_verify:
            assert why_verify and why_train
    # the layouts with a fix fail with the default keys and pass with the fix; the others pass as they are
    assert verify_passes(tmp_path / layout, tried[-1])[0] == (fix != "never")


def test_caption_members_name_the_key_to_set(tmp_path, capsys):
    write(tmp_path / "d", "caption")
    assert plait.main(["prep", "verify", str(tmp_path / "d")]) == 1
    out = capsys.readouterr().out
    assert "data.caption_keys (--caption-keys) to 'txt;caption'" in out
    assert plait.main(["prep", "verify", str(tmp_path / "d"), "--caption-keys", "txt;caption"]) == 0


def test_a_run_where_every_sample_is_bad_ends_in_one_line(tmp_path, capsys):
    spec = write(tmp_path / "d", "caption")
    ok, why = train_reads(spec, MemberKeys.parse())
    assert not ok and "\n" not in why
    assert "missing_field" in why and "set data.caption_keys (--caption-keys) to 'txt;caption'" in why


def test_dunder_keys_are_ordinary_samples_everywhere(tmp_path):
    spec = write(tmp_path / "d", "txt", dunder=True)
    assert verify_passes(tmp_path / "d", MemberKeys.parse())[0]
    assert train_reads(spec, MemberKeys.parse())[0]


def test_a_sample_split_across_two_tars_is_reported_by_both(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    for shard, members in enumerate(({"a.jpg": image(), "a.txt": caption(0), "b.jpg": image(seed=1)},
                                     {"b.txt": caption(1), "c.jpg": image(seed=2), "c.txt": caption(2)})):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert plait.main(["prep", "index", str(folder), "--no-progress"]) == 0
    ok_verify, why_verify = verify_passes(folder, MemberKeys.parse())
    ok_train, _ = train_reads(f"{folder}/{{00000..00001}}.tar", MemberKeys.parse())
    assert not ok_verify and not ok_train
    assert "b" in why_verify


def test_bad_member_keys_name_the_setting():
    with pytest.raises(ValueError, match="data.caption_keys"):
        DataConfig(caption_keys="txt;;a b")
    with pytest.raises(ValueError, match="data.image_keys"):
        DataConfig(image_keys=";")
