"""Every place where h2o-vllm's engine reaches into vLLM 0.32 internals.

Read from the vLLM 0.32.0 source (see docs/paged-h2o-plan.md for line
references). An upgrade re-checks this file and nothing else: the scheduler,
worker and attention code call only these functions.
"""

from __future__ import annotations

import functools
from typing import Any

from h2o_vllm.patches.versions import require_supported_vllm

require_supported_vllm()


# -- scheduler side -----------------------------------------------------------------

def _full_attention_manager(scheduler) -> Any:
    # One KV cache group (checked at start-up), managed by a FullAttentionManager.
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def check_single_full_attention_group(kv_cache_config) -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        specs = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"H2O supports models with one full-attention KV cache group only, got {specs}")


def request_blocks(scheduler, req_id: str) -> list:
    """The request's block list (logical block i -> KVCacheBlock); holes are the null block."""
    return _full_attention_manager(scheduler).req_to_blocks.get(req_id, [])


def count_holes(blocks: list) -> int:
    return sum(1 for b in blocks if b.is_null)


def free_as_holes(scheduler, req_id: str, logical_blocks: list[int]) -> None:
    """Give the request's blocks at ``logical_blocks`` back to the pool, leaving holes.

    The same mechanism vLLM uses for sliding windows: the entry becomes the pool's
    null block (id 0), so the list keeps its length and nothing is re-allocated.
    """
    manager = _full_attention_manager(scheduler)
    blocks = manager.req_to_blocks[req_id]
    freed = []
    for i in logical_blocks:
        block = blocks[i]
        if block.is_null or block.ref_cnt != 1:
            raise RuntimeError(f"block {i} of request {req_id} cannot be evicted (null={block.is_null}, ref_cnt={block.ref_cnt})")
        blocks[i] = manager._null_block
        freed.append(block)
    manager.block_pool.free_blocks(freed)


def num_free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def num_total_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1  # minus the null block


# -- worker side -------------------------------------------------------------------

NULL_BLOCK_ID = 0  # BlockPool hands the first block out as the null block, never to a request


def punch_worker_holes(runner, req_id: str, logical_blocks: list[int]) -> None:
    """Mirror the scheduler's holes in the worker: the request's block ids and its batch row.

    Both are needed: a request that leaves the batch gets its row rebuilt from
    ``req_state.block_ids`` when it comes back.
    """
    state = runner.requests.get(req_id)
    if state is None:
        return  # finished in between
    ids = state.block_ids[0]
    row = runner.input_batch.req_id_to_index.get(req_id)
    table = runner.input_batch.block_table[0].block_table.np
    for i in logical_blocks:
        ids[i] = NULL_BLOCK_ID
        if row is not None:
            table[row, i] = NULL_BLOCK_ID


def batch_req_ids(runner, num_reqs: int | None = None) -> list[str]:
    ids = runner.input_batch.req_ids
    return list(ids if num_reqs is None else ids[:num_reqs])


def key_pages(kv_cache):
    """The key half of one layer's CPU KV cache: [num_blocks, kv_heads, block_size * head_dim] raw pages.

    vLLM's CPU cache is [num_blocks, kv_heads, block_size, 2 * head_dim], each
    (block, head) holding its K page then its V page; how a K page is laid out is
    what ``detect_key_layout`` finds out.
    """
    num_blocks, kv_heads, block_size, two_head_dim = kv_cache.shape
    return kv_cache.view(num_blocks, kv_heads, 2, block_size * two_head_dim // 2)[:, :, 0]


@functools.lru_cache(maxsize=None)
def detect_key_layout(isa: str, dtype, head_dim: int, block_size: int = 32) -> str:
    """How ``cpu_attn_reshape_and_cache`` lays one key page out for ``isa``: 'dt' or 'td'.

    'dt': the page holds K transposed, [head_dim, block_size] (the x86 'vec' kernels);
    'td': [block_size, head_dim]. Written by the real kernel and read back, so a kernel
    that changes its layout stops the engine instead of producing wrong scores.
    """
    import torch
    from vllm import _custom_ops as ops

    kv_heads, n = 2, block_size
    cache = torch.zeros(2, kv_heads, block_size, 2 * head_dim, dtype=dtype)
    view = cache.view(2, kv_heads, 2 * block_size, head_dim)
    key_cache, value_cache = view.chunk(2, dim=2)
    key = (torch.arange(n * kv_heads * head_dim) % 251).reshape(n, kv_heads, head_dim).to(dtype)
    ops.cpu_attn_reshape_and_cache(key, -key, key_cache, value_cache, torch.arange(block_size, 2 * block_size), isa)
    page = key_pages(cache)[1]  # [kv_heads, block_size * head_dim] raw memory
    expected = key.transpose(0, 1)  # [kv_heads, tokens, head_dim]
    if torch.equal(page.reshape(kv_heads, head_dim, block_size).transpose(1, 2), expected):
        return "dt"
    if torch.equal(page.reshape(kv_heads, block_size, head_dim), expected):
        return "td"
    raise RuntimeError(f"H2O cannot read CPU attention key pages for isa={isa!r} dtype={dtype}; unsupported kernel layout")
