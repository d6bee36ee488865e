"""Where the fast cache's tokens live: fixed pages of slots, and how many pages a forward needs.

Slots come in *pages* of ``block_size`` slots, one logical block per page (one token
per page at ``block_size=1``, the paper's token-level H2O), so evicting a block frees a
page and a new block takes a free one. A :class:`SlotTable` says which position each
slot holds, for one group of layers that decides together; :class:`PagePlan` works out
on the host, from the policy configuration alone, how many pages the table needs.
"""

from __future__ import annotations

import torch

from h2o_vllm.footprint import Footprint
from h2o_vllm.policy import PolicyConfig


def ceil_div(a, b):
    return -(-a // b)


class PagePlan:
    """How many pages a :class:`SlotTable` needs, from the policy configuration alone (host arithmetic, no sync)."""

    def __init__(self, config: PolicyConfig, margin_tokens: int):
        self.config = config
        self.block_size = config.block_size
        self.footprint = Footprint(config)
        self.margin = max(1, ceil_div(margin_tokens, self.block_size))
        # A token budget keeps the same number of blocks at every length: one size fits the whole generation.
        fixed = config.policy != "none" and config.budget.tokens is not None
        self.steady = self.footprint.kept_blocks(config.budget.tokens) + self.margin if fixed else None

    def most_kept(self, num_tokens: int) -> int:
        """The most pages a row of ``num_tokens`` tokens holds after its eviction (padding adds none)."""
        blocks = ceil_div(num_tokens, self.block_size)
        return blocks if self.config.policy == "none" else min(blocks, self.footprint.kept_blocks(num_tokens))

    def pages_for(self, current: int, num_before: int, new_tokens: int) -> int:
        """The pages a table of ``current`` pages needs for a forward of ``new_tokens`` after ``num_before``."""
        need = self.most_kept(num_before) + ceil_div(new_tokens, self.block_size)
        if num_before == 0 and self.block_size > 1:
            need += 1  # the first forward aligns each row's first block to a page after its left padding
        if need <= current:
            return current
        if self.steady is not None:
            return max(need, self.steady)
        return max(need, current + current // 4)  # growing budgets grow in steps, not token by token

    def shrink_to(self, current: int, num_tokens: int) -> int | None:
        """The pages to shrink to once an eviction has run at ``num_tokens``, or None to keep ``current``."""
        if self.config.policy == "none":
            return None
        if self.steady is not None:
            return self.steady if current > self.steady else None
        target = self.most_kept(num_tokens) + self.margin
        return target + target // 4 if current > 2 * target else None


class SlotTable:
    """Which position every slot of a group of layers holds, and every page's accumulated score.

    ``positions`` is ``[batch, groups, slots]`` (groups: 1, or the KV heads with per-head
    decisions) with -1 for an empty slot; a slot holding a position below its row's left
    padding is empty too. ``scores`` and ``visibility`` are ``[batch, groups, pages]``.
    """

    def __init__(self, block_size: int, with_visibility: bool):
        self.block_size = block_size
        self.with_visibility = with_visibility
        self.clear()

    def clear(self) -> None:
        self.padding: torch.Tensor | None = None  # [batch] left-padding tokens per row
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.visibility: torch.Tensor | None = None
        self.new_slots: torch.Tensor | None = None  # [batch, groups, q]: where this forward's tokens go
        self.allowed: torch.Tensor | None = None  # [batch, groups, q, slots]: what this forward's queries see
        self.row_max: torch.Tensor | None = None  # score_reduce="max": [batch, groups, rows, pages] this step

    def start(self, padding: torch.Tensor, groups: int) -> None:
        self.padding = padding
        self.positions = torch.full((len(padding), groups, 0), -1, dtype=torch.long, device=padding.device)
        self.scores = torch.zeros(len(padding), groups, 0, dtype=torch.float64, device=padding.device)
        self.visibility = torch.zeros_like(self.scores) if self.with_visibility else None

    @property
    def started(self) -> bool:
        return self.positions is not None

    @property
    def pages(self) -> int:
        return self.positions.shape[-1] // self.block_size

    @property
    def slots(self) -> int:
        return self.positions.shape[-1]

    def page_blocks(self) -> torch.Tensor:
        """[batch, groups, pages]: the logical block each page holds, -1 for a free page.

        A block's first token is always in its page's first slot."""
        batch, groups, _ = self.positions.shape
        first = self.positions.view(batch, groups, self.pages, self.block_size)[..., 0]
        pad = self.padding[:, None, None]
        return torch.where(first >= pad, (first - pad) // self.block_size, -1)

    def grow(self, pages: int) -> None:
        """Add free pages at the end (the layers grow their buffers to match when they write)."""
        extra = pages - self.pages
        batch, groups, _ = self.positions.shape
        self.positions = torch.cat(
            [self.positions, self.positions.new_full((batch, groups, extra * self.block_size), -1)], -1
        )
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, groups, extra)], -1)
        if self.visibility is not None:
            self.visibility = torch.cat([self.visibility, self.visibility.new_zeros(batch, groups, extra)], -1)

    def assign(self, first_position: int, q_len: int) -> None:
        """Give each of this forward's ``q_len`` tokens a slot: continue the row's last block, or take free pages."""
        batch, groups, _ = self.positions.shape
        bs = self.block_size
        padding = self.padding
        steps = torch.arange(q_len, device=self.positions.device)
        if first_position == 0:
            # The first forward lays each row out from the first page boundary after its left padding.
            base = ceil_div(padding, bs) * bs - padding
            slots = (base[:, None] + steps)[:, None, :].expand(batch, groups, q_len)
        else:
            logical = first_position - padding  # [batch]: the row's tokens so far
            token = logical[:, None] + steps  # [batch, q]
            block = token // bs
            first_new = ceil_div(logical, bs)  # blocks from here on start in this forward
            is_new = (block >= first_new[:, None])[:, None, :].expand(batch, groups, q_len)
            blocks = self.page_blocks()
            free_first = torch.argsort((blocks >= 0).to(torch.int32), dim=-1, stable=True)
            nth_new = (block - first_new[:, None]).clamp(min=0)[:, None, :].expand(batch, groups, q_len)
            page = free_first.gather(-1, nth_new)
            if bs > 1:  # tokens that continue the row's partly written block go to its page
                tail = (blocks == (first_new - 1)[:, None, None]).to(torch.int32).argmax(-1, keepdim=True)
                page = torch.where(is_new, page, tail)
            fresh = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, page, is_new)
            self.scores.masked_fill_(fresh, 0.0)
            if self.visibility is not None:
                self.visibility.masked_fill_(fresh, 0.0)
            slots = page * bs + (token % bs)[:, None, :]
        self.new_slots = slots
        values = (first_position + steps).expand(batch, groups, q_len)
        self.positions.scatter_(-1, slots, values)
        self.allowed = self.visible(first_position, first_position + q_len)

    def visible(self, first_query: int, end_query: int) -> torch.Tensor:
        """[batch, groups, rows, slots]: causal, no padding, no empty slot (a padding query sees itself)."""
        pos = self.positions[:, :, None, :]
        query = torch.arange(first_query, end_query, device=pos.device)[None, None, :, None]
        valid = pos >= self.padding[:, None, None, None]
        return (valid & (pos <= query)) | (pos == query)

    def add(self, slot_mass: torch.Tensor, slot_visibility: torch.Tensor | None) -> None:
        """Add per-slot mass ``[batch, groups, slots]`` (float64) to the pages' scores."""
        batch, groups, _ = slot_mass.shape
        self.scores += slot_mass.view(batch, groups, self.pages, self.block_size).sum(-1)
        if self.visibility is not None and slot_visibility is not None:
            self.visibility += slot_visibility.view(batch, groups, self.pages, self.block_size).sum(-1)

    def free(self, evict: torch.Tensor) -> None:
        """Empty the pages where ``evict`` [batch, groups, pages] is True."""
        batch, groups, _ = self.positions.shape
        self.positions.view(batch, groups, self.pages, self.block_size).masked_fill_(evict[..., None], -1)

    def held(self) -> torch.Tensor:
        """[batch, groups, slots]: which slots hold a token (not empty, not padding)."""
        return self.positions >= self.padding[:, None, None]

    def shrink(self, pages: int) -> torch.Tensor:
        """Keep ``pages`` pages, the held ones first in block order; the slot index [batch, groups, slots] kept."""
        blocks = self.page_blocks()
        held = blocks >= 0
        order = torch.argsort(torch.where(held, blocks, torch.iinfo(torch.long).max), dim=-1, stable=True)
        order = order[..., :pages]
        self.scores = self.scores.gather(-1, order)
        if self.visibility is not None:
            self.visibility = self.visibility.gather(-1, order)
        bs = self.block_size
        slot_index = (order[..., None] * bs + torch.arange(bs, device=order.device)).flatten(-2)
        positions = self.positions.gather(-1, slot_index)
        kept_held = held.gather(-1, order)
        self.positions = positions.masked_fill(~kept_held.repeat_interleave(bs, dim=-1), -1)
        return slot_index
