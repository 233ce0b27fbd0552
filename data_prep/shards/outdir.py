"""A dataset folder on any fsspec filesystem, written atomically: every file goes to `NAME.tmp` first and is
renamed when complete (object stores: uploaded whole, which is atomic there), so a reader never sees a partial
file, also after `kill -9`."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, BinaryIO, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


class OutputDir:
    """A folder on any fsspec filesystem with atomic writes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_json_object(self, name: str, where: str | None = None) -> dict:
        """A JSON file that must hold an object; ValueError beginning with `where` (default: its path) when it
        is not valid JSON or not an object."""
        where = where or self.path(name)
        try:
            value = self.read_json(name)
        except ValueError as exn:  # json.JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{where}: not valid JSON ({exn})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: not a JSON object")
        return value

    def entries(self) -> list[str]:
        """The names in the folder (files and folders)."""
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def claim(self, flag: str, marker: str, is_ours: Callable[[Any], bool], command: str) -> None:
        """Refuses to write into a folder this command did not write: it must be empty, or hold `marker`, a JSON
        file that `is_ours` accepts (an earlier run of `command`, which then continues). ValueError naming the
        flag and the folder; nothing is written either way."""
        entries = self.entries()
        if not entries:
            return
        try:
            ours = self.exists(marker) and is_ours(self.read_json(marker))
        except (ValueError, OSError):
            ours = False
        if not ours:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(f"{flag} {self.url!r}: the folder holds {len(entries)} entries ({shown}) and is not an "
                             f"earlier output of `{command}`; choose a new or empty folder")

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(self.path(pattern)))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name))

    @contextlib.contextmanager
    def open_atomic(self, name: str) -> Iterator[BinaryIO]:
        final = self.path(name)
        if "/" in name:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = final + ".tmp"
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            # object stores have no rename; a single upload of a complete local file is atomic there
            with tempfile.NamedTemporaryFile(suffix=".plait") as f:
                yield f
                f.flush()
                self.fs.put_file(f.name, final)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_atomic(name) as f:
            f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n")
