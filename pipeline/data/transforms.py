"""Image transforms compatible with open_clip's preprocess, text tokenisation, and sample decoding.

Decoding goes through PIL directly (not webdataset's `decode("pil")`) for two reasons: a JPEG stored larger than
the model needs is decoded at a reduced size with `Image.draft` (the DCT scaling of libjpeg: 2-8x less work on
512 px shards for a 224 px model), and a video sample decodes only the frames it uses.

A preprocess that ends in ToTensor + Normalize (open_clip's always does) is split: workers run the PIL steps and
hand over uint8 images, and the float conversion and normalisation run once per batch (`BatchNormalize`). Per
sample they cost ~1.3 ms of a worker's ~6.5 ms at 224 px, and a uint8 batch is a quarter of the bytes to stack and
to pass from the workers through shared memory (and to the GPU). Same arithmetic as torchvision's, so the same
values.

Shards are untrusted input: `decode_fields` is the one way plait turns shard members into values (training,
evaluation, fine-tuning, scoring, verification). It decodes only the members asked for, each with an explicit
decoder for its extension (images through PIL restricted to JPEG/PNG/WebP and a pixel limit, text as UTF-8,
labels as integers, json), never webdataset's default decoders, which unpickle `.pyd`/`.pickle` members and
`torch.load` `.pth` members: a downloaded shard must not run code.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

from data_prep.shards.layout import IMAGE_EXTS
from data_prep.shards.members import MemberKeys, open_image
from pipeline.models.towers import image_mean_std



def image_transform(model_cfg: dict, is_train: bool) -> T.Compose:
    """open_clip's train (random resized crop) or eval (resize + centre crop) preprocess for this model."""
    mean, std = image_mean_std(model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=is_train, mean=mean, std=std)


def preprocess_cfg(model_cfg: dict) -> dict:
    """The preprocess settings open_clip's `local-dir:` loader reads from open_clip_config.json."""
    mean, std = image_mean_std(model_cfg)
    return {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB", "mean": list(mean), "std": list(std),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def decode_min_side(transform) -> int | None:
    """The shortest side a decoded image needs so that `transform` (torchvision / open_clip) never upsamples:
    its output size, divided by sqrt(smallest crop area) for a RandomResizedCrop (open_clip's scale 0.9:
    224 px -> 237 px). None when the transform's size cannot be told (then no reduced decode)."""
    for t in getattr(transform, "transforms", [transform]):
        size = getattr(t, "size", None)
        if isinstance(size, (tuple, list)) and size:
            size = max(size)
        if isinstance(size, int):
            min_scale = getattr(t, "scale", (1.0, 1.0))[0] if isinstance(t, T.RandomResizedCrop) else 1.0
            return math.ceil(size / math.sqrt(max(min_scale, 1e-6)))
    return None


def _is_to_tensor(step) -> bool:
    return isinstance(step, T.ToTensor) or type(step).__name__ == "MaybeToTensor"  # open_clip's variant


class BatchNormalize:
    """torchvision's ToTensor + Normalize on a uint8 batch [..., 3, H, W] -> float32, in the same order of
    operations (divide by 255, subtract the mean, divide by the std)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div_(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def split_transform(transform) -> tuple[Callable, BatchNormalize | None]:
    """(the PIL part, its batch normaliser) when `transform` is a Compose ending in ToTensor + Normalize with a
    per-channel mean/std; else (transform, None): the whole transform runs per sample."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not _is_to_tensor(steps[-2]) or not isinstance(steps[-1], T.Normalize):
        return transform, None
    norm = steps[-1]
    if len(norm.mean) != 3 or len(norm.std) != 3 or norm.inplace:
        return transform, None
    return T.Compose(steps[:-2]), BatchNormalize(norm.mean, norm.std)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 [3,H,W] (a channel-last view; the batch stack makes it contiguous)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # [H,W,3] -> [3,H,W]


def decode_image(data: bytes, min_side: int | None) -> Image.Image:
    """RGB image; a JPEG at least twice `min_side` on its short side is decoded at 1/2, 1/4 or 1/8 scale,
    never below `min_side` (libjpeg picks the largest reduction that keeps both sides >= the request)."""
    img = open_image(data)  # the format's formats and pixel cap, as prep verify checks them
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def _label(data: bytes) -> int:
    return int(data.decode("ascii").strip())  # webdataset / clip_benchmark write class indices as text


def _json(data: bytes):
    return json.loads(data.decode("utf-8"))


MEMBER_DECODERS: dict[str, Callable[[bytes], object]] = {
    **{ext: (lambda data: decode_image(data, None)) for ext in IMAGE_EXTS},
    "txt": _text, "text": _text, "caption": _text, "cls": _label, "json": _json,
}
"""Explicit decoders by member extension (the part after the last dot: `0.webp` decodes as `webp`). A member
whose extension is not here has no decoder: asking for it is an error, and members not asked for stay bytes."""


def decode_member(ext: str, data: bytes):
    """One shard member decoded by the decoder of its extension; ValueError for an extension without one."""
    decoder = MEMBER_DECODERS.get(ext.rsplit(".", 1)[-1].lower())
    if decoder is None:
        raise ValueError(f"no safe decoder for .{ext} members (known: {', '.join(MEMBER_DECODERS)})")
    return decoder(data if isinstance(data, bytes) else bytes(data))


def decode_fields(sample: dict, *fields: str) -> tuple:
    """The named members of a raw webdataset sample, decoded, as a tuple (like webdataset's `to_tuple`, whose
    `"jpg;png"` picks the first member present). Only these members are decoded, with `decode_member`; a
    `.pyd`/`.pth`/`.pickle` member beside them is never touched. KeyError naming the sample when one is missing.

    Reuse this wherever plait reads shards: `decode_fields(sample, "jpg;jpeg;png;webp", "txt")` -> (PIL RGB
    image, caption)."""
    out = []
    for field in fields:
        ext = next((e for e in field.split(";") if e in sample), None)
        if ext is None:
            raise KeyError(f"{sample.get('__url__', '')}:{sample.get('__key__', '')}: no {field} member")
        out.append(decode_member(ext, sample[ext]))
    return tuple(out)


def media_keys(sample: dict, keys: MemberKeys | None = None) -> tuple[list[str], bool]:
    """The sample's image member(s) and whether it is a video: frame members in time order, else one image
    (the shard format's rule, `MemberKeys.image_members`)."""
    return (keys or MemberKeys.parse()).image_members(sample)


def frame_indices(num_frames: int, wanted: int, rng: np.random.Generator) -> list[int]:
    """`wanted` frame indices in time order: one random frame in each of `wanted` equal segments (TSN-style
    sampling), repeating frames when the video has fewer than `wanted`."""
    if num_frames >= wanted:
        edges = np.linspace(0, num_frames, wanted + 1)
        return [int(rng.integers(int(lo), max(int(lo) + 1, int(hi)))) for lo, hi in zip(edges[:-1], edges[1:])]
    return [int(i) for i in np.floor(np.arange(wanted) * num_frames / wanted)]


class SampleDecoder:
    """Raw webdataset sample -> {"image": [3,H,W] | "frames": [T,3,H,W], "caption": str, "__key__": str}.

    Images are float (the whole transform ran), or uint8 when `normalize` is set: then `normalize(batch)` finishes
    the transform on the collated batch. Raises ValueError/OSError for a sample that cannot be used; the loader
    counts it and substitutes it."""

    def __init__(self, transform, video_frames: int = 0, draft: bool = True, keys: MemberKeys | None = None):
        self.transform, self.video_frames = transform, video_frames
        self.keys = keys or MemberKeys.parse()
        self.min_side = decode_min_side(transform) if draft else None
        self._head, self.normalize = split_transform(transform)

    def _per_sample(self, img: Image.Image) -> torch.Tensor:
        return to_uint8(self._head(img)) if self.normalize else self.transform(img)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        caption = self.keys.caption_of(sample)
        keys, _ = self.keys.image_members(sample)
        if not keys:
            raise KeyError(self.keys.missing_image(sample))
        out = {"caption": caption, "__key__": sample["__key__"]}
        if self.video_frames == 0:
            key = keys[int(rng.integers(len(keys)))] if len(keys) > 1 else keys[0]
            out["image"] = self._per_sample(decode_image(sample[key], self.min_side))  # [3,H,W]
            return out
        picks = frame_indices(len(keys), self.video_frames, rng)
        decoded = {i: decode_image(sample[keys[i]], self.min_side) for i in sorted(set(picks))}
        # Same random crop/flip for every frame of a clip: replay the torch RNG state per frame.
        state = torch.get_rng_state()
        frames = []
        for i in picks:
            torch.set_rng_state(state)
            frames.append(self._per_sample(decoded[i]))
        out["frames"] = torch.stack(frames)  # [T,3,H,W]
        return out
