"""Input tables of local photos for `plait prep`, and a digest of the dataset folder it writes."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path


def photo_table(tmp_path: Path, paths: list[str], name: str = "in.csv") -> Path:
    table = tmp_path / name
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", "source"])
        for i, p in enumerate(paths):
            w.writerow([f"file://{p}", f"photo {i} of {Path(p).stem}", "opencv-doc"])
    return table


def dataset_digest(out: Path) -> dict[str, str]:
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".json", ".parquet") and p.is_file())
    names = [n for n in names if n != "_plan.json"]
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}
