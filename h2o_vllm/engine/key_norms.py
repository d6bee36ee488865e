"""Key-norm requests' scores: the L2 norm of each new key, summed per logical block.

Key-norm requests (``policy="keynorm"``) are not scored by attention: a
:class:`KeyNormSums` made by the attention metadata builder adds, in every layer's
attention call, the L2 norm of each new key (the rotated keys the layer writes to the
paged cache) to its logical block, summed over KV heads and layers; it is collected
with the attention scores, as :class:`~h2o_vllm.engine.messages.BlockScores` too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from h2o_vllm.engine.messages import BlockScores

if TYPE_CHECKING:
    from h2o_vllm.engine.ranks import RankReducer
    from h2o_vllm.engine.scoring import StepContext


class KeyNormSums:
    """One step's key norms per request and logical block, summed over KV heads and layers.

    Each layer's attention gets the step's new keys, ``[tokens, kv_heads, head_dim]``
    (rotated: the values the layer writes to the paged cache); the tokens of the
    key-norm requests are the rows ``token_rows`` of it. Per layer: one gather (none
    when those rows are contiguous), one float64 norm and one ``index_add_`` into a flat
    buffer of every request's touched blocks. Each key is counted once, in the step
    that writes it, so what a block gathers over its life is the sum of its keys' norms.
    """

    def __init__(self, req_ids: list[str], blocks: list[np.ndarray], token_rows: np.ndarray, token_slots: np.ndarray):
        self.req_ids = req_ids
        self.blocks = blocks  # per request: the logical blocks its new tokens fall in, ascending
        rows = torch.from_numpy(token_rows.astype(np.int64))
        contiguous = len(token_rows) > 0 and bool(np.all(np.diff(token_rows) == 1))
        self.token_rows: slice | torch.Tensor = (
            slice(int(token_rows[0]), int(token_rows[-1]) + 1) if contiguous else rows
        )
        self.token_slots = torch.from_numpy(token_slots.astype(np.int64))  # [T] each token's place in totals
        self.offsets = np.concatenate([[0], np.cumsum([len(b) for b in blocks])]).astype(np.int64)
        self.totals = torch.zeros(int(self.offsets[-1]), dtype=torch.float64)

    @classmethod
    def for_step(
        cls, context: StepContext, query_start_loc: torch.Tensor, logical_seq_lens: np.ndarray, block_size: int
    ) -> KeyNormSums | None:
        """The step's sums for ``context.key_norms`` (None: none of them runs a token this step)."""
        qsl = query_start_loc.numpy()
        req_ids, blocks, rows, slots = [], [], [], []
        offset = 0
        for row, req_id in enumerate(context.req_ids[: len(logical_seq_lens)]):
            q_start, q_end = int(qsl[row]), int(qsl[row + 1])
            if req_id not in context.key_norms or q_end == q_start:
                continue
            seq_len = int(logical_seq_lens[row])
            block_of = np.arange(seq_len - (q_end - q_start), seq_len) // block_size  # the new tokens' blocks
            req_blocks = np.arange(block_of[0], block_of[-1] + 1)
            req_ids.append(req_id)
            blocks.append(req_blocks)
            rows.append(np.arange(q_start, q_end))
            slots.append(offset + block_of - block_of[0])
            offset += len(req_blocks)
        if not req_ids:
            return None
        return cls(req_ids, blocks, np.concatenate(rows), np.concatenate(slots))

    def add_layer(self, key: torch.Tensor) -> None:
        """Add one layer's key norms. ``key``: [tokens, kv_heads, head_dim], the step's new keys."""
        if key.dim() != 3:
            raise RuntimeError(f"H2O key norms expect keys of [tokens, kv_heads, head_dim], got {tuple(key.shape)}")
        norms = torch.linalg.vector_norm(key[self.token_rows], dim=-1, dtype=torch.float64)  # [T, kv_heads]
        self.totals.index_add_(0, self.token_slots, norms.sum(dim=-1))

    def collect(self, reducer: RankReducer | None = None) -> dict[str, BlockScores]:
        """The step's key norms, per request: what the scheduler adds to its ledgers (summed over
        parallel ranks by ``reducer`` first)."""
        if reducer is not None:
            reducer.key_norms(self.totals)
        totals = self.totals.numpy()
        return {
            req_id: BlockScores(blocks.astype(np.int64), totals[self.offsets[i] : self.offsets[i + 1]].copy())
            for i, (req_id, blocks) in enumerate(zip(self.req_ids, self.blocks))
        }
