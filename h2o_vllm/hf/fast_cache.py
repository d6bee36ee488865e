"""The fast transformers cache: fixed slot buffers, in-place writes, scores and decisions on the device.

:class:`FastH2OCache` decides exactly as the reference :class:`~h2o_vllm.hf.cache.H2OCache`
(same policy core rules, same scores, same evicted positions) but stores KV as the H2O
authors' code does: each layer keeps fixed ``[batch, kv_heads, slots, head_dim]`` buffers
of the budget plus a small margin, and a new token's key and value overwrite an evicted
slot in place instead of the tensors being repacked. Slots are in no positional order,
which attention does not mind: keys are cached already rotated, and a mask hides empty,
evicted and padding slots. Nothing is copied to the host while decoding: the attention
mass (or, for key-norm eviction, each new key's L2 norm, once) is summed into per-page
scores on the device, and the policy's choice is made there too (:class:`DevicePolicy`).

Slots come in *pages* of ``block_size`` slots, one logical block per page (one token
per page at ``block_size=1``, the paper's token-level H2O), so evicting a block frees a
page and a new block takes a free one. A :class:`SlotTable` says which position each
slot holds, for one group of layers that decides together: all layers (the default)
or each layer alone (``per_layer=True``); with ``per_head=True`` each KV head of a layer
has its own column of slots.

A forward with more new tokens than there are free slots (the prompt) grows the
buffers for that forward; after the eviction that ends it they shrink back to the
budget plus the margin, so during decoding the buffers are allocated once. How many
slots are needed is worked out on the host from the policy configuration alone
(:class:`PagePlan`), never by reading the device.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from h2o_vllm.hf.cache import _ACTIVE, H2OCache, _left_padding
from h2o_vllm.policy import PolicyConfig

# Query rows x keys x heads of float32 probabilities scored at once (512 MiB), so that a long
# prompt in a large batch is scored in as many row chunks as that needs.
SCORE_ELEMENTS = 1 << 27


def _ceil_div(a, b):
    return -(-a // b)


class PagePlan:
    """How many pages a :class:`SlotTable` needs, from the policy configuration alone (host arithmetic, no sync)."""

    def __init__(self, config: PolicyConfig, margin_tokens: int):
        self.config = config
        self.block_size = config.block_size
        self.margin = max(1, _ceil_div(margin_tokens, self.block_size))
        # A token budget keeps the same number of blocks at every length: one size fits the whole generation.
        fixed = config.policy != "none" and config.budget.tokens is not None
        self.steady = config.kept_blocks(config.budget.tokens) + self.margin if fixed else None

    def most_kept(self, num_tokens: int) -> int:
        """The most pages a row of ``num_tokens`` tokens holds after its eviction (padding adds none)."""
        blocks = _ceil_div(num_tokens, self.block_size)
        return blocks if self.config.policy == "none" else min(blocks, self.config.kept_blocks(num_tokens))

    def pages_for(self, current: int, num_before: int, new_tokens: int) -> int:
        """The pages a table of ``current`` pages needs for a forward of ``new_tokens`` after ``num_before``."""
        need = self.most_kept(num_before) + _ceil_div(new_tokens, self.block_size)
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
            base = _ceil_div(padding, bs) * bs - padding
            slots = (base[:, None] + steps)[:, None, :].expand(batch, groups, q_len)
        else:
            logical = first_position - padding  # [batch]: the row's tokens so far
            token = logical[:, None] + steps  # [batch, q]
            block = token // bs
            first_new = _ceil_div(logical, bs)  # blocks from here on start in this forward
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


class DevicePolicy:
    """:meth:`EvictionPolicy.select` for every row of a table at once, on the device.

    Same rules, same order: only held, full, unprotected blocks go, the lowest score
    (H2O), the highest (key norms) or the oldest (StreamingLLM) first, ties to the older
    block, until each row holds its budget.
    """

    def __init__(self, config: PolicyConfig):
        self.config = config

    def select(self, blocks, scores, visibility, num_tokens) -> torch.Tensor:
        """[batch, groups, pages] True where a page's block is evicted now.

        ``blocks``: the logical block of each page (-1: free); ``num_tokens``: [batch, groups] per row."""
        cfg = self.config
        bs = cfg.block_size
        held = blocks >= 0
        if cfg.budget.tokens is not None:
            budget_tokens = torch.full_like(num_tokens, cfg.budget.tokens)
        else:
            budget_tokens = torch.floor(cfg.budget.fraction * num_tokens.double()).long()
        excess = held.sum(-1) - budget_tokens // bs
        if cfg.n_recent is not None:
            recent = torch.full_like(num_tokens, cfg.n_recent)
        else:
            recent = (budget_tokens - cfg.n_sink).clamp(min=0) // 2
        first_recent = torch.where(recent > 0, ((num_tokens - recent) // bs).clamp(min=0), _ceil_div(num_tokens, bs))
        protected = (
            (blocks < _ceil_div(cfg.n_sink, bs))
            | (blocks >= first_recent[..., None])
            | (blocks >= (num_tokens // bs)[..., None])
        )
        candidate = held & ~protected
        key = self._key(blocks, scores, visibility).masked_fill(~candidate, float("inf"))
        # Rank by (key, block): a stable sort by block, then a stable sort by key.
        by_block = torch.argsort(blocks, dim=-1, stable=True)
        order = by_block.gather(-1, torch.argsort(key.gather(-1, by_block), dim=-1, stable=True))
        ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, ranks)
        return candidate & (rank < excess[..., None])

    def _key(self, blocks, scores, visibility) -> torch.Tensor:
        """What the candidates are sorted by, ascending (ties: the older block)."""
        if self.config.needs_key_norms:  # the highest norm first
            return -scores
        if not self.config.needs_scores:  # StreamingLLM: the oldest first
            return blocks.double()
        if self.config.score_norm == "mean":
            return scores / visibility.clamp(min=1.0)
        return scores


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


class FastLayer(CacheLayerMixin):
    """One layer's fixed K/V buffers, written in place at the slots its :class:`SlotTable` assigns."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, table: SlotTable):
        # Not CacheLayerMixin.__init__: here ``keys`` and ``values`` are read-only views of the held KV.
        self.table = table
        self.key_buffer: torch.Tensor | None = None  # [batch, kv_heads, slots, head_dim]
        self.value_buffer: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this forward's new KV, until attention
        self.seen = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Hold the new KV until attention writes it (the slots are chosen there, where padding is known)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def write(self) -> None:
        """Put the pending KV into the slots the table assigned, growing the buffers to the table's size first."""
        keys, values = self.pending
        self.pending = None
        if self.key_buffer is None or self.key_buffer.shape[2] != self.table.slots:
            self.key_buffer = self._resized(self.key_buffer, keys)
            self.value_buffer = self._resized(self.value_buffer, values)
        batch, heads, q_len, dim = keys.shape
        index = self.table.new_slots[..., None].expand(batch, heads, q_len, dim)
        self.key_buffer.scatter_(2, index, keys)
        self.value_buffer.scatter_(2, index, values)

    def _resized(self, buffer: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        # Zeros, not garbage: an empty slot's value is multiplied by a zero probability, and NaN * 0 is NaN.
        batch, heads, _, dim = like.shape
        grown = like.new_zeros(batch, heads, self.table.slots, dim)
        if buffer is not None:
            grown[:, :, : buffer.shape[2]] = buffer
        return grown

    def keep_slots(self, slot_index: torch.Tensor) -> None:
        """Shrink the buffers to the slots ``slot_index`` [batch, groups, slots] names (the table has already)."""
        batch, heads, _, dim = self.key_buffer.shape
        index = slot_index[..., None].expand(batch, heads, slot_index.shape[-1], dim)
        self.key_buffer = self.key_buffer.gather(2, index)
        self.value_buffer = self.value_buffer.gather(2, index)

    @property
    def positions(self) -> torch.Tensor | None:
        """[batch * groups, slots]: each slot's position, -1 (or below the row's left padding) when empty."""
        table = self.table
        return None if not table.started else table.positions.reshape(-1, table.slots)

    @property
    def keys(self) -> torch.Tensor | None:
        """The keys this layer holds, [batch, kv_heads, held, head_dim] in position order (gathered: for inspection)."""
        return self._held(self.key_buffer)

    @property
    def values(self) -> torch.Tensor | None:
        return self._held(self.value_buffer)

    def _held(self, buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None:
            return None
        positions = self.table.positions
        held = self.table.held()
        order = torch.argsort(torch.where(held, positions, torch.iinfo(torch.long).max), dim=-1, stable=True)
        width = int(held.sum(-1).max())
        batch, heads, _, dim = buffer.shape
        index = order[..., :width, None].expand(batch, heads, width, dim)
        kept = held.gather(-1, order[..., :width])[..., None].expand(batch, heads, width, dim)
        return buffer.gather(2, index) * kept

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # As if nothing were dropped: transformers' mask is only read at the first forward (for left padding).
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.pending = None
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("FastH2OCache does not support beam search")


class FastH2OCache(H2OCache):
    """:class:`H2OCache`'s decisions from fixed buffers written in place, scored and decided on the device.

    An ``H2OCache`` itself (code that checks for one accepts it), with one policy
    configuration for every row. ``margin`` tokens of room beyond what the policy keeps
    take the next forward's tokens (one decoding token needs one). ``stats`` reads the
    device once per access.

    With SDPA the attention probabilities are recomputed for scoring, from logits in
    ``score_dtype``: float32 as the reference does (the default), or None for the
    model's own dtype, as the H2O authors' code does. In float16 that reads the keys
    once instead of casting them all to float32 in every layer, several times faster
    on a GPU, but near-ties may then be decided otherwise than by the reference.
    """

    def __init__(
        self,
        policy_config: PolicyConfig,
        num_layers: int,
        *,
        per_layer: bool = False,
        per_head: bool = False,
        score_chunk: int = 256,
        margin: int = 1,
        score_dtype: torch.dtype | None = torch.float32,
    ):
        if isinstance(policy_config, list):
            raise ValueError("FastH2OCache takes one PolicyConfig for every row; use H2OCache for one per row")
        super().__init__(policy_config, num_layers, per_layer=per_layer, per_head=per_head, score_chunk=score_chunk)
        with_visibility = policy_config.needs_scores and policy_config.score_norm == "mean"
        groups = num_layers if per_layer else 1
        self.tables = [SlotTable(policy_config.block_size, with_visibility) for _ in range(groups)]
        self.layers = [FastLayer(self.tables[i if per_layer else 0]) for i in range(num_layers)]
        self.plan = PagePlan(policy_config, margin)
        self.device_policy = DevicePolicy(policy_config)
        self.score_dtype = score_dtype
        self.stats = EvictionRecord()

    # -- transformers Cache interface ----------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if getattr(_ACTIVE, "cache", None) is self:
            raise RuntimeError(
                "FastH2OCache needs the model's attention switched to h2o_eager or h2o_sdpa; "
                "create it with FastH2OCache.for_model(model, ...) or use enable_h2o_llm(model, ...)"
            )
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        _ACTIVE.cache = self
        return keys, values

    def resident_tokens(self) -> torch.Tensor:
        """[batch] KV tokens each batch row holds, averaged over layers (and KV heads with per_head)."""
        counts = [table.held().sum(-1).double().mean(-1) for table in self.tables]
        return torch.stack(counts).mean(0)

    def reset(self) -> None:
        super().reset()
        for table in self.tables:
            table.clear()
        self.padding = None
        self.stats = EvictionRecord()

    # -- called by the attention function -------------------------------------------------

    def attend(
        self, module, base_attention, query, key, value, attention_mask, scaling, dropout, additive_mask, **kwargs
    ):
        layer_idx = module.layer_idx
        layer = self.layers[layer_idx]
        table = layer.table
        q_len = query.shape[2]
        first_query = layer.seen - q_len
        if self.padding is None:
            self._start(attention_mask, key, q_len)
        if self.per_layer or layer_idx == 0:  # the first layer of its group in this forward
            pages = self.plan.pages_for(table.pages, first_query, q_len)
            if pages > table.pages:
                table.grow(pages)
            table.assign(first_query, q_len)
        if self.key_norms:
            self._add_key_norms_to(table, layer.pending[0], first_query)
        layer.write()
        mask = _attention_mask(table.allowed, query, additive_mask)
        out, weights = base_attention(
            module, query, layer.key_buffer, layer.value_buffer, mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if self.evicts:
            last_layer = layer_idx == len(self.layers) - 1
            if self.scoring is not None:
                self._score_slots(module, layer_idx, table, query, layer.key_buffer, weights, first_query, scaling)
            if self.per_layer:
                self._decide(layer_idx, [layer])
            elif last_layer:
                self._decide(0, self.layers)
        return out, weights

    # -- internals --------------------------------------------------------------------

    def _start(self, attention_mask, key, q_len: int) -> None:
        """First forward: learn each row's left padding and open the slot tables."""
        batch, kv_heads = key.shape[:2]
        self.padding = _left_padding(attention_mask, batch, q_len).to(key.device)
        self.prompt_tokens = q_len
        self.rows_per_sequence = kv_heads if self.per_head else 1
        for table in self.tables:
            table.start(self.padding, self.rows_per_sequence)

    def _score_slots(self, module, layer_idx, table, query, keys, weights, first_query, scaling) -> None:
        """Add this layer's attention mass (and visibility) to the table, as H2OCache._score adds it to its ledgers."""
        q_len = query.shape[2]
        first = self.scoring.first_scored_position(first_query, first_query + q_len, self.prompt_tokens)
        row_start = first - first_query
        batch, heads = query.shape[:2]
        groups = table.positions.shape[1]
        slots, pages, bs = table.slots, table.pages, table.block_size
        use_max = self.scoring.score_reduce == "max"
        if use_max and (self.per_layer or layer_idx == 0):
            table.row_max = query.new_zeros(batch, groups, q_len - row_start, pages, dtype=torch.float32)
        mass = torch.zeros(batch, groups, slots, dtype=torch.float64, device=query.device)
        visibility = torch.zeros_like(mass) if table.visibility is not None else None
        if weights is None:
            dtype = self.score_dtype or query.dtype
            kv_groups = getattr(module, "num_key_value_groups", 1)
            keys = (keys.repeat_interleave(kv_groups, dim=1) if kv_groups > 1 else keys).to(dtype).transpose(2, 3)
        chunk = min(self.score_chunk, max(1, SCORE_ELEMENTS // max(1, batch * heads * slots)))
        for start in range(row_start, q_len, chunk):
            end = min(q_len, start + chunk)
            allowed = table.allowed[:, :, start:end]  # [B, G, r, S]
            q_pos = torch.arange(first_query + start, first_query + end, device=query.device)
            query_is_real = (q_pos[None, :] >= self.padding[:, None])[:, None, :, None]  # [B, 1, r, 1]
            if weights is not None:  # eager attention already computed the probabilities
                probs = weights[:, :, start:end].float()
            else:
                logits = torch.matmul(query[:, :, start:end].to(dtype), keys).float() * scaling
                probs = torch.softmax(logits.masked_fill(~_per_query_head(allowed, heads), float("-inf")), dim=-1)
            probs = (probs * query_is_real).view(batch, groups, heads // groups, end - start, slots)
            if visibility is not None:
                visibility += (allowed & query_is_real).sum(dim=2).double()
            if not use_max:
                mass += probs.sum(dim=(2, 3)).double()
                continue
            per_head = probs.view(batch, groups, heads // groups, end - start, pages, bs).sum(-1)
            rows = table.row_max[:, :, start - row_start : end - row_start]
            rows.copy_(torch.maximum(rows, per_head.amax(dim=2)))
        table.add(mass, visibility)
        if use_max and (self.per_layer or layer_idx == len(self.layers) - 1):
            table.scores += table.row_max.sum(dim=2).double()

    def _add_key_norms_to(self, table: SlotTable, keys: torch.Tensor, first_query: int) -> None:
        """Add the L2 norms of this forward's keys [batch, kv_heads, q, head_dim] to the pages they are written to,
        summed over KV heads (each KV head alone with per-head decisions), as H2OCache._add_key_norms does."""
        batch, kv_heads, q_len, _ = keys.shape
        groups = table.positions.shape[1]
        norms = torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float64)  # [batch, kv_heads, q]
        norms = norms.view(batch, groups, kv_heads // groups, q_len).sum(dim=2)
        q_pos = torch.arange(first_query, first_query + q_len, device=keys.device)
        norms = norms * (q_pos[None, :] >= self.padding[:, None])[:, None, :]  # padding tokens count nothing
        table.scores.scatter_add_(-1, table.new_slots // table.block_size, norms)

    def _decide(self, group: int, layers: list[FastLayer]) -> None:
        """Evict what the policy says, on the device; shrink the buffers after a forward that grew them."""
        table = layers[0].table
        seen = layers[0].seen
        blocks = table.page_blocks()
        num_tokens = (seen - self.padding)[:, None].expand(blocks.shape[:2])
        evict = self.device_policy.select(blocks, table.scores, table.visibility, num_tokens)
        table.free(evict)
        self.stats.add(group, evict, blocks, _ceil_div(seen, table.block_size))
        pages = self.plan.shrink_to(table.pages, seen)
        if pages is not None:
            slot_index = table.shrink(pages)
            for layer in layers:
                layer.keep_slots(slot_index)


def _per_query_head(allowed: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, G, r, S] -> what each query head sees: [B, 1, r, S] (G=1, broadcast) or [B, heads, r, S]."""
    groups = allowed.shape[1]
    if groups == 1:
        return allowed
    return allowed.repeat_interleave(heads // groups, dim=1)


def _attention_mask(allowed: torch.Tensor, query: torch.Tensor, additive: bool) -> torch.Tensor:
    allowed = _per_query_head(allowed, query.shape[1])
    if not additive:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
    return mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
