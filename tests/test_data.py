"""TrainStream on real tar shards written by data_prep's writer (and by hand, img2dataset-style) in tmp_path."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import tarfile
import threading
from pathlib import Path

import open_clip
import pytest
import torch

from data_prep.shards import tarseek
from pipeline.config import DataConfig
from pipeline.data.loader import TrainStream
from pipeline.train.distributed import World
from pipeline.data.transforms import decode_image
from tests.helpers.synthetic_shards import jpeg, make_shards

SIZE = 16


@pytest.fixture(scope="module")
def tokenize():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


@pytest.fixture(scope="module")
def transform():
    return open_clip.image_transform(SIZE, is_train=True)


def stream(spec, tokenize, transform, world=World(), **kw) -> TrainStream:
    kw = {"batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, **kw}
    return TrainStream(DataConfig(train_shards=spec, **kw), world, transform, tokenize, with_keys=True)


def take(s: TrainStream, n: int) -> list[dict]:
    it = iter(s)
    return [next(it) for _ in range(n)]


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def test_exact_epoch_reads_every_sample_once_with_full_batches(tmp_path, tokenize, transform):
    spec = make_shards(tmp_path, [13, 1, 30, 8, 20, 0, 24])  # 96 samples = 12 batches of 8
    s = stream(spec, tokenize, transform)
    assert (s.num_samples, s.batches_per_epoch) == (96, 12)
    batches = take(s, 12)
    assert sorted(keys(batches)) == sorted(k for k in _all_keys(tmp_path))
    b = batches[0]
    assert b["image"].shape == (8, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["text"].shape == (8, 16) and b["text"].dtype == torch.long
    assert s.state_dict()["epoch"] == 0 and s.state_dict()["consumed"] == 12
    second = take_from(s, 12)  # the next epoch: same samples, another order
    assert sorted(keys(second)) == sorted(keys(batches)) and keys(second) != keys(batches)
    assert s.counters()["samples"] == 96 and s.counters()["bad"] == 0


def take_from(s: TrainStream, n: int) -> list[dict]:
    """Continue a stream from its state (as a resumed run would)."""
    fresh = TrainStream(s.cfg, s.world, s.decoder.transform, s.tokenize, with_keys=True)
    fresh.load_state_dict(s.state_dict())
    return take(fresh, n)


def _all_keys(folder: Path) -> list[str]:
    return [k for p in sorted(folder.glob("*.idx.json")) for k in json.loads(p.read_text())["keys"]]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tokenize, transform, mode, workers):
    spec = make_shards(tmp_path, [19, 23, 17, 21])  # 80 samples: 10 batches per epoch
    full = take(stream(spec, tokenize, transform, mode=mode, num_workers=workers, epoch_samples=72), 25)
    for stop in (3, 9, 14):  # inside a shuffle block, near the epoch end, in the second epoch
        first = stream(spec, tokenize, transform, mode=mode, num_workers=workers, epoch_samples=72)
        head = take(first, stop)
        rest = take_from(first, 25 - stop)
        assert keys(head + rest) == keys(full)
        for a, b in zip(head + rest, full):  # augmentations replayed bit for bit
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_resume_does_not_read_skipped_samples(tmp_path, tokenize, transform, monkeypatch):
    spec = make_shards(tmp_path, [400, 400])
    s = stream(spec, tokenize, transform, num_workers=0, shuffle_buffer=8, batch_size=8)
    state = {**s.state_dict(), "consumed": 90}
    seen = []
    original = tarseek.iter_samples

    def counting(fileobj, *args):
        for raw in original(fileobj, *args):
            seen.extend(f"{raw.key}.{ext}" for ext, _ in raw.members)
            yield raw

    monkeypatch.setattr(tarseek, "iter_samples", counting)
    s.load_state_dict(state)
    next(iter(s))
    # the resume point's block (8 samples of 3 members) and the next one (webdataset's batched reads one sample
    # ahead) plus one member that ends the last sample: nothing of the 720 samples before it
    assert len(seen) <= 3 * 16 + 1
    assert seen[0].endswith("0320.jpg") or seen[0].endswith("0720.jpg")


def test_mixing_weights_give_requested_proportions(tmp_path, tokenize, transform):
    a = make_shards(tmp_path / "a", [10] * 10, prefix="a")  # 100 samples
    b = make_shards(tmp_path / "b", [20] * 20, prefix="b")  # 400 samples: unweighted, a would get 20%
    s = stream(f"{a}@3::{b}@1", tokenize, transform, mode="resampled", num_workers=0, batch_size=32,
               shuffle_buffer=64, epoch_samples=6400)
    got = keys(take(s, 200))
    share_a = sum(k.startswith("a") for k in got) / len(got)
    assert abs(share_a - 0.75) < 0.05, share_a


def test_user_mistakes_fail_before_training(tmp_path, tokenize, transform):
    spec = make_shards(tmp_path, [16, 16, 16])
    with pytest.raises(ValueError, match="at least ranks x workers = 2 x 2 = 4 shards, got 3"):
        stream(spec, tokenize, transform, world=World(rank=0, world_size=2))
    stream(spec, tokenize, transform, world=World(rank=0, world_size=2), mode="resampled")  # fine there
    with pytest.raises(ValueError, match="mixing weights"):
        stream(f"{spec}@2::{spec}@1", tokenize, transform, num_workers=1)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        stream(str(tmp_path / "{00000..00004}.tar"), tokenize, transform)
    with pytest.raises(ValueError, match="empty"):
        stream("", tokenize, transform)
    s = stream(spec, tokenize, transform, num_workers=1)
    state = s.state_dict()
    fewer = spec.replace("00002}", "00001}")  # the dataset changed: one shard left out
    with pytest.raises(ValueError, match=r"the dataset or its order changed since the checkpoint \(num_samples "
                                         r"48 then, 32 now, .*num_shards 3 then, 2 now, sizes_digest"):
        stream(fewer, tokenize, transform, num_workers=1).load_state_dict(state)
    other = stream(fewer, tokenize, transform, num_workers=1, resume_mismatch="next_epoch")
    other.load_state_dict(state)
    assert other.state_dict()["epoch"] == 1


def test_bad_samples_are_replaced_counted_and_fail_above_the_limit(tmp_path, tokenize, transform):
    broken = {"s0000003": "jpeg", "s0010005": "notxt"}
    spec = make_shards(tmp_path, [40, 40], broken=broken)
    s = stream(spec, tokenize, transform, num_workers=2, max_bad_fraction=0.05)
    batches = take(s, s.batches_per_epoch)
    assert all(b["image"].shape[0] == 8 for b in batches)
    assert not set(broken) & set(keys(batches))
    c = s.counters()
    assert (c["decode_error"], c["missing_field"], c["bad"], c["samples"]) == (1, 1, 2, 78)
    strict = stream(spec, tokenize, transform, num_workers=2, max_bad_fraction=0.01)
    with pytest.raises(RuntimeError, match=r"2 of 80 samples were bad.*decode_error 1, missing_field 1"):
        take(strict, strict.batches_per_epoch + 1)


def test_truncated_shard_keeps_batch_counts_and_is_counted(tmp_path, tokenize, transform):
    spec = make_shards(tmp_path, [40, 40])
    tar = tmp_path / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # a half-written shard
    s = stream(spec, tokenize, transform, num_workers=2, max_bad_fraction=1.0)
    batches = take(s, s.batches_per_epoch)
    assert len(batches) == 10 and all(len(b["__key__"]) == 8 for b in batches)
    c = s.counters()
    assert c["short_shard"] + c["unreadable_shard"] >= 15 and c["samples"] + c["bad"] == 80


def _img2dataset_shards(folder: Path, counts: list[int]) -> str:
    """Tars as img2dataset writes them: tarfile members, per-shard `_stats.json`, no index, no sizes.json."""
    folder.mkdir(parents=True)
    for shard, count in enumerate(counts):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"
                for ext, data in (("jpg", jpeg(i)), ("txt", f"img2dataset {key}".encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": count, "count": count}))
    return f"{folder}/{{00000..{len(counts) - 1:05d}}}.tar"


def test_img2dataset_shards_resume_by_tar_headers(tmp_path, tokenize, transform):
    spec = _img2dataset_shards(tmp_path / "i2d", [30, 26, 24])
    full = take(stream(spec, tokenize, transform, num_workers=1), 14)
    first = stream(spec, tokenize, transform, num_workers=1)
    head = take(first, 4)
    assert keys(head + take_from(first, 10)) == keys(full)


def test_header_walk_finds_the_same_offsets_as_the_index(tmp_path):
    make_shards(tmp_path, [25])
    offsets = tarseek.sample_offsets(str(tmp_path / "00000.tar"))
    with open(tmp_path / "00000.tar", "rb") as f:
        for i in (0, 1, 13, 24):
            f.seek(0)
            tarseek.seek_by_headers(f, i)
            assert f.tell() == offsets[i]
        f.seek(0)
        with pytest.raises(EOFError):
            tarseek.seek_by_headers(f, 25)


def test_video_samples_as_one_frame_or_clips(tmp_path, tokenize, transform):
    spec = make_shards(tmp_path, [16, 16], frames=5)
    one = take(stream(spec, tokenize, transform, num_workers=1), 1)[0]
    assert one["image"].shape == (8, 3, SIZE, SIZE)
    clip = take(stream(spec, tokenize, transform, num_workers=1, video_frames=3), 1)[0]
    assert clip["frames"].shape == (8, 3, 3, SIZE, SIZE) and "image" not in clip
    long = take(stream(spec, tokenize, transform, num_workers=1, video_frames=8), 1)[0]
    assert long["frames"].shape == (8, 8, 3, SIZE, SIZE)  # 5 frames stretched to 8 by repetition


def test_reduced_size_jpeg_decode():
    photo = Path("/usr/share/doc/opencv-doc/examples/data/building.jpg")
    data = photo.read_bytes() if photo.exists() else jpeg(0, size=(1024, 768))
    full = decode_image(data, None)
    small = decode_image(data, 100)
    assert min(small.size) >= 100 and small.size[0] <= full.size[0] // 2
    assert decode_image(data, 10_000).size == full.size  # never below the request


def test_http_urls_read_through_fsspec(tmp_path, tokenize, transform):
    spec = make_shards(tmp_path, [24, 24])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{{00000..00001}}.tar"
        remote = stream(url, tokenize, transform, num_workers=0)
        local = keys(take(stream(spec, tokenize, transform, num_workers=0), 6))
        head = take(remote, 2)
        assert keys(head) == local[:16]
        assert keys(take_from(remote, 4)) == local[16:]  # resumed: seeks by the index over http range requests
    finally:
        server.shutdown()


def test_file_urls_and_stats_files_without_sizes_json(tmp_path, tokenize, transform):
    spec = make_shards(tmp_path, [16, 16])
    (tmp_path / "sizes.json").unlink()  # counts now come from each shard's S_stats.json
    s = stream("file://" + spec, tokenize, transform, num_workers=0)
    assert (s.num_samples, s.batches_per_epoch) == (32, 4)
    assert sorted(keys(take(s, 4))) == sorted(_all_keys(tmp_path))


def test_real_video_shards_from_plait_prep(tmp_path, tokenize, transform):
    """Megamind.avi and tree.avi (opencv-doc) through `plait prep --video`, then read as frames or clips."""
    from data_prep.cli import main as prep
    videos = [Path("/usr/share/doc/opencv-doc/examples/data") / n for n in ("Megamind.avi", "tree.avi")]
    if not all(v.exists() for v in videos):
        pytest.skip("opencv-doc sample videos not installed (apt-get install opencv-doc)")
    table = tmp_path / "videos.csv"
    table.write_text("url,caption\n" + "".join(f"{v},a clip of {v.stem}\n" for v in videos))
    out = tmp_path / "shards"
    prep(["shard", "--input", str(table), "--video", "--num-frames", "5", "--image-size", "48", "--output",
          str(out), "--processes", "1", "--no-progress", "--local-root", str(videos[0].parent)])
    spec = str(out / "00000.tar")
    one = take(stream(spec, tokenize, transform, num_workers=0, batch_size=2), 1)[0]
    assert one["image"].shape == (2, 3, SIZE, SIZE)
    clip = take(stream(spec, tokenize, transform, num_workers=0, batch_size=2, video_frames=4), 1)[0]
    assert clip["frames"].shape == (2, 4, 3, SIZE, SIZE) and clip["text"].shape == (2, 16)
    # the four frames differ (time passes) yet share one random crop: frame 0 is not a copy of frame 3
    assert not torch.equal(clip["frames"][0, 0], clip["frames"][0, 3])


def test_decode_size_never_upsamples_the_crop():
    from pipeline.data.transforms import decode_min_side
    assert decode_min_side(open_clip.image_transform(224, is_train=False)) == 224
    assert decode_min_side(open_clip.image_transform(224, is_train=True)) == 237  # crops keep >= 90% of the area
    from torchvision import transforms as T
    assert decode_min_side(T.Compose([T.RandomResizedCrop(224, scale=(0.25, 1.0))])) == 448


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


def test_workers_survive_the_stop_signals_slurm_sends_to_every_process(tmp_path, tokenize, transform):
    """SLURM signals the whole job step; the loop must get to its checkpoint, not die with its workers."""
    spec = make_shards(tmp_path, [16, 16, 16, 16])
    s = stream(spec, tokenize, transform, num_workers=2)
    it = iter(s)
    next(it)
    workers = _children(os.getpid())
    assert len(workers) >= 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    more = [next(it) for _ in range(5)]  # a worker killed by the signal would raise here
    assert all(b["image"].shape[0] == 8 for b in more)


def test_batch_normalisation_gives_the_same_batches_as_the_per_sample_transform(tmp_path, tokenize, transform):
    """Workers hand over uint8 images and the stream normalises whole batches: the values must be exactly those
    of running open_clip's whole preprocess per sample (a wrapper that cannot be split forces that path)."""
    spec = make_shards(tmp_path, [16, 16])

    def per_sample(img):
        return transform(img)

    split = take(stream(spec, tokenize, transform), 3)
    whole = take(stream(spec, tokenize, per_sample), 3)
    for a, b in zip(split, whole):
        assert a["__key__"] == b["__key__"]
        assert a["image"].dtype == b["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"])
