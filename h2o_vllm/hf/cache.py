"""A transformers ``Cache`` that evicts KV with the policy core, for real.

Each layer stores its keys and values as ``[batch, kv_heads, slots, head_dim]``
plus the position of every slot. Evicted slots are removed and the tensors
repacked, so evicted KV is gone from memory; positions keep counting, so RoPE
and generation go on as if nothing had been dropped (keys are stored already
rotated). Rows of a batch may keep different slots; a row with fewer slots
than the widest one is padded with empty slots that no query can see.

Scores come from the attention function in :mod:`h2o_vllm.hf.attention`,
which calls :meth:`H2OCache.attend` for every layer. With ``per_layer=False``
(the default, as paging requires) the attention mass is summed over layers,
heads and queries into one ledger per row, and one decision after the last
layer holds for all layers. With ``per_layer=True`` each layer keeps its own
ledger and evicts right after its own attention. With ``per_head=True`` as
well, each KV head of each layer keeps its own slots (what the paper's code
does): the cache then treats (row, KV head) pairs as its rows, each with its
own ledger and decisions, and hands attention ``[batch, kv_heads, ...]`` views.
A KV head's score sums the query heads that share it (grouped-query attention).

Key-norm eviction (``policy="keynorm"``) needs no attention weights: when a layer's new
keys are in the cache (rotated, as stored), the L2 norm of each token's key is added to
its block's score once, summed over the layer's KV heads (each KV head alone with
``per_head=True``) and, with shared decisions, over layers, as attention mass is.

The configuration's ``score_reduce`` says how heads (and, with shared decisions, layers) are
combined: ``"sum"`` adds every head's attention mass (the paper); ``"max"``
takes, for each query, the largest mass any one head gives a block, then sums
over queries. With one decision per block for 270 heads, a block that a few
retrieval heads need is otherwise outvoted by the many heads that look at
recent text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from h2o_vllm.hf import handoff
from h2o_vllm.hf.base import EvictingCache, EvictingLayer, left_padding
from h2o_vllm.ledger import BlockLedger
from h2o_vllm.policy import ATTENTION, KEY_NORM, PolicyConfig, make_policy


class ReferenceLayer(EvictingLayer):
    """One layer's KV, repacked after every eviction."""

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None  # [batch, slots]; -1 marks an empty slot
        self.seen = 0  # positions handed out so far (what generation counts as cache length)
        self.compacted = False  # once true, transformers' own masks no longer describe the slots

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    @property
    def width(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, q_len = key_states.shape[0], key_states.shape[-2]
        new_positions = torch.arange(self.seen, self.seen + q_len, device=self.device).expand(batch, q_len)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions], dim=1)
        self.seen += q_len
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width + query_length, 0

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.seen = 0
        self.compacted = False

    def keep_only(self, keep: torch.Tensor) -> None:
        """Remove every slot where ``keep`` [batch, slots] is False and repack rows to the left."""
        batch, width = keep.shape
        counts = keep.sum(dim=1)
        new_width = int(counts.max())
        index = torch.arange(width, device=keep.device)
        # Kept slots first, each in its original order (keys are unique, so the sort is stable).
        order = torch.argsort((~keep).long() * width + index, dim=1)[:, :new_width]
        gather = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        positions = self.positions.gather(1, order)
        positions[index[:new_width][None, :] >= counts[:, None]] = -1
        self.positions = positions
        self.compacted = True


@dataclass
class CacheStats:
    evicted_blocks: int = 0
    evictions: int = 0  # eviction decisions that dropped something
    per_row_evicted: list[list[int]] = field(default_factory=list)  # logical block indices, row by row


class H2OCache(EvictingCache):
    """KV cache that applies an eviction policy (h2o, keynorm, streaming, none) as it goes."""

    def __init__(
        self,
        policy_config: PolicyConfig | list[PolicyConfig],
        num_layers: int,
        *,
        per_layer: bool = False,
        per_head: bool = False,
        score_chunk: int = 256,
    ):
        super().__init__(
            [ReferenceLayer() for _ in range(num_layers)],
            policy_config,
            per_layer=per_layer,
            per_head=per_head,
            score_chunk=score_chunk,
        )
        # One config for every row, or one per batch row (rows never share decisions anyway).
        self._row_configs = policy_config if isinstance(policy_config, list) else None
        self._row_max: list[torch.Tensor] = []  # score_reduce="max": per row [queries, blocks], max so far this step
        self.ledgers: list[list[BlockLedger]] = []  # [score group][row]
        self.policies = []  # one per row, made at the first forward when the batch size is known
        self.row_sources: list[str | None] = []  # per row: what its policy ranks by (policy.SCORE_SOURCES)
        self.stats = CacheStats()

    # -- transformers Cache interface ----------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        handoff.offer(self)
        if self.per_head:
            self.rows_per_sequence = key_states.shape[1]
            key_states, value_states = (
                _rows_per_head(key_states, self.rows_per_sequence),
                _rows_per_head(value_states, self.rows_per_sequence),
            )
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        if self.per_head:  # attention wants [batch, kv_heads, slots, dim] back
            keys, values = _batch_rows(keys, self.rows_per_sequence), _batch_rows(values, self.rows_per_sequence)
        return keys, values

    def resident_tokens(self) -> torch.Tensor:
        """[batch] KV tokens each batch row holds, averaged over layers (and KV heads with per_head)."""
        counts = torch.stack([(layer.positions >= self.padding[:, None]).sum(dim=1) for layer in self.layers]).double()
        return counts.mean(dim=0).view(-1, self.rows_per_sequence).mean(dim=1)

    # -- called by the attention function -------------------------------------------------

    def attend(
        self, module, base_attention, query, key, value, attention_mask, scaling, dropout, additive_mask, **kwargs
    ):
        layer_idx = module.layer_idx
        layer = self.layers[layer_idx]
        q_len = query.shape[2]
        first_query = layer.seen - q_len
        if self.padding is None:
            self._start(attention_mask, query.shape[0], q_len)
        if layer.compacted:
            allowed = self._allowed(layer, first_query, 0, q_len)  # [rows, 1, q, slots]
            if self.rows_per_sequence > 1:  # each query head sees its KV head's slots
                heads = query.shape[1]
                allowed = _batch_rows(
                    allowed.expand(-1, heads // self.rows_per_sequence, -1, -1), self.rows_per_sequence
                )
            attention_mask = _as_mask(allowed, query.dtype, additive_mask)
        out, weights = base_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if self.evicts:
            self._grow_ledgers(layer, layer_idx)
            if self.scoring is not None:
                if self.per_layer or layer_idx == 0:
                    self._reset_scores(layer_idx, first_query, q_len)
                self._score(module, layer, layer_idx, query, key, weights, first_query, scaling)
            if self.key_norms:
                self._add_key_norms(layer, layer_idx, q_len)
            last_layer = layer_idx == len(self.layers) - 1
            if self.per_layer:
                self._evict(layer_idx, [layer])
            elif last_layer:
                self._evict(0, self.layers)
        return out, weights

    # -- internals --------------------------------------------------------------------

    def _start(self, attention_mask, batch: int, q_len: int) -> None:
        """First forward: learn each row's left padding and open the ledgers."""
        self.padding = left_padding(attention_mask, batch, q_len).repeat_interleave(self.rows_per_sequence)
        self.prompt_tokens = self._prompt_length(q_len)
        groups = len(self.layers) if self.per_layer else 1
        configs = self._row_configs or [self.policy_config] * batch
        if len(configs) != batch:
            raise ValueError(f"{len(configs)} policy configs for a batch of {batch} rows")
        configs = [c for c in configs for _ in range(self.rows_per_sequence)]
        batch *= self.rows_per_sequence
        self.policies = [make_policy(c) for c in configs]
        self.row_sources = [c.score_source for c in configs]
        prompts = [self.prompt_tokens - int(p) for p in self.padding]  # each row's own prompt, without padding
        self.ledgers = [[BlockLedger(c.block_size, p) for c, p in zip(configs, prompts)] for _ in range(groups)]
        self.stats.per_row_evicted = [[] for _ in range(batch)]

    def _allowed(self, layer: ReferenceLayer, first_query: int, row_start: int, row_end: int) -> torch.Tensor:
        """[batch, 1, rows, slots]: which slots each query may attend (causal, no padding, no empty slot)."""
        pos = layer.positions
        q_pos = torch.arange(first_query + row_start, first_query + row_end, device=pos.device)
        valid = pos >= self.padding[:, None].to(pos.device)
        allowed = valid[:, None, :] & (pos[:, None, :] <= q_pos[None, :, None])
        # A padding query would see nothing (NaN softmax); let it see itself. Its output is never used.
        allowed |= pos[:, None, :] == q_pos[None, :, None]
        return allowed[:, None]

    def _reset_scores(self, layer_idx: int, first_query: int, q_len: int) -> None:
        """Prefill "staged": the forward that holds the prompt's last scoring rows starts the scores from zero."""
        if self.scoring.resets_scores(first_query, first_query + q_len, self.prompt_tokens):
            for row, ledger in enumerate(self.ledgers[layer_idx if self.per_layer else 0]):
                if self.row_sources[row] == ATTENTION:
                    ledger.reset_scores()

    def _grow_ledgers(self, layer: ReferenceLayer, layer_idx: int) -> None:
        for row, ledger in enumerate(self.ledgers[layer_idx if self.per_layer else 0]):
            ledger.grow(layer.seen - int(self.padding[row]))

    def _score(self, module, layer, layer_idx, query, key, weights, first_query, scaling) -> None:
        if self.rows_per_sequence > 1:  # one row per KV head, with the query heads that share it
            query, key = _rows_per_head(query, self.rows_per_sequence), _rows_per_head(key, self.rows_per_sequence)
            weights = None if weights is None else _rows_per_head(weights, self.rows_per_sequence)
        q_len = query.shape[2]
        first = self.scoring.first_scored_position(first_query, first_query + q_len, self.prompt_tokens)
        row_start = first - first_query
        batch, width = layer.positions.shape
        ledgers = self.ledgers[layer_idx if self.per_layer else 0]
        logical = layer.positions - self.padding[:, None]  # [B, W]; < 0: padding or empty slot
        use_max = self.scoring.score_reduce == "max"
        if use_max and (self.per_layer or layer_idx == 0):
            self._row_max = [torch.zeros(q_len - row_start, ledger.num_blocks) for ledger in ledgers]
        mass = torch.zeros(batch, width, dtype=torch.float64)
        visibility = torch.zeros(batch, width, dtype=torch.float64)
        groups = getattr(module, "num_key_value_groups", 1)
        keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        for start in range(row_start, q_len, self.score_chunk):
            end = min(q_len, start + self.score_chunk)
            allowed = self._allowed(layer, first_query, start, end)  # [B, 1, r, W]
            q_pos = torch.arange(first_query + start, first_query + end)
            query_is_real = q_pos[None, :] >= self.padding[:, None]  # [B, r]
            if weights is not None:  # eager attention already computed the probabilities
                probs = weights[:, :, start:end].float()
            else:
                logits = torch.matmul(query[:, :, start:end].float(), keys.float().transpose(2, 3)) * scaling
                probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            probs = probs * query_is_real[:, None, :, None]
            visibility += (allowed[:, 0] & query_is_real[:, :, None]).sum(dim=1).double()
            if not use_max:
                mass += probs.sum(dim=(1, 2)).double()
                continue
            for row, ledger in enumerate(ledgers):
                # Each head's mass per block, [H, r, blocks]; the extra last block collects padding slots.
                blocks = torch.where(logical[row] >= 0, logical[row] // ledger.block_size, ledger.num_blocks)
                per_head = torch.zeros(probs.shape[1], end - start, ledger.num_blocks + 1)
                per_head.scatter_add_(2, blocks.expand_as(probs[row]), probs[row])
                rows = self._row_max[row][start - row_start : end - row_start]
                torch.maximum(rows, per_head[..., :-1].amax(dim=0), out=rows)
        scored = [
            row for row, source in enumerate(self.row_sources) if source == ATTENTION and not self._ranks_by_keys(row)
        ]
        for row in scored:
            real = logical[row] >= 0
            ledgers[row].add(logical[row][real].cpu().numpy(), mass[row, real].numpy(), visibility[row, real].numpy())
        if use_max and (self.per_layer or layer_idx == len(self.layers) - 1):
            for row in scored:
                ledger = ledgers[row]
                ledger.add_blocks(np.arange(ledger.num_blocks), self._row_max[row].sum(dim=0).double().numpy())

    def _add_key_norms(self, layer: ReferenceLayer, layer_idx: int, q_len: int) -> None:
        """Add the L2 norms of this forward's keys (the layer's last ``q_len`` slots, just appended) to their
        blocks, summed over the row's KV heads: each key is counted once per layer, when it is written."""
        norms = _key_norms(layer.keys[:, :, -q_len:])  # [rows, q]
        logical = layer.positions[:, -q_len:] - self.padding[:, None]  # < 0: padding
        ledgers = self.ledgers[layer_idx if self.per_layer else 0]
        for row, source in enumerate(self.row_sources):
            if source == KEY_NORM or self._ranks_by_keys(row):
                real = logical[row] >= 0
                ledgers[row].add(logical[row][real].cpu().numpy(), norms[row, real].cpu().numpy())

    def _ranks_by_keys(self, row: int) -> bool:
        """Whether ``row`` is filling a staged working set ranked by its keys' norms (its ledger has grown
        to this forward's end, as :meth:`PolicyConfig.ranks_by_keys` counts it)."""
        ledger = self.ledgers[0][row]
        return self.policies[row].config.ranks_by_keys(ledger.num_tokens, ledger.num_prompt_tokens)

    def _evict(self, group: int, layers: list[ReferenceLayer]) -> None:
        decisions = [ledger.evict(policy) for ledger, policy in zip(self.ledgers[group], self.policies)]
        has_padding_slots = bool((layers[0].positions < self.padding[:, None]).any())
        if not any(decisions) and not has_padding_slots:
            return  # nothing to remove: keep the cache exactly as an unmodified one would be
        for row, blocks in enumerate(decisions):
            if blocks:
                self.stats.evicted_blocks += len(blocks)
                self.stats.evictions += 1
                if group == 0:
                    self.stats.per_row_evicted[row].extend(blocks)
        for layer in layers:
            logical = layer.positions - self.padding[:, None]
            keep = logical >= 0
            for row, blocks in enumerate(decisions):
                if blocks:
                    gone = torch.as_tensor(blocks, dtype=torch.long)
                    keep[row] &= ~torch.isin(logical[row] // self.ledgers[group][row].block_size, gone)
            layer.keep_only(keep)


def _key_norms(keys: torch.Tensor) -> torch.Tensor:
    """[rows, kv_heads, q, head_dim] keys -> [rows, q] float64: each token's key L2 norm, summed over KV heads."""
    return torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float64).sum(dim=1)


def _rows_per_head(t: torch.Tensor, rows_per_sequence: int) -> torch.Tensor:
    """[batch, heads, ...] -> [batch * rows_per_sequence, heads // rows_per_sequence, ...] (row b * rows_per_sequence + h)."""
    return t.reshape(t.shape[0] * rows_per_sequence, t.shape[1] // rows_per_sequence, *t.shape[2:])


def _batch_rows(t: torch.Tensor, rows_per_sequence: int) -> torch.Tensor:
    """The inverse of :func:`_rows_per_head`."""
    return t.reshape(t.shape[0] // rows_per_sequence, t.shape[1] * rows_per_sequence, *t.shape[2:])


def _as_mask(allowed: torch.Tensor, dtype, additive: bool) -> torch.Tensor:
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
