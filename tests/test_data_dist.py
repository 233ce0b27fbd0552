"""Two real processes (gloo, CPU), two DataLoader workers each: one exact epoch covers the dataset once."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import DataConfig
from pipeline.data.loader import TrainStream
from pipeline.train.distributed import World
from tests.helpers.synthetic_shards import make_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _rank_main(rank: int, spec: str, folder: str, epochs: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        cfg = DataConfig(train_shards=spec, batch_size=8, num_workers=2, shuffle_buffer=16)
        stream = TrainStream(cfg, World(rank=rank, world_size=2), open_clip.image_transform(16, is_train=True),
                             open_clip.get_tokenizer("ViT-B-32", context_length=16), with_keys=True)
        batches = iter(stream)
        per_epoch = []
        for _ in range(epochs):
            per_epoch.append([k for _ in range(stream.batches_per_epoch) for k in next(batches)["__key__"]])
        counts = torch.tensor([stream.batches_per_epoch])
        gathered = [torch.zeros_like(counts) for _ in range(2)]
        dist.all_gather(gathered, counts)  # the collective a DDP step would run: both ranks must arrive
        keys = [None, None]
        dist.all_gather_object(keys, per_epoch)
        if rank == 0:
            Path(folder, "result.json").write_text(json.dumps({"batches": [int(g) for g in gathered], "keys": keys}))
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, counts: list[int], epochs: int) -> dict:
    spec = make_shards(tmp_path / "shards", counts)
    mp.spawn(_rank_main, args=(spec, str(tmp_path), epochs), nprocs=2, join=True)
    return json.loads((tmp_path / "result.json").read_text())


def _all_keys(folder: Path) -> list[str]:
    return [k for p in sorted(folder.glob("*.idx.json")) for k in json.loads(p.read_text())["keys"]]


def test_two_ranks_read_every_sample_once_with_equal_batches(tmp_path):
    result = _run(tmp_path, [13, 7, 30, 2, 25, 19, 0, 32], epochs=2)  # 128 samples, uneven shards
    everything = sorted(_all_keys(tmp_path / "shards"))
    assert result["batches"] == [8, 8]
    for epoch in range(2):
        rank0, rank1 = result["keys"][0][epoch], result["keys"][1][epoch]
        assert len(rank0) == len(rank1) == 64
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == everything
    assert result["keys"][0][0] != result["keys"][0][1]  # reshuffled per epoch
