"""The ``@triton.jit`` bodies of :mod:`h2o_vllm.kernels.triton_scoring`'s kernels, and the Triton import guard.

- :func:`block_mass_kernel`: grid (row tiles, KV heads, splits); each program
  takes a tile of scored rows times one KV head's query heads against every
  split-th block of the request, and adds (``atomic_add``) or raises
  (``atomic_max``) the per-block attention mass. :func:`_find_tile` maps a
  program to its request and first row.
- :func:`compact_kernel`: one program per block-table row; packs the nonzero ids
  to the front, zeros after, and writes the shortened length.

Nothing here checks arguments, sizes a grid or picks the constexprs: call the
launchers in :mod:`h2o_vllm.kernels.triton_scoring` (``block_mass``,
``compact_block_tables``), whose docstring also describes the KV layout and the
causal mask these bodies assume.

The module imports without Triton: ``TRITON_AVAILABLE`` is then False and the
kernels are not defined. With ``TRITON_INTERPRET=1`` set before Triton is first
imported, the kernels run on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # CPU-only installs: the PyTorch references still work
    triton = None
    tl = None
    TRITON_AVAILABLE = False


if TRITON_AVAILABLE:

    @triton.jit
    def _find_tile(scored_start_loc, num_reqs, tile, ROWS: tl.constexpr, REQS_P2: tl.constexpr):
        """The request of row tile ``tile`` and the tile's first scored row within it (``num_reqs`` if none)."""
        req = tl.arange(0, REQS_P2)
        lo = tl.load(scored_start_loc + req, mask=req < num_reqs, other=0)
        hi = tl.load(scored_start_loc + req + 1, mask=req < num_reqs, other=0)
        tiles = (hi - lo + ROWS - 1) // ROWS
        ends = tl.cumsum(tiles, 0)  # past each request's last tile
        r = tl.sum((ends <= tile).to(tl.int32), 0)
        first_tile = tl.sum(tl.where(req == r, ends - tiles, 0), 0)
        return r, (tile - first_tile) * ROWS

    @triton.jit
    def block_mass_kernel(
        q_ptr,
        stride_qt,
        stride_qh,
        lse_ptr,
        stride_lh,
        stride_lt,
        k_ptr,
        stride_kb,
        stride_ks,
        stride_kh,
        block_table_ptr,
        stride_bt,
        seq_lens_ptr,
        query_start_loc_ptr,
        scored_start_loc_ptr,
        sum_ptr,
        stride_sum,
        max_ptr,
        stride_max,
        num_reqs,
        scale,
        GROUP: tl.constexpr,
        GROUP_P2: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_P2: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_P2: tl.constexpr,
        REQS_P2: tl.constexpr,
        DO_SUM: tl.constexpr,
        DO_MAX: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """Grid (row tiles, KV heads, splits): ROWS scored rows x GROUP query heads against every split-th block."""
        r, first_row = _find_tile(scored_start_loc_ptr, num_reqs, tl.program_id(0), ROWS, REQS_P2)
        if r >= num_reqs:
            return
        kv_head = tl.program_id(1)
        row_lo = tl.load(scored_start_loc_ptr + r)
        num_rows = tl.load(scored_start_loc_ptr + r + 1) - row_lo
        q_end = tl.load(query_start_loc_ptr + r + 1)
        seq_len = tl.load(seq_lens_ptr + r)

        # The tile's (row, head) pairs, row-major: pair m is row m // GROUP_P2, head m % GROUP_P2.
        m = tl.arange(0, ROWS * GROUP_P2)
        row = first_row + m // GROUP_P2
        head = kv_head * GROUP + m % GROUP_P2
        live = (row < num_rows) & (m % GROUP_P2 < GROUP)
        token = q_end - num_rows + row
        position = seq_len - num_rows + row  # causal: sees keys 0 .. position
        d = tl.arange(0, HEAD_DIM_P2)
        q = tl.load(
            q_ptr + token[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=live[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        )
        lse = tl.load(lse_ptr + head * stride_lh + token.to(tl.int64) * stride_lt, mask=live, other=float("inf"))

        last_position = seq_len - num_rows + tl.minimum(first_row + ROWS, num_rows) - 1
        s = tl.arange(0, BLOCK_P2)
        for j in range(tl.program_id(2), last_position // BLOCK_SIZE + 1, tl.num_programs(2)):
            block = tl.load(block_table_ptr + r * stride_bt + j).to(tl.int64)
            k = tl.load(
                k_ptr + block * stride_kb + s[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
                mask=(s[:, None] < BLOCK_SIZE) & (d[None, :] < HEAD_DIM),
                other=0.0,
            )
            if DOT_FP32:
                logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                logits = tl.dot(q.to(k.dtype), tl.trans(k))  # [pairs, keys], float32 accumulation
            p = tl.exp(logits * scale - lse[:, None])
            seen = live[:, None] & (s[None, :] < BLOCK_SIZE) & (j * BLOCK_SIZE + s[None, :] <= position[:, None])
            mass = tl.sum(tl.where(seen, p, 0.0), 1)  # [pairs]: each (row, head)'s mass of block j
            if DO_SUM:
                tl.atomic_add(sum_ptr + r * stride_sum + j, tl.sum(mass, 0))
            if DO_MAX:
                best = tl.max(tl.reshape(mass, (ROWS, GROUP_P2)), 1)  # largest head, per row
                rows = first_row + tl.arange(0, ROWS)
                tl.atomic_max(max_ptr + (row_lo + rows).to(tl.int64) * stride_max + j, best, mask=rows < num_rows)


# ---------------------------------------------------------------------------
# Block-table compaction
# ---------------------------------------------------------------------------


if TRITON_AVAILABLE:

    @triton.jit
    def compact_kernel(
        table_ptr,
        stride_table,
        seq_lens_ptr,
        out_table_ptr,
        stride_out,
        out_lens_ptr,
        kept_ptr,
        stride_kept,
        width,
        BLOCK_SIZE: tl.constexpr,
        CHUNK: tl.constexpr,
        WRITE_KEPT: tl.constexpr,
    ):
        """One row: kept ids packed to the front (a running prefix sum), zeros after, the shorter length."""
        row = tl.program_id(0).to(tl.int64)
        seq_len = tl.load(seq_lens_ptr + row)
        num_blocks = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
        num_kept = seq_len * 0
        for start in range(0, num_blocks, CHUNK):
            index = start + tl.arange(0, CHUNK)
            used = index < num_blocks
            ids = tl.load(table_ptr + row * stride_table + index, mask=used, other=0)
            keep = used & (ids != 0)
            dest = num_kept + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(out_table_ptr + row * stride_out + dest, ids, mask=keep)
            if WRITE_KEPT:
                tl.store(kept_ptr + row * stride_kept + dest, index, mask=keep)
            num_kept += tl.sum(keep.to(tl.int32), 0)
        for start in range(0, width, CHUNK):
            index = start + tl.arange(0, CHUNK)
            tail = (index >= num_kept) & (index < width)
            tl.store(out_table_ptr + row * stride_out + index, 0, mask=tail)
            if WRITE_KEPT:
                tl.store(kept_ptr + row * stride_kept + index, -1, mask=tail)
        tl.store(out_lens_ptr + row, seq_len - (num_blocks - num_kept) * BLOCK_SIZE)
