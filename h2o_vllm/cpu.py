"""What this CPU offers, as the kernel reports it (``/proc/cpuinfo``: x86 ``flags``, aarch64 ``Features``)."""

from __future__ import annotations

import contextlib


def flags_line() -> str:
    """The first flags line of ``/proc/cpuinfo`` as it stands ("" where there is none)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return line
    return ""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``avx2``, ``avx512f``, ``amx_tile``, ``asimd``, ...)."""
    return set(flags_line().split(":", 1)[-1].split())
