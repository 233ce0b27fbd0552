"""Checkpoints on object storage (`train.remote_dir`): a copy of each complete local checkpoint, published last.

Object stores have no rename, so publishing is a last file instead: `REMOTE/checkpoints/step-N/` receives every
file of the local `step-N/`, then `COMPLETE.json`, which lists each file's size. A copy without it (an upload
cut short by a kill or a lost node) is never taken for a checkpoint: `--resume auto` and `plait export` see only
published copies, and the next upload of that step starts it again. Pruning unpublishes first (deletes
`COMPLETE.json`), so a half-deleted copy is never taken for one either. Only `step-*` folders that plait
published are ever deleted.

Any fsspec URL works (s3://, gs://, a local path for tests); credentials and endpoints come from the usual
environment (AWS_ENDPOINT_URL, ...). Uploads run on the main process, after the local checkpoint is published:
training waits for them, so a run that ends has its last checkpoint in both places.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import socket
from pathlib import Path

import fsspec

PREFIX = "step-"
MARKER = "COMPLETE.json"


def is_url(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class RemoteCheckpoints:
    """The checkpoints of one run under `url` (a run's remote_dir, or that folder's `checkpoints/`)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url)
        root = root.rstrip("/")
        self.root = root if posixpath.basename(root) == "checkpoints" else f"{root}/checkpoints"

    def _where(self, name: str) -> str:
        return f"{self.root}/{name}"

    def complete(self) -> list[str]:
        """Names of the published checkpoints (`step-00001000`), oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = sorted(posixpath.basename(p.rstrip("/")) for p in entries)
        return [n for n in names if n.startswith(PREFIX) and self.fs.exists(f"{self._where(n)}/{MARKER}")]

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1] if done else None

    def upload(self, local: Path) -> str:
        """Copies the complete local checkpoint `local` up and publishes it; returns its URL."""
        dest = self._where(local.name)
        if self.fs.exists(f"{dest}/{MARKER}"):  # the same step again (a rerun): unpublished while it is rewritten
            self.fs.rm(f"{dest}/{MARKER}")
        files = sorted(p for p in local.iterdir() if p.is_file())
        for path in files:
            self.fs.put_file(str(path), f"{dest}/{path.name}")
        listing = {"files": {p.name: p.stat().st_size for p in files}}
        self.fs.pipe_file(f"{dest}/{MARKER}", json.dumps(listing, indent=1).encode())
        return f"{self.fs.unstrip_protocol(dest)}"

    def prune(self, keep_last: int) -> None:
        """Deletes the published checkpoints beyond the newest `keep_last`."""
        for name in self.complete()[:-keep_last]:
            self.fs.rm(f"{self._where(name)}/{MARKER}")
            self.fs.rm(self._where(name), recursive=True)

    def download(self, name: str, local_root: Path) -> Path:
        """The published checkpoint `name` under `local_root/name` (fetched into a private temp dir, sizes
        checked against its listing, then renamed; a copy already there is kept)."""
        final = local_root / name
        if (final / "trainer.pt").is_file():
            return final
        src = self._where(name)
        listing = json.loads(self.fs.cat_file(f"{src}/{MARKER}"))
        files = listing.get("files") if isinstance(listing, dict) else None
        if not isinstance(files, dict) or "trainer.pt" not in files:
            raise ValueError(f"{self.fs.unstrip_protocol(src)}/{MARKER}: not a checkpoint listing")
        staging = local_root / f".tmp-fetch-{name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for file, size in files.items():
                if posixpath.basename(file) != file or file.startswith("."):
                    raise ValueError(f"{self.fs.unstrip_protocol(src)}/{MARKER}: file name {file!r} is not a plain "
                                     "name inside the checkpoint")
                self.fs.get_file(f"{src}/{file}", str(staging / file))
                if (staging / file).stat().st_size != size:
                    raise ValueError(f"{self.fs.unstrip_protocol(src)}/{file}: {(staging / file).stat().st_size} "
                                     f"bytes, its listing says {size}")
            try:
                staging.rename(final)
            except OSError:  # another process fetched it first
                if not (final / "trainer.pt").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


def fetch(url: str, local_root: Path) -> Path:
    """The checkpoint behind `url` under `local_root`: `URL/checkpoints/step-N` (or `URL/step-N`) as named, a
    run's remote_dir (or its `checkpoints/`) as its newest published checkpoint."""
    url = url.rstrip("/")
    if posixpath.basename(url).startswith(PREFIX):
        store, name = RemoteCheckpoints(posixpath.dirname(url)), posixpath.basename(url)
        if name not in store.complete():
            raise FileNotFoundError(f"{url}: no published checkpoint there (no {MARKER}; an upload cut short?)")
    else:
        store = RemoteCheckpoints(url)
        name = store.latest()
        if name is None:
            raise FileNotFoundError(f"{url}: no published checkpoint under {store.fs.unstrip_protocol(store.root)}")
    return store.download(name, local_root)
