"""Triton kernels for paged H2O on vLLM's CUDA path, each beside its PyTorch reference.

What the CPU engine computes in :mod:`h2o_vllm.engine.scoring`, on the GPU and
without reading attention probabilities back:

- :func:`block_mass`: for the scored query rows (each request's last rows), the
  softmax attention mass each KV block receives, from ``q`` and the attention's
  log-sum-exp (FlashAttention returns it with ``return_softmax_lse=True``): a
  block's mass for one row and head is ``sum exp(scale * q . k - lse)`` over the
  block's keys the row can see. Reduced as the CPU scorer does: ``sum`` adds
  every head and row into one ``[num_reqs, max_blocks]`` float32 buffer (the
  paper), ``max`` keeps, per row, the largest head's mass in a
  ``[num_rows, max_blocks]`` buffer. Both accumulate in place (add, max), so every
  layer of a step adds to the same buffers. Reference: :func:`block_mass_reference`.
- :func:`compact_block_tables`: drop the holes (block id 0) from each row's used
  blocks and shorten its sequence length by one block per hole, into persistent
  output buffers: fixed shapes, no allocation and no host synchronisation, so it
  can be captured in a CUDA graph and replayed. Reference:
  :func:`compact_block_tables_reference` (the same as ``compaction.compact``).

The KV layout is vLLM's FlashAttention one: ``key_cache`` is
``[num_blocks, block_size, num_kv_heads, head_dim]``, any strides (vLLM 0.32 hands
the kernel ``kv_cache.transpose(1, 2).split(head_size, -1)[0]``, a strided view).
Query heads ``h`` read KV head ``h // (num_heads // num_kv_heads)`` (GQA). The
causal mask is FlashAttention's with ``seqused_k``: the query rows of a request
are its last ones, so row ``i`` of ``q_len`` sees keys ``0 .. seq_len - q_len + i``.

This module holds the Python side: the PyTorch references, the argument checks
(shapes only), the launch shapes and the launchers, which pick the constexprs
and start the ``@triton.jit`` bodies kept in :mod:`h2o_vllm.kernels.triton_jit`.
``cdiv`` and ``next_power_of_2`` are the integer helpers they share.

The module imports without Triton and without CUDA (``TRITON_AVAILABLE``, from
``triton_jit``); the references need neither. With ``TRITON_INTERPRET=1`` set
before Triton is first imported, the kernels run on CPU tensors in Triton's
interpreter (slowly).
"""

from __future__ import annotations

import torch

from h2o_vllm.kernels import triton_jit
from h2o_vllm.kernels.triton_jit import TRITON_AVAILABLE

# A tl.dot needs every dimension >= 16 on the GPU: tiles are padded up to it.
MIN_DOT_DIM = 16
# Block-table entries handled per step of the compaction kernel's loops.
COMPACT_CHUNK = 256


def cdiv(a: int, b: int) -> int:
    """``a / b`` rounded up (blocks holding ``a`` tokens, tiles holding ``a`` rows)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n``, for ``n >= 1``: Triton tile sizes are powers of two."""
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------
# Per-block attention mass of the scored rows
# ---------------------------------------------------------------------------


def _check_block_mass_args(
    q, lse, key_cache, block_table, seq_lens, query_start_loc, scored_start_loc, sum_out, max_out
):
    """Shapes, strides and dtypes only: nothing here reads a tensor (safe while a CUDA graph captures)."""
    num_tokens, num_heads, head_dim = q.shape
    if key_cache.dim() != 4 or key_cache.shape[3] != head_dim:
        raise ValueError(
            f"key_cache must be [num_blocks, block_size, num_kv_heads, {head_dim}], got {tuple(key_cache.shape)}"
        )
    if q.stride(2) != 1 or key_cache.stride(3) != 1:
        raise ValueError("q and key_cache must be contiguous along head_dim")
    num_kv_heads = key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if lse.shape != (num_heads, num_tokens):
        raise ValueError(f"lse must be [num_heads, num_tokens] = {(num_heads, num_tokens)}, got {tuple(lse.shape)}")
    num_reqs = scored_start_loc.shape[0] - 1
    if query_start_loc.shape[0] < num_reqs + 1 or seq_lens.shape[0] < num_reqs or block_table.shape[0] < num_reqs:
        raise ValueError("query_start_loc, seq_lens and block_table must cover every request of scored_start_loc")
    if sum_out is not None and (sum_out.dtype != torch.float32 or sum_out.shape[0] < num_reqs):
        raise ValueError("sum_out must be float32 [num_reqs, max_blocks]")
    if max_out is not None and max_out.dtype != torch.float32:
        raise ValueError("max_out must be float32 [num_rows, max_blocks]")


def block_mass_reference(
    q: torch.Tensor,
    lse: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scored_start_loc: torch.Tensor,
    scale: float,
    sum_out: torch.Tensor | None = None,
    max_out: torch.Tensor | None = None,
) -> None:
    """What :func:`block_mass` computes, request by request in float32 PyTorch (any device).

    ``q``: [num_tokens, num_heads, head_dim], the step's queries. ``lse``: [num_heads,
    num_tokens], natural-log log-sum-exp of ``scale * q K^T`` over the keys each row
    attended (FlashAttention's ``softmax_lse``). ``block_table``: [>= num_reqs,
    max_blocks] int32, holes already compacted away; ``seq_lens``: [>= num_reqs] the
    lengths the attention saw. ``query_start_loc``: [num_reqs + 1] cumulative query
    rows. ``scored_start_loc``: [num_reqs + 1] cumulative scored rows: request ``r``
    scores its last ``scored_start_loc[r + 1] - scored_start_loc[r]`` query rows,
    which are rows ``scored_start_loc[r] ..`` of ``max_out``. ``sum_out`` [num_reqs,
    max_blocks] gets the mass added over heads and rows; ``max_out`` [num_rows,
    max_blocks] is raised to each row's largest head mass. Columns are the
    positions in ``block_table``'s rows.
    """
    _check_block_mass_args(
        q, lse, key_cache, block_table, seq_lens, query_start_loc, scored_start_loc, sum_out, max_out
    )
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    qsl, ssl, lens = query_start_loc.tolist(), scored_start_loc.tolist(), seq_lens.tolist()
    for r in range(len(ssl) - 1):
        num_rows = ssl[r + 1] - ssl[r]
        if num_rows == 0:
            continue
        seq_len, num_blocks = lens[r], cdiv(lens[r], block_size)
        rows = torch.arange(qsl[r + 1] - num_rows, qsl[r + 1], device=q.device)
        keys = key_cache[block_table[r, :num_blocks].long()].flatten(0, 1)[:seq_len]  # [seq_len, kv_heads, d]
        keys = keys.float().repeat_interleave(group, dim=1)  # [seq_len, heads, d]
        logits = torch.einsum("nhd,khd->nhk", q[rows].float(), keys) * scale
        p = torch.exp(logits - lse[:, rows].float().T[:, :, None])  # [rows, heads, seq_len]
        positions = torch.arange(seq_len - num_rows, seq_len, device=q.device)
        hidden = torch.arange(seq_len, device=q.device)[None, :] > positions[:, None]
        p = p.masked_fill(hidden[:, None, :], 0.0)
        p = torch.nn.functional.pad(p, (0, num_blocks * block_size - seq_len))
        mass = p.unflatten(-1, (num_blocks, block_size)).sum(-1)  # [rows, heads, blocks]
        if sum_out is not None:
            sum_out[r, :num_blocks] += mass.sum(dim=(0, 1))
        if max_out is not None:
            kept = max_out[ssl[r] : ssl[r + 1], :num_blocks]
            torch.maximum(kept, mass.amax(dim=1), out=kept)


def block_mass_launch_shape(q, key_cache, scored_start_loc, max_out, rows_per_tile, num_splits):
    """Tile height and grid of :func:`block_mass`, from shapes only (fixed for a captured graph).

    A program scores ``rows_per_tile`` consecutive scored rows of one request with
    the query heads of one KV head, over every ``num_splits``-th of their blocks.
    The grid covers the most row tiles any batch of these shapes can have: every
    request's rows rounded up to whole tiles; programs past the batch's tiles return.
    """
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = key_cache.shape[2]
    group_p2 = next_power_of_2(num_heads // num_kv_heads)
    if rows_per_tile is None:
        rows_per_tile = max(1, MIN_DOT_DIM // group_p2)  # tiles of at least 16 (row, head) pairs
    if rows_per_tile < 1 or rows_per_tile & (rows_per_tile - 1):
        raise ValueError(f"rows_per_tile must be a power of two, got {rows_per_tile}")
    max_rows = num_tokens if max_out is None else min(num_tokens, max_out.shape[0])
    num_reqs = scored_start_loc.shape[0] - 1
    return rows_per_tile, (cdiv(max_rows, rows_per_tile) + num_reqs, num_kv_heads, num_splits)


def _dot_in_fp32(key_cache: torch.Tensor) -> bool:
    """Whether q . k is taken in float32: for float32 caches (no TF32 rounding), and for
    bfloat16 on CPU, where Triton 3.9's interpreter multiplies bfloat16 tiles wrongly."""
    return key_cache.dtype == torch.float32 or (not key_cache.is_cuda and key_cache.dtype == torch.bfloat16)


def block_mass(
    q: torch.Tensor,
    lse: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scored_start_loc: torch.Tensor,
    scale: float,
    sum_out: torch.Tensor | None = None,
    max_out: torch.Tensor | None = None,
    *,
    rows_per_tile: int | None = None,
    num_splits: int = 8,
) -> None:
    """Add one layer's per-block attention mass of the scored rows into ``sum_out`` / ``max_out``.

    Arguments as :func:`block_mass_reference`; all on one device. ``lse`` may have any
    strides (FlashAttention's is [num_heads, num_tokens]). ``rows_per_tile`` and
    ``num_splits`` shape the launch (:func:`block_mass_launch_shape`). Allocates
    nothing and reads nothing back to the host: capturable in a CUDA graph, given
    fixed shapes. Accumulation uses float atomics, so sums may differ from run to
    run in the last bits.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("block_mass needs Triton; block_mass_reference does the same in PyTorch")
    _check_block_mass_args(
        q, lse, key_cache, block_table, seq_lens, query_start_loc, scored_start_loc, sum_out, max_out
    )
    if sum_out is None and max_out is None:
        return
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    rows, grid = block_mass_launch_shape(q, key_cache, scored_start_loc, max_out, rows_per_tile, num_splits)
    group_p2 = next_power_of_2(group)
    if q.is_cuda and rows * group_p2 < MIN_DOT_DIM:
        raise ValueError(f"rows_per_tile * {group_p2} query heads must be >= {MIN_DOT_DIM} on the GPU (tl.dot)")
    some_out = sum_out if sum_out is not None else max_out  # stands in for the one not asked (never written)
    sums = sum_out if sum_out is not None else some_out
    maxes = max_out if max_out is not None else some_out
    triton_jit.block_mass_kernel[grid](
        q,
        q.stride(0),
        q.stride(1),
        lse,
        lse.stride(0),
        lse.stride(1),
        key_cache,
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_table,
        block_table.stride(0),
        seq_lens,
        query_start_loc,
        scored_start_loc,
        sums,
        sums.stride(0),
        maxes,
        maxes.stride(0),
        scored_start_loc.shape[0] - 1,
        float(scale),
        GROUP=group,
        GROUP_P2=group_p2,
        ROWS=rows,
        BLOCK_SIZE=block_size,
        BLOCK_P2=max(MIN_DOT_DIM, next_power_of_2(block_size)),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=max(MIN_DOT_DIM, next_power_of_2(head_dim)),
        REQS_P2=next_power_of_2(max(1, scored_start_loc.shape[0] - 1)),
        DO_SUM=sum_out is not None,
        DO_MAX=max_out is not None,
        DOT_FP32=_dot_in_fp32(key_cache),
    )


# ---------------------------------------------------------------------------
# Block-table compaction
# ---------------------------------------------------------------------------


def _check_compact_args(block_table, seq_lens, out_block_table, out_seq_lens, out_kept):
    """Shapes only, as for :func:`block_mass`."""
    num_rows, width = block_table.shape
    if seq_lens.shape[0] < num_rows:
        raise ValueError("seq_lens must cover every row of block_table")
    if out_block_table.shape[0] < num_rows or out_block_table.shape[1] < width or out_seq_lens.shape[0] < num_rows:
        raise ValueError("the output buffers must be at least as large as block_table and seq_lens")
    if out_kept is not None and (out_kept.shape[0] < num_rows or out_kept.shape[1] < width):
        raise ValueError("out_kept must be at least as large as block_table")


def compact_block_tables_reference(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    out_block_table: torch.Tensor,
    out_seq_lens: torch.Tensor,
    out_kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`compact_block_tables` writes, row by row in PyTorch (any device).

    For each of ``block_table``'s rows: the nonzero ids among its first
    ``cdiv(seq_len, block_size)`` entries, in order, then zeros up to
    ``block_table``'s width; the length shortened by ``block_size`` per hole (holes
    are whole blocks: the policy never evicts the partly written last one).
    ``out_kept``, if given, gets each kept entry's index in the original row, then
    -1. Rows and columns of the outputs beyond ``block_table``'s are left alone.
    Returns the views of the outputs that were written.
    """
    _check_compact_args(block_table, seq_lens, out_block_table, out_seq_lens, out_kept)
    num_rows, width = block_table.shape
    for row, seq_len in enumerate(seq_lens[:num_rows].tolist()):
        num_blocks = cdiv(seq_len, block_size)
        ids = block_table[row, :num_blocks]
        keep = torch.nonzero(ids != 0).flatten()
        out_block_table[row, :width] = 0
        out_block_table[row, : len(keep)] = ids[keep]
        out_seq_lens[row] = seq_len - (num_blocks - len(keep)) * block_size
        if out_kept is not None:
            out_kept[row, :width] = -1
            out_kept[row, : len(keep)] = keep
    return out_block_table[:num_rows, :width], out_seq_lens[:num_rows]


def compact_block_tables(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    out_block_table: torch.Tensor,
    out_seq_lens: torch.Tensor,
    out_kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the holes of every row of ``block_table`` into persistent buffers (see the reference).

    ``block_table``: [num_rows, width] int32 (vLLM's gathered input table, padded
    rows included), ``seq_lens``: [>= num_rows] int32, with ``cdiv(seq_len, block_size) <=
    width`` in every row (as in vLLM). One program per row; it
    allocates nothing and reads nothing back to the host, so a CUDA graph can
    capture it and replay it with the same buffers. ``out_block_table`` must not
    alias ``block_table``. Returns the written views of ``out_block_table`` and
    ``out_seq_lens``.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("compact_block_tables needs Triton; compact_block_tables_reference does the same")
    _check_compact_args(block_table, seq_lens, out_block_table, out_seq_lens, out_kept)
    num_rows, width = block_table.shape
    if num_rows:
        kept = out_kept if out_kept is not None else out_block_table  # stands in when not asked (never written)
        triton_jit.compact_kernel[(num_rows,)](
            block_table,
            block_table.stride(0),
            seq_lens,
            out_block_table,
            out_block_table.stride(0),
            out_seq_lens,
            kept,
            kept.stride(0),
            width,
            BLOCK_SIZE=block_size,
            CHUNK=COMPACT_CHUNK,
            WRITE_KEPT=out_kept is not None,
        )
    return out_block_table[:num_rows, :width], out_seq_lens[:num_rows]
