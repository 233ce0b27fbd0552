"""Print the ATEN_CPU_CAPABILITY values, other than this machine's own, that the numeric tests rerun under.

The same fp32 computation rounds differently through torch's AVX-512, AVX2 and default kernels, so a tolerance that
only ever met one of them can fail on another machine. `make test` reruns the tests marked `numeric` once per value
printed here: `default` always, `avx2` where the CPU has it and torch does not already use it.
"""
from __future__ import annotations

import torch


def rerun_capabilities(native: str, cpu_flags: set[str]) -> list[str]:
    """The capabilities to force besides `native` (torch's own name for it, e.g. "AVX512", "AVX2", "DEFAULT")."""
    available = ["default"] + (["avx2"] if "avx2" in cpu_flags else [])
    return [cap for cap in available if cap.upper() != native.upper()]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:  # not Linux: torch's own capability is all we know
        return set()


if __name__ == "__main__":
    # ATEN_CPU_CAPABILITY itself changes what torch reports: the Makefile runs this without it
    print(" ".join(rerun_capabilities(torch.backends.cpu.get_cpu_capability(), cpu_flags())))
