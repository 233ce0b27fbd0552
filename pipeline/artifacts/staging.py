"""What every export format shares: the staging directory and its safe publication, the dtype cast, the fixed
self-check batch and the reference model every reloaded export must reproduce, and the model card.

A format module (export.py's open_clip and safetensors writers, export_hf.py) writes its files into the
directory `staged(out)` yields, checks them with the helpers here, and `staged` publishes the directory in one
rename, only into a new or empty directory or over an earlier plait export (recognised by `MARKER_FILE`):
`--out` pointing at a run directory, a home directory or anything else with files in it is refused.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
import torch

from pipeline.train.checkpoint import follow_umask
from pipeline.train.remote_store import is_url
from pipeline.artifacts.model_card import METADATA_FILE, write_card
from pipeline.models.towers import build_clip, tokenizer_for
from pipeline.data.transforms import preprocess_cfg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Written into every export: the only directories an export may replace are those holding it (or an earlier
# export's model card, from before the marker existed).
MARKER_FILE = ".plait-export"
EXPORT_MARKERS = (MARKER_FILE, METADATA_FILE)
UPLOADING_FILE = ".plait-export-uploading"  # on object storage, while an export is being uploaded


# ------------------------------------------------------------------------------------------------ publication
def check_destination(out: str | Path) -> None:
    """Raises ValueError unless `out` is missing, an empty directory, or an earlier plait export (also on
    object storage, where an upload cut short is recognised by its own marker)."""
    if is_url(out):
        fs, root = fsspec.core.url_to_fs(str(out))
        entries = fs.ls(root, detail=False) if fs.isdir(root) else []
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in entries}
        if entries and not names & {*EXPORT_MARKERS, UPLOADING_FILE}:
            raise ValueError(f"--out {out}: holds {len(entries)} entries and is not a plait export (no "
                             f"{MARKER_FILE} marker); choose a new or empty folder")
        return
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory; choose a new or empty directory")
    entries = list(out.iterdir())
    if entries and not any((out / marker).is_file() for marker in EXPORT_MARKERS):
        raise ValueError(f"--out {out}: the directory holds {len(entries)} entries and is not a plait export "
                         "(no .plait-export marker); an export replaces its output directory, so choose a new "
                         "or empty directory")


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """Yields a fresh staging directory beside `out`; publishes it as `out` when the block succeeds, removes it
    when the block raises. `out` is checked before any work is done and again just before the rename. An
    object-storage `out` is staged in a local temp dir and uploaded (`upload`)."""
    if is_url(out):
        check_destination(out)
        with tempfile.TemporaryDirectory(prefix="plait-export-") as tmp:
            yield Path(tmp)
            (Path(tmp) / MARKER_FILE).write_text(json.dumps({"written_by": "plait export"}) + "\n")
            upload(Path(tmp), str(out))
        return
    out = Path(out)
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER_FILE).write_text(json.dumps({"written_by": "plait export"}) + "\n")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def upload(tmp: Path, out: str) -> None:
    """Copies the finished export `tmp` to object storage: `UPLOADING_FILE` first (a rerun then recognises a
    folder it left half-written), the files, the files of an earlier export there that this one lacks removed,
    the marker last. Until the marker is there, loaders refuse the folder as unfinished."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    check_destination(out)
    for old_marker in EXPORT_MARKERS:
        if fs.exists(f"{root}/{old_marker}"):
            fs.rm(f"{root}/{old_marker}")
    fs.pipe_file(f"{root}/{UPLOADING_FILE}", b"plait export upload in progress\n")
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MARKER_FILE)
    for path in files:
        fs.put_file(str(path), f"{root}/{path.relative_to(tmp).as_posix()}")
    keep = {p.relative_to(tmp).as_posix() for p in files} | {MARKER_FILE, UPLOADING_FILE}
    for path in fs.find(root):
        if path[len(root) + 1:] not in keep:  # an earlier plait export's file (the folder held its marker)
            fs.rm(path)
    fs.put_file(str(tmp / MARKER_FILE), f"{root}/{MARKER_FILE}")
    fs.rm(f"{root}/{UPLOADING_FILE}")


def publish(tmp: Path, out: Path) -> Path:
    """Renames `tmp` to `out`. A previous export at `out` is first moved aside and removed only after the
    rename, so a crash leaves either the old or the new export in place."""
    check_destination(out)
    for path in [tmp, *tmp.rglob("*")]:
        follow_umask(path)  # safetensors and mkdtemp create owner-only files
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / "export")
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------ weights
def with_logit_bias(state: dict[str, torch.Tensor], model_cfg: dict) -> dict:
    """open_clip only builds a `logit_bias` parameter when the config has `init_logit_bias` (sigmoid-loss
    models); carry it so that strict loading works."""
    model_cfg = json.loads(json.dumps(model_cfg))
    if "logit_bias" in state:
        model_cfg["init_logit_bias"] = float(state["logit_bias"].float().reshape(-1)[0])
    return model_cfg


def cast_state(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ self-check
def fixed_batch(model_cfg: dict, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (images [n, 3, H, W], tokens [n, L]) batch for self-checks."""
    g = torch.Generator().manual_seed(seed)
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = tokenizer_for(model_cfg)(["a photo of a cat", "a drawing of a dog", "a sneaker", "an ankle boot"][:n])
    return images, tokens


@torch.no_grad()
def embeddings(clip, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    clip.eval()
    return clip.encode_image(images, normalize=True), clip.encode_text(tokens, normalize=True)


def reference_model(cast: dict[str, torch.Tensor], model_cfg: dict) -> torch.nn.Module:
    """The training architecture holding exactly the exported (cast) values, in fp32: what every reloaded
    export must reproduce. The cast's own rounding is reported separately as `dtype_error`."""
    model = build_clip(model_cfg).float()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in cast.items()}, strict=True)
    return model.eval()


def max_error(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def require_close(error: float, atol: float, what: str) -> None:
    """The self-check verdict: a reloaded export that does not reproduce the training model is not kept."""
    if error > atol:
        raise RuntimeError(f"export self-check failed: {what} differ by {error:.2e} (> {atol:.0e})")


# ------------------------------------------------------------------------------------------------ model card
def write_model_card(folder: Path, fmt: str, name: str, dtype: str, model_cfg: dict, meta: dict | None,
                     check: dict, state: dict, cast: dict) -> None:
    """README.md + plait_metadata.json for an export in `folder` (pipeline/artifacts/model_card.py, which also writes the
    loading code), with the self-check and how far the dtype cast moved the embeddings from the fp32 weights
    (absent for fp32 exports)."""
    meta = dict(meta or {})
    check = dict(check)
    if dtype != "fp32":
        images, tokens = fixed_batch(model_cfg)
        check["dtype_error"] = max_error(embeddings(reference_model(state, model_cfg), images, tokens),
                                         embeddings(reference_model(cast, model_cfg), images, tokens))
    ctx = model_cfg["text_cfg"].get("context_length", 77)
    meta.update({"name": name, "format": fmt, "dtype": dtype, "model_cfg": model_cfg,
                 "preprocess_cfg": preprocess_cfg(model_cfg), "self_check": check,
                 "tokenizer": {"type": "open_clip SimpleTokenizer (CLIP BPE, bundled vocabulary)",
                               "context_length": ctx, "pad_id": 0, "sot_id": 49406, "eot_id": 49407}})
    write_card(folder, meta)
