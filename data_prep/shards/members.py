"""Which tar members form a sample, and which of a sample's members are its image and its caption.

The one statement of these rules; the tar walk (`tarwalk`), the training reader (`tarseek`), `prep verify`,
`prep index`, scoring, filtering and the loader's decoder all call it, so they cannot disagree.

Naming (webdataset's convention): a member `dir/a.b.jpg` belongs to sample key `dir/a` with extension `b.jpg`
(the key ends at the first dot of the last path component); the extension is compared lower-cased (`.JPG` is
`jpg`). A sample is the run of consecutive members sharing a key. Members named `__anything__` (webdataset's
metadata) and members without an extension belong to no sample; `__x.jpg` is an ordinary sample `__x`.

Member keys (`data.image_keys`, `data.caption_keys`, and the `--image-keys` / `--caption-keys` flags) are
webdataset / open_clip style lists separated by `;`, tried in order: `jpg;jpeg;png;webp`, `txt;caption`. A
caption key `json:FIELD` takes the string field FIELD of the sample's `.json` member. Video samples store their
frames as `f0000.jpg`, `f0001.jpg`, ... (any image key as the frame's extension).
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

from PIL import Image

IMAGE_KEYS = "jpg;jpeg;png;webp"
"""Image members read by default (plait writes jpg, png or webp; other tools also write jpeg)."""
CAPTION_KEYS = "txt"
"""Caption members read by default."""
TEXT_EXTS = ("txt", "text", "caption", "cap", "captions")
"""Extensions that hold a caption in some convention: a sample without the configured caption key but with one
of these gets a reason that names the key to set."""
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""The image formats a shard member may hold, for every reader (PIL's other plugins stay unused: EPS runs
Ghostscript, for one); a .bmp or .tiff member is reported, not read."""
IMAGE_LIKE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
"""Extensions that hold an image in some convention (named in a missing-image reason)."""
MAX_DECODE_PIXELS = 8192 * 8192
"""Images claiming more pixels are refused from their header, before any decoding (a 100-byte PNG can claim
100k x 100k pixels); PIL's own bomb check only warns below twice its 89M-pixel limit."""
_FRAME = re.compile(r"^f(\d+)\.([a-z0-9]+)$")
_EXT = re.compile(r"^[a-z0-9_\-]+(\.[a-z0-9_\-]+)*$")
_FIELD = re.compile(r"^[A-Za-z0-9_\-]+$")


def open_image(data: bytes) -> Image.Image:
    """An image member opened (lazily: pixels are decoded on first use) the one way every reader opens it:
    only IMAGE_FORMATS, at most MAX_DECODE_PIXELS by its header. ValueError/OSError for anything else."""
    img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    if img.width * img.height > MAX_DECODE_PIXELS:
        img.close()
        raise ValueError(f"image of {img.width}x{img.height} pixels is above the {MAX_DECODE_PIXELS}-pixel limit")
    return img


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a member name, or None for a member that belongs to no sample
    (no extension, an empty stem, or webdataset's `__meta__` members)."""
    head, _, base = name.rpartition("/")
    if base.startswith("__") and base.endswith("__"):
        return None
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def frame_number(ext: str) -> int | None:
    """The frame index of a video frame member (`f0003.jpg` -> 3), None for anything else."""
    m = _FRAME.match(ext)
    return int(m.group(1)) if m else None


def _parse_list(value: str, what: str, allow_json: bool) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in str(value).split(";") if k.strip())
    if not keys:
        raise ValueError(f"{what}: empty; give member extensions separated by ';' (e.g. {IMAGE_KEYS!r})")
    out = []
    for key in keys:
        if allow_json and key.startswith("json:"):
            if not _FIELD.match(key[len("json:"):]):
                raise ValueError(f"{what}: {key!r}: json:FIELD needs a field name (letters, digits, '_', '-')")
            out.append(key)
        elif _EXT.match(key.lower()):
            out.append(key.lower())
        else:
            raise ValueError(f"{what}: {key!r} is not a member extension (letters, digits, '_', '-', inner dots)")
    return tuple(out)


@dataclass(frozen=True)
class MemberKeys:
    """The member keys a stage reads; `parse` validates the user's strings once."""

    image: tuple[str, ...]
    caption: tuple[str, ...]

    @classmethod
    def parse(cls, image_keys: str = IMAGE_KEYS, caption_keys: str = CAPTION_KEYS,
              names: tuple[str, str] = ("data.image_keys", "data.caption_keys")) -> "MemberKeys":
        """ValueError naming the setting (`names`: the config keys, or the flags) for a bad list."""
        return cls(_parse_list(image_keys, names[0], False), _parse_list(caption_keys, names[1], True))

    @property
    def image_spec(self) -> str:
        return ";".join(self.image)

    @property
    def caption_spec(self) -> str:
        return ";".join(self.caption)

    def wants(self, ext: str) -> bool:
        """Whether a member of extension `ext` holds a sample's image, frame or caption (a reader that decodes
        only those skips the rest without reading them)."""
        if ext in self.image or ext in self.caption:
            return True
        if frame_number(ext) is not None:
            return ext.split(".", 1)[1] in self.image
        return ext == "json" and any(k.startswith("json:") for k in self.caption)

    def image_members(self, exts) -> tuple[list[str], bool]:
        """The sample's image member(s) and whether it is a video: frame members (`f0000.jpg`...) in time
        order, else the first image key present."""
        frames = sorted((n, e) for e in exts if (n := frame_number(e)) is not None
                        and e.split(".", 1)[1] in self.image)
        if frames:
            return [e for _, e in frames], True
        for key in self.image:
            if key in exts:
                return [key], False
        return [], False

    def caption_member(self, exts) -> tuple[str, str | None] | None:
        """(member extension, JSON field or None) of the first caption key present, None when none is."""
        for key in self.caption:
            if key.startswith("json:"):
                if "json" in exts:
                    return "json", key[len("json:"):]
            elif key in exts:
                return key, None
        return None

    def caption_of(self, sample: dict) -> str:
        """The caption of a raw sample dict (extension -> bytes); KeyError with the reason when it has none."""
        found = self.caption_member(sample)
        if found is None:
            raise KeyError(self.missing_caption(sample))
        ext, field = found
        data = sample[ext]
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
        if field is None:
            return text
        value = json.loads(text).get(field) if text.strip().startswith("{") else None
        if not isinstance(value, str):
            raise KeyError(f"no string field {field!r} in the json member (data.caption_keys={self.caption_spec!r})")
        return value

    def missing_caption(self, exts) -> str:
        """Why a sample with these member extensions has no caption, naming the key to set."""
        has = sorted(e for e in exts if not str(e).startswith("__"))
        other = [e for e in has if e in TEXT_EXTS and e not in self.caption]
        hint = (f"; it has .{other[0]}: set data.caption_keys (--caption-keys) to "
                f"'{self.caption_spec};{other[0]}'" if other else "")
        return (f"no caption member (data.caption_keys={self.caption_spec!r}; the sample has "
                f"{', '.join(has) or 'nothing'}){hint}")

    def missing_image(self, exts) -> str:
        """Why a sample with these member extensions has no image, naming the key to set."""
        has = sorted(e for e in exts if not str(e).startswith("__"))
        other = [e for e in has if e.rsplit(".", 1)[-1] in IMAGE_LIKE_EXTS]
        readable = [e for e in other if e.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp")]
        if readable and readable[0] not in self.image:
            hint = f"; it has .{readable[0]}: set data.image_keys (--image-keys) to '{self.image_spec};{readable[0]}'"
        elif other:
            hint = f"; .{other[0]} is not read (plait reads {', '.join(IMAGE_FORMATS)} images)"
        else:
            hint = ""
        return (f"no image member (data.image_keys={self.image_spec!r}, or frames f0000.<key>...; the sample has "
                f"{', '.join(has) or 'nothing'}){hint}")

    def problems(self, exts) -> list[str]:
        """Every reason a sample with these members cannot be trained on (empty: it can)."""
        out = []
        if not self.image_members(exts)[0]:
            out.append(self.missing_image(exts))
        if self.caption_member(exts) is None:
            out.append(self.missing_caption(exts))
        return out
