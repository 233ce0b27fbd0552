"""Shared pytest set-up. The markers (slow, dist, slurm, install, numeric) are declared in pyproject.toml."""
from __future__ import annotations
