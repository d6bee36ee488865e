"""Per-sequence bookkeeping of logical blocks: accumulated score, visibility, residency.

Engine-agnostic (numpy only). Engines add what the request's policy ranks by as
they compute it (attention mass every step, or key norms once as each key is
written; see ``EvictionPolicy.score_source``) and ask the policy which blocks to
drop; the ledger remembers what is gone so a block is never evicted twice and
never scored again.
"""

from __future__ import annotations

import numpy as np

from h2o_vllm.policy import EvictionPolicy, SequenceView


class BlockLedger:
    def __init__(self, block_size: int, num_prompt_tokens: int | None = None):
        self.block_size = block_size
        self.num_prompt_tokens = num_prompt_tokens
        self.num_tokens = 0
        self.scores = np.zeros(0)
        self.visibility = np.zeros(0)
        self.resident = np.zeros(0, dtype=bool)

    @property
    def num_blocks(self) -> int:
        return len(self.resident)

    def grow(self, num_tokens: int) -> None:
        """The sequence now has ``num_tokens`` tokens with KV written."""
        if num_tokens < self.num_tokens:
            raise ValueError("a sequence never shrinks; reset the ledger instead")
        self.num_tokens = num_tokens
        extra = -(-num_tokens // self.block_size) - self.num_blocks
        if extra > 0:
            self.scores = np.concatenate([self.scores, np.zeros(extra)])
            self.visibility = np.concatenate([self.visibility, np.zeros(extra)])
            self.resident = np.concatenate([self.resident, np.ones(extra, dtype=bool)])

    def add(self, token_positions: np.ndarray, mass: np.ndarray, visibility: np.ndarray | None = None) -> None:
        """Add scores (attention mass, or key norms) of tokens at logical ``token_positions``."""
        blocks = np.asarray(token_positions, dtype=np.int64) // self.block_size
        np.add.at(self.scores, blocks, np.asarray(mass, dtype=np.float64))
        if visibility is not None:
            np.add.at(self.visibility, blocks, np.asarray(visibility, dtype=np.float64))

    def add_blocks(self, blocks: np.ndarray, mass: np.ndarray, visibility: np.ndarray | None = None) -> None:
        """Add scores already summed per logical block (the paged engine's unit)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        np.add.at(self.scores, blocks, np.asarray(mass, dtype=np.float64))
        if visibility is not None:
            np.add.at(self.visibility, blocks, np.asarray(visibility, dtype=np.float64))

    def reset_scores(self) -> None:
        """Forget every score added so far (prefill "staged": the prompt's last rows rank alone)."""
        self.scores[:] = 0.0
        self.visibility[:] = 0.0

    def view(self) -> SequenceView:
        return SequenceView(self.num_tokens, self.resident, self.scores, self.visibility, self.num_prompt_tokens)

    def evict(self, policy: EvictionPolicy) -> list[int]:
        """Ask ``policy`` which blocks to drop, record it, and return their logical indices."""
        blocks = policy.select(self.view())
        if blocks:
            self.resident[blocks] = False
        return blocks
