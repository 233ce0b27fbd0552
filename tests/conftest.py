"""Shared pytest set-up: the `numeric` marker that `make test` reruns under other CPU kernels."""
from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "numeric: float comparisons between code paths; `make test` reruns them with "
                   "ATEN_CPU_CAPABILITY=default (and avx2 where the CPU has it) to catch kernel-dependent rounding")
