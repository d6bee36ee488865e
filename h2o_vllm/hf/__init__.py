"""H2O for Hugging Face transformers: an evicting ``Cache`` (reference and fast) and the seed's enable/disable API."""

from h2o_vllm.hf.api import (
    disable_eviction,
    disable_h2o_llm,
    disable_streaming_llm,
    enable_h2o_llm,
    enable_policy,
    enable_streaming_llm,
    make_cache,
    prefill,
)
from h2o_vllm.hf.base import EvictingCache
from h2o_vllm.hf.cache import H2OCache
from h2o_vllm.hf.fast_cache import FastH2OCache

__all__ = [
    "EvictingCache",
    "FastH2OCache",
    "H2OCache",
    "disable_eviction",
    "disable_h2o_llm",
    "disable_streaming_llm",
    "enable_h2o_llm",
    "enable_policy",
    "enable_streaming_llm",
    "make_cache",
    "prefill",
]
