"""Worker side of paged H2O: compact holes out of block tables, and score attention.

vLLM's CPU attention kernel returns no probabilities, so for the query rows the
scheduler asked to score we recompute ``softmax(scale * q K^T)`` over the keys
the kernel attended (read back from the paged cache), sum it over the tokens of
each block, and combine over heads, layers and query rows: summed (the paper), or
for ``score_reduce="max"`` requests the largest head-and-layer value per query
row, then summed over rows. One :class:`StepScorer` lives for one step.

The runner describes the step in a :class:`StepContext`; the attention builder
(one call per step) turns it into compacted metadata and a scorer; every layer's
attention call feeds the scorer; the runner collects it after sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from h2o_vllm.engine.messages import BlockScores

# Prompt query rows scored per matmul: bounds the [heads, rows, keys] probabilities.
SCORE_CHUNK_ROWS = 256


class Scratch:
    """Reusable flat buffers. Scoring runs 30 layers x every step; fresh multi-MB tensors each
    time cost more in page faults than the arithmetic (measured: matmul + softmax on a
    1024-key chunk 16 ms with fresh outputs, 7 ms in place)."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape, dtype=torch.float32) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                buf = self._buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(*shape)


_scratch = Scratch()  # one per worker process; the runner scores on one thread


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


def softmax_column_sums(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits, -1)`` summed over every row, per batch entry: [..., rows, keys] -> [..., keys].

    In place: ``logits`` is overwritten (it is scratch).
    """
    x = logits.view(-1, logits.shape[-2], logits.shape[-1])  # [batch, rows, keys]
    sums = column_sums(x, exp_rows_(x))
    return sums.view(*logits.shape[:-2], logits.shape[-1])


@dataclass
class StepContext:
    """Set by the model runner after it updated its batch, read by the attention builder."""

    req_ids: list[str]  # batch order
    score_from: dict[str, int]  # req_id -> first logical query position to score
    holey: set[str]  # requests with holes in their block table
    scorer: "StepScorer | None" = None
    score_max: set[str] = field(default_factory=set)  # scored with score_reduce="max" (the others: "sum")


_current: StepContext | None = None


def begin_step(context: StepContext | None) -> None:
    global _current
    _current = context


def current_step() -> StepContext | None:
    return _current


def end_step() -> StepContext | None:
    global _current
    context, _current = _current, None
    return context


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


@dataclass
class _Scored:
    req_id: str
    row: int
    query_rows: slice  # rows of the step's query tensor that are scored
    query_positions: np.ndarray  # their logical positions
    block_ids: torch.Tensor  # physical blocks the kernel attends, in order
    logical_blocks: np.ndarray  # logical index of each of those blocks
    num_keys: int  # tokens held (compacted length)
    token_positions: np.ndarray  # logical position of each held token
    mass: torch.Tensor = field(default=None)  # [len(block_ids)] float64, summed over layers
    # score_reduce="max": [scored rows, len(block_ids)], each row's largest block mass over the heads and layers so far
    row_max: torch.Tensor | None = None


class StepScorer:
    """Accumulates one step's attention mass per request and block, over all layers."""

    def __init__(self, block_size: int, key_layout: str):
        self.block_size = block_size
        self.key_layout = key_layout
        self.requests: list[_Scored] = []  # scored one by one (several query rows: prompt chunks)
        self.decodes: list[_Scored] = []  # one query row each: scored together in one padded batch
        self.num_layers = 0
        # (query rows, flat block ids [R * n], -inf bias of padded keys [R, 1, 1, n * bs], summed mass [R, n]
        #  or None when every row uses max, the rows that use max (bool [R], or all of them: slice) or None,
        #  their max so far [R, n] or None)
        self._batch = None

    @classmethod
    def for_step(cls, context: StepContext, compaction: Compaction, query_start_loc: torch.Tensor,
                 logical_seq_lens: np.ndarray, block_size: int, key_layout: str) -> "StepScorer | None":
        scorer = cls(block_size, key_layout)
        qsl = query_start_loc.numpy()
        table = compaction.block_table
        lens = compaction.seq_lens.numpy()
        for row, req_id in enumerate(context.req_ids[: len(logical_seq_lens)]):
            first = context.score_from.get(req_id)
            if first is None:
                continue
            q_start, q_end = int(qsl[row]), int(qsl[row + 1])
            seq_len = int(logical_seq_lens[row])
            positions = np.arange(seq_len - (q_end - q_start), seq_len)
            skip = int(np.searchsorted(positions, first))
            if skip >= len(positions):
                continue
            num_keys = int(lens[row])
            num_blocks = -(-num_keys // block_size)
            logical = compaction.kept_blocks.get(row)
            if logical is None:
                logical = np.arange(num_blocks)
            token_positions = (logical[:, None] * block_size + np.arange(block_size)).reshape(-1)[:num_keys]
            scored = _Scored(
                req_id, row, slice(q_start + skip, q_end), positions[skip:],
                table[row, :num_blocks].long().clone(), logical, num_keys, token_positions,
                torch.zeros(num_blocks, dtype=torch.float64),
            )
            if req_id in context.score_max:
                scored.row_max = torch.zeros(q_end - (q_start + skip), num_blocks)
            (scorer.decodes if q_end - (q_start + skip) == 1 else scorer.requests).append(scored)
        if not scorer.requests and not scorer.decodes:
            return None
        scorer._prepare_batch()
        return scorer

    def _prepare_batch(self) -> None:
        if not self.decodes:
            return
        width = max(len(d.block_ids) for d in self.decodes)
        ids = torch.zeros(len(self.decodes), width, dtype=torch.long)  # padding: the null block, masked out
        for i, d in enumerate(self.decodes):
            ids[i, : len(d.block_ids)] = d.block_ids
        num_keys = torch.tensor([d.num_keys for d in self.decodes])
        hidden = torch.arange(width * self.block_size)[None, :] >= num_keys[:, None]
        bias = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))[:, None, None, :]  # [R, 1, 1, keys]
        rows = torch.tensor([d.query_rows.start for d in self.decodes])
        use_max = torch.tensor([d.row_max is not None for d in self.decodes])
        reqs = len(self.decodes)
        all_max, any_max = bool(use_max.all()), bool(use_max.any())
        self._batch = (rows, ids.view(-1), bias, None if all_max else torch.zeros(reqs, width),
                       (slice(None) if all_max else use_max) if any_max else None,
                       torch.zeros(reqs, width) if any_max else None)

    def _keys_t(self, pages: torch.Tensor, block_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """float32 K^T of ``block_ids`` (``num_seqs`` equal-length lists, flattened): [seqs, kv_heads, head_dim, keys].

        ``pages`` is [num_blocks, kv_heads, block_size * head_dim] raw page memory; one
        index_select copies whole pages (a fast memcpy), one copy puts keys in order and
        converts them to float32 (scores are computed in float32 whatever the model's dtype).
        """
        k = torch.index_select(pages, 0, block_ids, out=_scratch.get("pages", (len(block_ids), *pages.shape[1:]), pages.dtype))
        n = len(block_ids) // num_seqs
        kv_heads, bs = k.shape[1], self.block_size
        if self.key_layout == "dt":  # page = [head_dim, block_size]
            k = k.view(num_seqs, n, kv_heads, -1, bs).permute(0, 2, 3, 1, 4)
        else:  # page = [block_size, head_dim]
            k = k.view(num_seqs, n, kv_heads, bs, -1).permute(0, 2, 4, 1, 3)
        out = _scratch.get("keys", k.shape).copy_(k)
        return out.view(num_seqs, kv_heads, k.shape[2], n * bs)

    def _score_decodes(self, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """All single-row requests at once: one gather, one matmul, one softmax per layer."""
        rows, ids, bias, mass, use_max, row_max = self._batch
        reqs = len(rows)
        k_t = self._keys_t(key_pages, ids, reqs)  # [R, kv, d, keys]
        kv_heads, head_dim = k_t.shape[1], k_t.shape[2]
        q = query[rows].float().mul_(scale).view(reqs, kv_heads, -1, head_dim)  # [R, kv, g, d]
        logits = torch.matmul(q, k_t).add_(bias).view(reqs, -1, k_t.shape[-1])  # [R, heads, keys]: heads are the rows
        inverse = exp_rows_(logits)
        if mass is not None:
            mass += column_sums(logits, inverse).view(reqs, -1, self.block_size).sum(dim=2)
        if use_max is not None:
            per_head = row_block_mass(logits[use_max], inverse[use_max], self.block_size)  # [R', heads, n]
            row_max[use_max] = torch.maximum(row_max[use_max], per_head.amax(dim=1))

    def _score_prompt(self, req: _Scored, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """Rows of one request's prompt chunk, SCORE_CHUNK_ROWS at a time, each over the keys it can see."""
        k_t = self._keys_t(key_pages, req.block_ids, 1)[0]  # [kv, d, keys]
        kv_heads, head_dim = k_t.shape[0], k_t.shape[1]
        q_all = query[req.query_rows]
        mass = torch.zeros(k_t.shape[-1], dtype=torch.float32)
        token_pos = torch.from_numpy(req.token_positions)
        for start in range(0, q_all.shape[0], SCORE_CHUNK_ROWS):
            q_pos = req.query_positions[start : start + SCORE_CHUNK_ROWS]
            visible = int(np.searchsorted(req.token_positions, q_pos[-1], side="right"))  # causal: skip later keys
            q = q_all[start : start + len(q_pos)].float() * scale  # not in place: a float32 query is vLLM's own tensor
            q = q.view(len(q_pos), kv_heads, -1, head_dim).permute(1, 2, 0, 3)  # [kv, g, rows, d]
            logits = _scratch.get("logits", (kv_heads, q.shape[1], len(q_pos), visible))
            torch.matmul(q, k_t[:, None, :, :visible], out=logits)  # [kv, g, rows, visible]
            # Only keys after the chunk's first row can be hidden from some of its rows.
            first_hidden = int(np.searchsorted(req.token_positions, q_pos[0], side="right"))
            if first_hidden < visible:
                hidden = token_pos[None, first_hidden:visible] > torch.from_numpy(q_pos)[:, None]
                logits[..., first_hidden:visible].masked_fill_(hidden, float("-inf"))
            x = logits.view(-1, len(q_pos), visible)  # [heads, rows, visible]
            inverse = exp_rows_(x)
            if req.row_max is None:
                mass[:visible] += column_sums(x, inverse).sum(dim=0)
            else:
                best = row_block_mass(x, inverse, self.block_size).amax(dim=0)  # [rows, visible blocks]
                rows = req.row_max[start : start + len(q_pos), : best.shape[1]]
                torch.maximum(rows, best, out=rows)
        if req.row_max is None:
            req.mass += mass.view(-1, self.block_size).sum(dim=1).double()

    def score_layer(self, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """Add one layer's attention mass. ``query``: [tokens, heads, head_dim]; ``key_pages``: see ``_keys_t``."""
        self.num_layers += 1
        if self._batch is not None:
            self._score_decodes(query, key_pages, scale)
        for req in self.requests:
            self._score_prompt(req, query, key_pages, scale)

    def collect(self) -> dict[str, BlockScores]:
        if self._batch is not None:
            batch_mass, batch_max = self._batch[3], self._batch[5]
            for i, d in enumerate(self.decodes):
                if d.row_max is not None:
                    d.row_max[0] = batch_max[i, : len(d.block_ids)]
                else:
                    d.mass += batch_mass[i, : len(d.block_ids)].double()
        out = {}
        for req in self.requests + self.decodes:
            if req.row_max is not None:
                req.mass = req.row_max.sum(dim=0).double()
            # (query, token) pairs that could see each held token, for every layer scored.
            seen_by = len(req.query_positions) - np.searchsorted(req.query_positions, req.token_positions, side="left")
            per_token = np.zeros(len(req.block_ids) * self.block_size)
            per_token[: req.num_keys] = seen_by
            visibility = per_token.reshape(-1, self.block_size).sum(axis=1) * self.num_layers
            out[req.req_id] = BlockScores(req.logical_blocks.astype(np.int64), req.mass.numpy(), visibility)
        return out
