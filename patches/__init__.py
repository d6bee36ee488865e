"""Version-pinned seams into vLLM internals.

Everything in h2o-vllm that depends on how vLLM is built inside (rather than on
its public extension points) lives in this folder, so that a vLLM upgrade
touches one place. Each seam checks the vLLM version it was written against and
refuses to apply to another one. The docstring of :mod:`engine_seams` lists every
vLLM internal they depend on, with its source file.
"""

from h2o_vllm.patches.versions import SUPPORTED_VLLM, VLLMVersionError, installed_vllm, require_supported_vllm

__all__ = ["SUPPORTED_VLLM", "VLLMVersionError", "installed_vllm", "require_supported_vllm"]
