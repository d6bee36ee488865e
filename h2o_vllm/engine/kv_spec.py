"""The KV cache spec of an H2O engine: full attention whose requests hold at most their budget.

vLLM sizes two things from a layer's :class:`KVCacheSpec`: the start-up check
(the pool must hold one request of ``max_model_len``, from
``max_memory_usage_bytes``) and the manager that hands out blocks. Sliding-window
layers bound the first by their window; an H2O engine whose requests are
compressed while they prefill (``h2o_prefill: chunked``) is bounded the same way,
by what a request keeps plus one prefill chunk (:meth:`Footprint.peak_blocks`).
So the worker reports this spec instead of ``FullAttentionSpec``; everything else
about it (page layout, manager, grouping) is full attention's: vLLM's spec registry
finds ``FullAttentionManager`` by walking the class's bases.

Where the server's default configuration is not bounded (prefill "whole", policy
"none"), the bound is ``max_model_len`` as in vLLM. Requests that ask for more
than the pool can ever give are refused at the door (patches/request_validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec

from h2o_vllm.engine.settings import server_defaults
from h2o_vllm.footprint import Footprint


def request_block_bound(vllm_config) -> int:
    """The most blocks one request of the server's default configuration holds at once."""
    max_len = vllm_config.model_config.max_model_len
    full = cdiv(max_len, vllm_config.cache_config.block_size)
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    peak = Footprint(server_defaults(vllm_config.additional_config)).peak_blocks(max_len, chunk)
    return full if peak is None else min(peak, full)


@dataclass(frozen=True, kw_only=True)
class BudgetedAttentionSpec(FullAttentionSpec):
    """Full attention, with a request's memory bounded by the server's default budget and chunk."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        if vllm_config.parallel_config.decode_context_parallel_size > 1:
            return super().max_memory_usage_bytes(vllm_config)
        return request_block_bound(vllm_config) * self.page_size_bytes
