"""Named TOML presets, shipped inside the package so that `--config tiny` works from any directory and from a
wheel install (`pip install .`, the Docker image), not only from a checkout.

`--config` takes a preset name (`tiny`, `demo`, `clip-vit-b32-gpu`, `flip-mae-vit-b16-4node`) or the path of a
TOML file; an existing file wins over a preset of the same name.
"""
from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """The preset names, sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def resolve(name_or_path: str | Path) -> Path:
    """The TOML file for a preset name or a path; FileNotFoundError naming both options when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    stem = text[: -len(".toml")] if text.endswith(".toml") else text
    if "/" not in stem and (PRESETS_DIR / f"{stem}.toml").is_file():
        return PRESETS_DIR / f"{stem}.toml"
    raise FileNotFoundError(f"config file not found: {name_or_path} (not a file, nor a preset name: "
                            f"{', '.join(names())})")
