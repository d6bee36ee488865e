"""Holes out of block tables: what vLLM's attention kernel sees once evicted blocks are dropped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Compaction:
    """The block table and sequence lengths the kernel sees once holes are dropped."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    kept_blocks: dict[int, np.ndarray]  # batch row -> logical indices of the blocks kept (only rows with holes)


def compact(block_table: torch.Tensor, seq_lens: torch.Tensor, rows: list[int], block_size: int) -> Compaction:
    """Drop hole entries (id 0) from ``rows`` of the table and shorten their lengths.

    Works on copies: on CPU the runner's persistent tables alias these tensors.
    Holes are always whole blocks (the policy never evicts a partly written one),
    so each hole removes exactly ``block_size`` tokens.
    """
    if not rows:
        return Compaction(block_table, seq_lens, {})
    table = block_table.clone()
    lens = seq_lens.clone()
    kept: dict[int, np.ndarray] = {}
    table_np, lens_np = table.numpy(), lens.numpy()
    for row in rows:
        num_blocks = -(-int(lens_np[row]) // block_size)
        ids = table_np[row, :num_blocks].copy()
        keep = np.flatnonzero(ids != 0)
        holes = num_blocks - len(keep)
        table_np[row, : len(keep)] = ids[keep]
        table_np[row, len(keep) : num_blocks] = 0
        lens_np[row] -= holes * block_size
        kept[row] = keep
    return Compaction(table, lens, kept)
