"""The policy's decisions for every row of a fast cache at once, on the device, and what they evicted."""

from __future__ import annotations

import numpy as np
import torch

from h2o_vllm.policy import Bounds, PolicyConfig, make_policy


class DevicePolicy:
    """:meth:`EvictionPolicy.select` for every row of a slot table at once, on the device.

    The same rules from the same code: the rows' :class:`~h2o_vllm.policy.Bounds` (worked
    out on the host from each row's length) and the policy's ``order_key``; only held,
    unprotected blocks go, the lowest key first, ties to the older block, until each row
    holds its budget.
    """

    def __init__(self, config: PolicyConfig):
        self.config = config
        self.policy = make_policy(config)
        self._bounds_key: tuple | None = None
        self._bounds: list[torch.Tensor] = []

    def bounds(self, num_tokens: list[int], device) -> list[torch.Tensor]:
        """Budget blocks, sink blocks and the first protected block of each row, as [rows, 1, 1] tensors."""
        key = (tuple(num_tokens), device)
        if key != self._bounds_key:
            rows = [self.config.bounds(n) for n in num_tokens]
            table = torch.tensor([[b.budget_blocks, b.sink_blocks, b.protected_from] for b in rows], dtype=torch.long)
            self._bounds = list(table.to(device)[:, :, None, None].unbind(1))
            self._bounds_key = key
        return self._bounds

    def select(self, blocks, scores, visibility, num_tokens: list[int]) -> torch.Tensor:
        """[batch, groups, pages] True where a page's block is evicted now.

        ``blocks``: the logical block of each page (-1: free); ``num_tokens``: each batch row's tokens."""
        bounds = Bounds(*self.bounds(num_tokens, blocks.device))  # each field [rows, 1, 1]
        held = blocks >= 0
        excess = held.sum(-1) - bounds.budget_blocks[..., 0]
        candidate = held & ~bounds.protected(blocks)
        key = self.policy.order_key(scores, blocks, visibility).double().masked_fill(~candidate, float("inf"))
        # Rank by (key, block): a stable sort by block, then a stable sort by key.
        by_block = torch.argsort(blocks, dim=-1, stable=True)
        order = by_block.gather(-1, torch.argsort(key.gather(-1, by_block), dim=-1, stable=True))
        ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, ranks)
        return candidate & (rank < excess[..., None])


class EvictionRecord:
    """What a :class:`FastH2OCache` evicted, counted on the device; read like :class:`CacheStats`.

    Reading a field syncs with the device once; recording never does.
    """

    def __init__(self):
        self._blocks: torch.Tensor | None = None  # evicted blocks, every group
        self._evictions: torch.Tensor | None = None  # (row, decision) pairs that dropped something
        self._evicted_at: torch.Tensor | None = None  # [rows, blocks + 1]: group 0's decision number, -1: kept
        self._decisions = 0

    def add(self, group: int, evict: torch.Tensor, blocks: torch.Tensor, num_blocks: int) -> None:
        if self._blocks is None:
            self._blocks = torch.zeros((), dtype=torch.long, device=evict.device)
            self._evictions = torch.zeros((), dtype=torch.long, device=evict.device)
        self._blocks += evict.sum()
        self._evictions += evict.any(-1).sum()
        if group != 0:
            return
        rows = evict.shape[0] * evict.shape[1]
        if self._evicted_at is None or self._evicted_at.shape[1] < num_blocks + 1:
            grown = torch.full((rows, 2 * num_blocks + 1), -1, dtype=torch.long, device=evict.device)
            if self._evicted_at is not None:
                grown[:, : self._evicted_at.shape[1] - 1] = self._evicted_at[:, :-1]
            self._evicted_at = grown
        trash = self._evicted_at.shape[1] - 1  # the column where kept pages write
        index = torch.where(evict, blocks, trash).view(rows, -1)
        self._evicted_at.scatter_(1, index, self._decisions)
        self._evicted_at[:, trash] = -1
        self._decisions += 1

    @property
    def evicted_blocks(self) -> int:
        return 0 if self._blocks is None else int(self._blocks)

    @property
    def evictions(self) -> int:
        return 0 if self._evictions is None else int(self._evictions)

    @property
    def per_row_evicted(self) -> list[list[int]]:
        """Group 0's evicted logical blocks row by row, in the order they were evicted."""
        if self._evicted_at is None:
            return []
        at = self._evicted_at[:, :-1].cpu().numpy()
        rows = []
        for row in at:
            blocks = np.flatnonzero(row >= 0)
            rows.append([int(b) for b in blocks[np.lexsort((blocks, row[blocks]))]])
        return rows
