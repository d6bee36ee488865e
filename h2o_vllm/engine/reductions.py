"""How heads, layers and query rows combine into one request's block scores (``policy.SCORE_REDUCE``).

``sum`` adds every head's, layer's and query's softmax mass (the paper); ``max`` takes,
for each query row, the largest mass one head of one layer gives a block, then sums
over rows. The PyTorch scorer (:mod:`h2o_vllm.engine.scoring`) feeds them unnormalised
softmax rows; the fused operator does the same arithmetic in C++.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


def exp_rows_(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised softmax of [batch, rows, keys] in place; returns 1 / row sums, [batch, rows].

    ``x`` is scratch. Normalising is left to the reductions that follow, which
    fold it in (one matrix-vector product, or one multiply on a smaller tensor).
    """
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.sum(dim=-1).reciprocal_()


def column_sums(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities summed over rows: [batch, rows, keys] -> [batch, keys]."""
    return torch.bmm(inverse[:, None, :], x)[:, 0]


def row_block_mass(x: torch.Tensor, inverse: torch.Tensor, block_size: int) -> torch.Tensor:
    """Softmax mass of each row per block of keys: [batch, rows, keys] -> [batch, rows, ceil(keys / block_size)]."""
    keys = x.shape[-1]
    full = keys // block_size
    mass = x[..., : full * block_size].unflatten(-1, (full, block_size)).sum(dim=-1)
    if keys > full * block_size:  # keys end inside a block: the last, partly written one
        mass = torch.cat([mass, x[..., full * block_size :].sum(dim=-1, keepdim=True)], dim=-1)
    return mass.mul_(inverse[..., None])


class Reduction(ABC):
    """How heads, layers and query rows combine into one request's block scores (``policy.SCORE_REDUCE``).

    A *total* accumulates over the layers of one step: for a prompt chunk one per
    request, for the decode batch one row per request. Prompt chunks are scored
    ``SCORE_CHUNK_ROWS`` rows at a time within a layer (``add_prompt_rows``), decodes
    all at once (``add_decodes``). ``x`` is always the unnormalised softmax of
    [batch, rows, keys] and ``inverse`` its reciprocal row sums (see :func:`exp_rows_`).
    """

    name: ClassVar[str]

    @abstractmethod
    def prompt_total(self, num_rows: int, num_keys: int, block_size: int) -> torch.Tensor: ...

    @abstractmethod
    def prompt_layer(self, total: torch.Tensor, num_keys: int) -> torch.Tensor:
        """Where one layer's prompt rows accumulate (``total`` itself, or a per-layer buffer of whole pages)."""

    @abstractmethod
    def add_prompt_rows(
        self, layer: torch.Tensor, x: torch.Tensor, inverse: torch.Tensor, rows: slice, block_size: int
    ) -> None:
        """``x``: [heads, rows, visible keys] for the query rows ``rows`` of the scored ones."""

    def end_prompt_layer(self, total: torch.Tensor, layer: torch.Tensor, block_size: int) -> None:  # noqa: B027
        """Fold one layer's buffer into ``total`` (nothing to do when they are the same tensor)."""

    @abstractmethod
    def decode_total(self, num_requests: int, num_blocks: int) -> torch.Tensor: ...

    @abstractmethod
    def add_decodes(self, total: torch.Tensor, x: torch.Tensor, inverse: torch.Tensor, block_size: int) -> None:
        """``x``: [requests, heads, keys], one query row per request."""

    @abstractmethod
    def block_scores(self, total: torch.Tensor) -> torch.Tensor:
        """One request's total -> float64 score per held block."""


class SumReduction(Reduction):
    """The paper: every head's, layer's and query's softmax mass added up."""

    name = "sum"

    def prompt_total(self, num_rows, num_keys, block_size):
        return torch.zeros(-(-num_keys // block_size), dtype=torch.float64)

    def prompt_layer(self, total, num_keys):
        return torch.zeros(num_keys)  # token by token; summed per block once the layer is done

    def add_prompt_rows(self, layer, x, inverse, rows, block_size):
        layer[: x.shape[-1]] += column_sums(x, inverse).sum(dim=0)

    def end_prompt_layer(self, total, layer, block_size):
        total += layer.view(-1, block_size).sum(dim=1).double()

    def decode_total(self, num_requests, num_blocks):
        return torch.zeros(num_requests, num_blocks)

    def add_decodes(self, total, x, inverse, block_size):
        total += column_sums(x, inverse).view(len(total), -1, block_size).sum(dim=2)

    def block_scores(self, total):
        return total.double()


class MaxReduction(Reduction):
    """For each query row, the largest mass one head of one layer gives the block; summed over rows."""

    name = "max"

    def prompt_total(self, num_rows, num_keys, block_size):
        return torch.zeros(num_rows, -(-num_keys // block_size))  # each row's best so far

    def prompt_layer(self, total, num_keys):
        return total

    def add_prompt_rows(self, layer, x, inverse, rows, block_size):
        best = row_block_mass(x, inverse, block_size).amax(dim=0)  # [rows, visible blocks]
        kept = layer[rows, : best.shape[1]]
        torch.maximum(kept, best, out=kept)

    def decode_total(self, num_requests, num_blocks):
        return torch.zeros(num_requests, 1, num_blocks)

    def add_decodes(self, total, x, inverse, block_size):
        best = row_block_mass(x, inverse, block_size).amax(dim=1)  # [requests, blocks]
        torch.maximum(total[:, 0], best, out=total[:, 0])

    def block_scores(self, total):
        return total.sum(dim=0).double()


REDUCTIONS: dict[str, Reduction] = {r.name: r for r in (SumReduction(), MaxReduction())}
