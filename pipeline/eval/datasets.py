"""Evaluation datasets: plait shards, img2dataset shards, and clip_benchmark's local `wds` layout, read in order.

clip_benchmark's layout (`clip_benchmark_export_wds`):
  ROOT/test/{0..N-1}.tar (+ nshards.txt)   samples with webp/png/jpg and `cls` (classification) or `txt`
                                           (retrieval: several captions, one per line)
  ROOT/classnames.txt                      one class name per line, in label order
  ROOT/zeroshot_classification_templates.txt   one template per line, `{c}` marks the class name
  ROOT/dataset_type.txt                    `retrieval` for retrieval sets (classification otherwise)
plait's and img2dataset's shard folders hold `*.tar` directly (jpg + txt, plus `cls` for labelled sets).

Evaluation shards are often downloaded: they are read through fsspec (never webdataset's gopen, which runs the
shell command of a `pipe:` URL unless `allow_pipe`, the user's `--allow-pipe`) and only the image and the target
member of each sample are decoded (transforms.decode_fields), never a pickle.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds

from pipeline.config import check_template
from pipeline.train.distributed import World
from pipeline.data.shardspec import expand
from data_prep.shards.tarseek import PipeRefused, read_shard
from data_prep.shards.layout import CLASSNAMES_FILE, parse_classnames
from data_prep.shards.members import CAPTION_KEYS, MemberKeys
from pipeline.data.transforms import decode_member

# The training default plus clip_benchmark's `wds` layout (`0.webp`): evaluation sets come from either.
IMAGE_KEYS = "jpg;jpeg;png;webp;0.webp"
EVAL_KEYS = MemberKeys.parse(IMAGE_KEYS, CAPTION_KEYS, ("--image-keys", "--caption-keys"))


@dataclass(frozen=True)
class EvalSet:
    """Shards of one evaluation split, with what the folder says about its task."""
    urls: tuple[str, ...]
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    kind: str = ""
    """`classification`, `retrieval`, or '' when the folder does not say."""


# Zero-shot suites by name, read from the installed open_clip (open_clip.zero_shot_metadata): nothing is
# downloaded. A file of that name wins over the suite.
CLASSNAME_SUITES = {"imagenet": "IMAGENET_CLASSNAMES"}
TEMPLATE_SUITES = {"openai": "OPENAI_IMAGENET_TEMPLATES", "simple": "SIMPLE_IMAGENET_TEMPLATES"}


def suite(name: str, table: dict[str, str]) -> tuple[str, ...] | None:
    """The names or templates open_clip ships under suite `name`, or None when `name` is no suite (or a file)."""
    if name not in table or Path(name).exists():
        return None
    from open_clip import zero_shot_metadata
    return tuple(getattr(zero_shot_metadata, table[name]))


def suite_label(name: str, table: dict[str, str]) -> str | None:
    """`imagenet (open_clip 3.2.0 zero_shot_metadata.IMAGENET_CLASSNAMES)` for a suite, for the report."""
    if suite(name, table) is None:
        return None
    import open_clip
    return f"{name} (open_clip {open_clip.__version__} zero_shot_metadata.{table[name]})"


def read_classnames(path: str | Path) -> tuple[str, ...]:
    """A classnames file (classnames.txt, --classnames) as prep writes it: split at newlines only
    (layout.parse_classnames), so a name with another line separator cannot shift the labels; or a suite
    open_clip ships (`imagenet`)."""
    if (names := suite(str(path), CLASSNAME_SUITES)) is not None:
        return names
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return tuple(parse_classnames(path.read_bytes().decode("utf-8")))
    except UnicodeDecodeError as exn:
        raise ValueError(f"{path}: not UTF-8 text ({exn.reason} at byte {exn.start})") from None


def read_lines(path: str | Path) -> tuple[str, ...]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def normalise_template(template: str, source: str = "templates") -> str:
    """clip_benchmark writes `{c}` for the class name; plait and open_clip use `{}`. Checked here, before any
    model loads: exactly one placeholder, nothing else that str.format would trip on (`{0} {1}`, `{name}`)."""
    return check_template(template.replace("{c}", "{}"), source)


def read_templates(path: str | Path) -> tuple[str, ...]:
    """The templates of a file, one per line (`{}` or `{c}` marks the class name), or a suite open_clip ships
    (`openai`: its 80 ImageNet prompts, `simple`); errors name the file."""
    if (templates := suite(str(path), TEMPLATE_SUITES)) is not None:  # open_clip's are `lambda c: f"...{c}."`
        return tuple(normalise_template(t("{}"), str(path)) for t in templates)
    return tuple(normalise_template(t, str(path)) for t in read_lines(path))


def _numbered(paths: list[Path]) -> list[Path]:
    """clip_benchmark names shards 0.tar, 1.tar, ..., 10.tar: sort by number, not by text."""
    return sorted(paths, key=lambda p: (int(m.group()) if (m := re.search(r"\d+", p.stem)) else -1, p.name))


def resolve(data: str, split: str = "test", allow_pipe: bool = False, flag: str = "") -> EvalSet:
    """An EvalSet from a clip_benchmark root, a folder of shards, or a shard spec (`a/{0..9}.tar::b/x.tar`);
    a `pipe:` spec (a shell command) only with `allow_pipe` (`flag` names the user's switch in the error)."""
    root = Path(data)
    if root.is_dir():
        folder = root / split if (root / split).is_dir() else root
        urls = [str(p) for p in _numbered(list(folder.glob("*.tar")))]
        if not urls:
            raise FileNotFoundError(f"no .tar shards in {folder} (expected {root}/{split}/*.tar or {root}/*.tar)")
        return _described(tuple(urls), root if (root / split).is_dir() else folder)
    if not data.strip():
        raise ValueError("evaluation data is empty: give a shard spec or a folder")
    urls = tuple(u for part in data.split("::") if part.strip()
                 for u in expand(part.strip(), allow_pipe=allow_pipe, flag=flag))
    folders = {str(Path(u).parent) for u in urls}
    # A spec inside one local folder reads that folder's classnames.txt etc. like a folder would.
    if len(folders) == 1 and all("://" not in u for u in urls):
        return _described(urls, Path(folders.pop()))
    return EvalSet(urls)


def _described(urls: tuple[str, ...], meta: Path) -> EvalSet:
    """The shards with what `meta` (a folder) says about them: class names, templates, dataset type."""
    names = read_classnames(meta / CLASSNAMES_FILE) if (meta / CLASSNAMES_FILE).is_file() else ()
    tpl_file = meta / "zeroshot_classification_templates.txt"
    templates = read_templates(tpl_file) if tpl_file.is_file() else ()
    kind_file = meta / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else ("classification" if names else "")
    return EvalSet(urls, names, templates, kind)


def rank_share(urls: tuple[str, ...] | list[str], world: World) -> list[str]:
    """This rank's shards: every world_size-th, starting at its rank (a pure function; shards, not samples, so
    each sample is scored exactly once)."""
    return list(urls)[world.rank::world.world_size]


def _captions(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def raw_samples(shards: Iterator[dict], allow_pipe: bool = False,
                handler: Callable = wds.warn_and_continue) -> Iterator[dict]:
    """A webdataset stage: the raw (undecoded) samples of each shard `{"url": ...}` in order, opened through
    fsspec (tarseek.read_shard); a corrupt or unreadable shard goes to `handler` (True: go on with the next)."""
    for shard in shards:
        try:
            yield from read_shard(shard["url"], allow_pipe=allow_pipe)
        except PipeRefused:
            raise
        except Exception as exn:  # a truncated tar, a network error, a pipe: refused
            if not handler(RuntimeError(f"{shard['url']}: {type(exn).__name__}: {exn}")):
                return


def _decoded(sample: dict, field: str, keys: MemberKeys) -> tuple:
    """(image, target) of a raw sample: the first image key present, and its `cls` label or its caption by
    `keys` (the format's rule). KeyError with the reason (and the key to set) when a member is missing."""
    image = keys.image_members(sample)[0]
    if not image:
        raise KeyError(f"{sample.get('__url__', '')}:{sample.get('__key__', '')}: {keys.missing_image(sample)}")
    if field == "cls":
        if "cls" not in sample:
            raise KeyError(f"{sample.get('__url__', '')}:{sample.get('__key__', '')}: no cls member")
        target = decode_member("cls", sample["cls"])
    else:
        target = keys.caption_of(sample)
    return decode_member(image[0], sample[image[0]]), target


def batches(urls: list[str], transform: Callable, field: str, batch_size: int, max_samples: int = 0,
            num_workers: int = 0, shuffle: int = 0, allow_pipe: bool = False,
            keys: MemberKeys = EVAL_KEYS) -> Iterator[tuple[torch.Tensor, list]]:
    """(images [B, 3, H, W], targets) in shard order (`shuffle` > 0: shards and samples shuffled with a buffer
    of that many samples, for fine-tuning): targets are int labels (`field="cls"`) or caption lists (one
    caption per line of the member `keys` picks). Only the image and the target member of a sample are
    decoded (transforms.decode_member)."""
    if not urls:
        return
    target = int if field == "cls" else _captions
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.shuffle(len(urls)) if shuffle else wds.filters.identity,
        wds.split_by_worker,
        wds.pipelinefilter(raw_samples)(allow_pipe=allow_pipe),
        wds.shuffle(shuffle) if shuffle else wds.filters.identity,
        wds.map(functools.partial(_decoded, field=field, keys=keys), handler=wds.warn_and_continue),
        wds.map_tuple(transform, target),
        wds.batched(batch_size, partial=True, collation_fn=_collate),
    )
    seen = 0
    for images, targets in wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers):
        if max_samples and seen >= max_samples:
            break
        if max_samples and seen + len(targets) > max_samples:
            keep = max_samples - seen
            images, targets = images[:keep], targets[:keep]
        seen += len(targets)
        yield images, targets


def _collate(samples: list[tuple]) -> tuple[torch.Tensor, list]:
    images, targets = zip(*samples)
    return torch.stack(images), list(targets)
