"""The fast transformers cache: fixed slot buffers, in-place writes, scores and decisions on the device.

:class:`FastH2OCache` decides exactly as the reference :class:`~h2o_vllm.hf.cache.H2OCache`
(same policy core rules, same scores, same evicted positions) but stores KV as the H2O
authors' code does: each layer keeps fixed ``[batch, kv_heads, slots, head_dim]`` buffers
of the budget plus a small margin, and a new token's key and value overwrite an evicted
slot in place instead of the tensors being repacked. Slots are in no positional order,
which attention does not mind: keys are cached already rotated, and a mask hides empty,
evicted and padding slots. Nothing is copied to the host while decoding: the attention
mass (or, for key-norm eviction, each new key's L2 norm, once) is summed into per-page
scores on the device, and the policy's choice is made there too
(:class:`~h2o_vllm.hf.device_policy.DevicePolicy`).

Pages and the table of which position each slot holds are in :mod:`h2o_vllm.hf.slots`:
one table per group of layers that decides together: all layers (the default) or each
layer alone (``per_layer=True``); with ``per_head=True`` each KV head of a layer has its
own column of slots. A forward with more new tokens than there are free slots (the
prompt) grows the buffers for that forward; after the eviction that ends it they shrink
back to the budget plus the margin, so during decoding the buffers are allocated once.
"""

from __future__ import annotations

import torch

from h2o_vllm.hf import handoff
from h2o_vllm.hf.base import EvictingCache, EvictingLayer, left_padding
from h2o_vllm.hf.device_policy import DevicePolicy, EvictionRecord
from h2o_vllm.hf.slots import PagePlan, SlotTable, ceil_div
from h2o_vllm.policy import PolicyConfig

# Query rows x keys x heads of float32 probabilities scored at once (512 MiB), so that a long
# prompt in a large batch is scored in as many row chunks as that needs.
SCORE_ELEMENTS = 1 << 27


class FastLayer(EvictingLayer):
    """One layer's fixed K/V buffers, written in place at the slots its :class:`SlotTable` assigns."""

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

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.pending = None
        self.seen = 0
        self.is_initialized = False


class FastH2OCache(EvictingCache):
    """The reference :class:`~h2o_vllm.hf.cache.H2OCache`'s decisions from fixed buffers written in place,
    scored and decided on the device.

    One policy configuration for every row. ``margin`` tokens of room beyond what the policy keeps
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
        if policy_config.prefill == "staged":
            raise ValueError('FastH2OCache has no prefill "staged" yet (its page plan keeps one budget); use H2OCache')
        with_visibility = policy_config.needs_scores and policy_config.score_norm == "mean"
        groups = num_layers if per_layer else 1
        self.tables = [SlotTable(policy_config.block_size, with_visibility) for _ in range(groups)]
        layers = [FastLayer(self.tables[i if per_layer else 0]) for i in range(num_layers)]
        super().__init__(layers, policy_config, per_layer=per_layer, per_head=per_head, score_chunk=score_chunk)
        self.host_padding: list[int] = []  # the rows' left padding, known on the host
        self.plan = PagePlan(policy_config, margin)
        self.device_policy = DevicePolicy(policy_config)
        self.score_dtype = score_dtype
        self.stats = EvictionRecord()

    # -- transformers Cache interface ----------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        handoff.offer(self)
        return self.layers[layer_idx].update(key_states, value_states)

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
        padding = left_padding(attention_mask, batch, q_len)
        self.host_padding = padding.tolist()
        self.padding = padding.to(key.device)
        self.prompt_tokens = self._prompt_length(q_len)
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
        num_tokens = [seen - padding for padding in self.host_padding]
        evict = self.device_policy.select(blocks, table.scores, table.visibility, num_tokens)
        table.free(evict)
        self.stats.add(group, evict, blocks, ceil_div(seen, table.block_size))
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
