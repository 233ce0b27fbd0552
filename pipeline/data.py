"""The streaming training loader: WebDataset stages from shard specs to device-ready batches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds

from pipeline.config import DataConfig
from pipeline.distributed import World

IMAGE_KEYS = "jpg;jpeg;png;webp"


def expand_shards(spec: str) -> list[str]:
    """Brace-expanded shard URLs of a spec; `a::b` joins several."""
    if not spec:
        raise ValueError("config key 'data.train_shards' is empty: point it at shards, e.g. data/{00000..00009}.tar")
    urls = wds.shardlists.expand_urls(spec)
    missing = [u for u in urls if "://" not in u and not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def count_samples(urls: list[str]) -> int:
    """Exact sample count from the shards' sizes.json (open_clip's convention)."""
    total = 0
    for folder in sorted({str(Path(u).parent) for u in urls}):
        sizes_path = Path(folder) / "sizes.json"
        if not sizes_path.exists():
            raise FileNotFoundError(f"{sizes_path} not found: shard sample counts are needed for exact epochs")
        sizes = json.loads(sizes_path.read_text())
        total += sum(sizes[Path(u).name] for u in urls if str(Path(u).parent) == folder)
    return total


class TrainStream:
    """An endless iterator of batches, epoch after epoch, with equal batch counts on every rank."""

    def __init__(self, cfg: DataConfig, world: World, image_transform: Callable, tokenize: Callable):
        self.cfg, self.world = cfg, world
        self.urls = expand_shards(cfg.train_shards)
        self.num_samples = count_samples(self.urls)
        global_batch = cfg.batch_size * world.world_size
        self.batches_per_epoch = self.num_samples // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples cannot fill one global batch of {global_batch}")
        self.image_transform, self.tokenize = image_transform, tokenize
        self.epoch = 0

    def _loader(self, epoch: int) -> wds.WebLoader:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.detshuffle(bufsize=len(self.urls), seed=self.cfg.seed, epoch=epoch),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.cfg.shuffle_buffer) if self.cfg.shuffle_buffer else wds.filters.identity,
            wds.decode("pil", handler=wds.warn_and_continue),
            wds.to_tuple(IMAGE_KEYS, "txt", handler=wds.warn_and_continue),
            wds.map_tuple(self.image_transform, lambda t: self.tokenize([t])[0]),
            wds.batched(self.cfg.batch_size, partial=False),
        )
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.cfg.num_workers,
                               persistent_workers=False)
        # Repeat the stream so that every rank yields exactly batches_per_epoch batches (no DDP hang).
        return loader.repeat(2).with_epoch(self.batches_per_epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            for images, texts in self._loader(self.epoch):
                yield {"image": images, "text": texts}
            self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
