"""Input formats by name: media suffixes of folder inputs, and the format of a table told from its file name.

Its own module so that both the readers (`sources`) and the local-access rules (`access`) use it without
importing each other.
"""
from __future__ import annotations

import fsspec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def detect_format(path: str) -> str:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        return "folder"
    if not fs.exists(root):
        raise FileNotFoundError(f"--input {path!r}: no such file or folder")
    name = root.lower().removesuffix(".gz").removesuffix(".bz2")
    for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                        (".json", "json"), (".txt", "txt")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"--input {path!r}: cannot tell the format from the name; pass --input-format")
