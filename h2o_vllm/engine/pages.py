"""How vLLM's CPU attention lays out one KV head's key page, and how to read it back as K^T.

vLLM's CPU cache is ``[num_blocks, kv_heads, block_size, 2 * head_dim]``: each (block,
KV head) holds its key page, then its value page. How the key page is laid out
depends on the kernel (the ISA) that vLLM picked; ``patches/engine_seams.py``
writes a probe through the real kernel and finds which :class:`KeyLayout` it used.
An fp8 cache (``--kv-cache-dtype fp8``) has the same layouts with one byte per
element, stored as uint8: :func:`page_dtype` says which float8 type its bytes are
(their values are that times the layer's key scale).
"""

from __future__ import annotations

import enum

import torch


class KeyLayout(enum.IntEnum):
    """One key page's layout; the value is the fused operator's ``key_layout`` code."""

    DT = 0  # [head_dim, block_size]: K transposed (vLLM 0.32's vec and vec16 kernels, NEON fp16/fp32)
    TD = 1  # [block_size, head_dim]: K as it comes (no vLLM 0.32 CPU kernel; read if one switches to it)
    AMX = 2  # [block_size / 16, head_dim / 2, 16, 2]: pairs of dims, 16 tokens a group (vLLM's amx kernel)

    def keys_t(self, pages: torch.Tensor, num_seqs: int, block_size: int) -> torch.Tensor:
        """A view of ``pages`` ([num_seqs * n, kv_heads, block_size * head_dim], each sequence's n
        pages in order) whose contiguous copy is K^T per sequence: [num_seqs, kv_heads, head_dim, n * block_size]
        once reshaped. The view's own shape differs by layout; only its element order matters."""
        n = pages.shape[0] // num_seqs
        kv_heads, bs = pages.shape[1], block_size
        if self is KeyLayout.DT:
            return pages.view(num_seqs, n, kv_heads, -1, bs).permute(0, 2, 3, 1, 4)  # [s, kv, d, n, t]
        if self is KeyLayout.TD:
            return pages.view(num_seqs, n, kv_heads, bs, -1).permute(0, 2, 4, 1, 3)
        # [s, n, kv, group, pair, token in group, dim in pair] -> [s, kv, pair, dim in pair, n, group, token]
        return pages.view(num_seqs, n, kv_heads, bs // 16, -1, 16, 2).permute(0, 2, 4, 6, 1, 3, 5)

    def keys(self, pages: torch.Tensor, block_size: int) -> torch.Tensor:
        """[blocks, kv_heads, block_size, head_dim]: the keys of each page, in token order (a copy)."""
        blocks, kv_heads = pages.shape[0], pages.shape[1]
        k_t = self.keys_t(pages, blocks, block_size).contiguous().view(blocks, kv_heads, -1, block_size)
        return k_t.transpose(-1, -2)


FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def page_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The float8 type of an fp8 cache's bytes (vLLM allocates them as uint8); None for ``auto``.

    Raises ValueError for any other cache dtype (H2O would read its bytes as something they are not).
    """
    if kv_cache_dtype in (None, "auto"):
        return None
    if kv_cache_dtype in FP8_DTYPES:
        return FP8_DTYPES[kv_cache_dtype]
    raise ValueError(f"H2O cannot score a {kv_cache_dtype!r} KV cache (it reads auto and {', '.join(FP8_DTYPES)})")


def fp8_cache_refusal(kv_cache_dtype: str | None, cpu_flags: set[str]) -> str | None:
    """Why an H2O engine cannot run with this ``--kv-cache-dtype`` on this CPU, or None.

    vLLM 0.32's CPU attention stores fp8 caches only with its AVX-512 and AMX kernels
    (its AVX2 build has none: it raises at start-up); any other non-auto dtype is no
    CPU cache H2O reads.
    """
    try:
        fp8 = page_dtype(kv_cache_dtype)
    except ValueError as e:
        return str(e)
    if fp8 is not None and not cpu_flags & {"avx512f", "amx_tile"}:
        return (
            f"an {kv_cache_dtype} KV cache needs vLLM's AVX-512 or AMX attention kernels, and this CPU has "
            "neither (AVX2 at most): serve with the default cache (--kv-cache-dtype auto)"
        )
    return None
