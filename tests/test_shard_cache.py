"""The local shard cache (data.cache_dir, data.cache_bytes; data_prep/shards/cache.py) against a counting HTTP
server: the second epoch over remote shards fetches nothing, the samples are those read without a cache, the
bound holds by least-recent use, a copy cut short is fetched again, and a resumed stream reads the same.

Fixture: four synthetic shards of 12 samples behind a file server on 127.0.0.1 that counts each GET by path."""
from __future__ import annotations

import collections
import functools
import http.server
import threading

import open_clip
import pytest

from data_prep.shards.cache import ShardCache
from pipeline.config import DataConfig
from pipeline.data.loader import TrainStream
from pipeline.train.distributed import World
from tests.helpers.synthetic_shards import make_shards

PER_SHARD, SHARDS, BATCH = 12, 4, 6
EPOCH_BATCHES = PER_SHARD * SHARDS // BATCH


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "remote"
    make_shards(folder, [PER_SHARD] * SHARDS)
    gets: collections.Counter = collections.Counter()

    class Counting(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            gets[self.path] += 1
            return super().do_GET()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(folder)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/{{00000..{SHARDS - 1:05d}}}.tar", gets, folder
    httpd.shutdown()


def _stream(spec: str, workers: int = 2, **kw) -> TrainStream:
    cfg = DataConfig(train_shards=spec, batch_size=BATCH, num_workers=workers, shuffle_buffer=8, **kw)
    return TrainStream(cfg, World(), open_clip.image_transform(32, is_train=False),
                       open_clip.get_tokenizer("ViT-B-32"), with_keys=True)


def _keys(stream: TrainStream, batches: int) -> list[list[str]]:
    it = iter(stream)
    return [next(it)["__key__"] for _ in range(batches)]


def _tar_gets(gets) -> int:
    return sum(n for path, n in gets.items() if path.endswith((".tar", ".idx.json")))


def test_the_second_epoch_fetches_nothing_and_reads_the_same_samples(server, tmp_path):
    spec, gets, _ = server
    plain = _keys(_stream(spec), 2 * EPOCH_BATCHES)
    gets.clear()
    stream = _stream(spec, cache_dir=str(tmp_path / "cache"))
    it = iter(stream)
    first = [next(it)["__key__"] for _ in range(EPOCH_BATCHES)]
    after_first = _tar_gets(gets)
    assert after_first > 0
    second = [next(it)["__key__"] for _ in range(EPOCH_BATCHES)]
    assert _tar_gets(gets) == after_first, dict(gets)  # epoch 2 read every shard from the cache
    assert first + second == plain
    # each shard and index fetched once, although two workers read pieces of the same shards
    assert all(gets[f"/{i:05d}.tar"] == 1 for i in range(SHARDS)), dict(gets)
    # a new stream (a resumed run) reads from the cache too, and continues where the state says
    resumed = _stream(spec, cache_dir=str(tmp_path / "cache"))
    resumed.load_state_dict({**stream.state_dict()})
    assert _keys(resumed, 2) == _keys(_stream(spec, cache_dir=str(tmp_path / "cache")), 2 * EPOCH_BATCHES + 2)[-2:]
    assert _tar_gets(gets) == after_first


def test_the_bound_evicts_the_least_recently_used_and_samples_stay_right(server, tmp_path):
    spec, gets, folder = server
    shard_bytes = (folder / "00000.tar").stat().st_size + (folder / "00000.idx.json").stat().st_size
    cache = tmp_path / "cache"
    plain = _keys(_stream(spec, workers=0), EPOCH_BATCHES)
    got = _keys(_stream(spec, workers=0, cache_dir=str(cache), cache_bytes=str(2 * shard_bytes + 10)),
                EPOCH_BATCHES)
    assert got == plain
    held = sorted(p.name for p in cache.glob("*/*.tar"))
    assert len(held) == 2, held  # the bound: two shards with their indexes
    assert sum(p.stat().st_size for p in cache.glob("*/*") if p.suffix in (".tar", ".json")
               and not p.name.endswith(".cached.json")) <= 2 * shard_bytes + 10


def test_a_copy_cut_short_is_fetched_again(server, tmp_path):
    spec, gets, folder = server
    url = spec.split("{")[0] + "00001.tar"
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    local = cache.local(url)
    assert open(local, "rb").read() == (folder / "00001.tar").read_bytes()
    with open(local, "r+b") as f:
        f.truncate(1000)  # a disk that filled up, a copy damaged on the node
    assert cache.local(url) == local and gets["/00001.tar"] == 2
    assert open(local, "rb").read() == (folder / "00001.tar").read_bytes()
    # a file of plait's naming in another entry is never touched; a foreign file in the cache neither
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    ShardCache(str(tmp_path / "cache"), 1)._evict(keep=tmp_path / "none")
    assert (tmp_path / "cache" / "notes.txt").read_text() == "mine"


def test_an_entry_is_always_inside_the_cache(tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), 1 << 20)
    for url in ("http://h/a/..", "http://h/a/.x.tar", "s3://b/p/", "http://h/a\\b/c\\..\\d.tar"):
        entry = cache.entry(url).resolve()
        assert entry.parent.parent == (tmp_path / "cache").resolve() and not entry.name.startswith("."), url
