"""Worker side of paged H2O: compact holes out of block tables, and score attention.

vLLM's CPU attention kernel returns no probabilities, so for the query rows the
scheduler asked to score we recompute ``softmax(scale * q K^T)`` over the keys
the kernel attended (read back from the paged cache), sum it over heads, query
rows and the tokens of each block, and accumulate per logical block across all
layers of the step. One :class:`StepScorer` lives for one step.

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


@dataclass
class StepContext:
    """Set by the model runner after it updated its batch, read by the attention builder."""

    req_ids: list[str]  # batch order
    score_from: dict[str, int]  # req_id -> first logical query position to score
    holey: set[str]  # requests with holes in their block table
    scorer: "StepScorer | None" = None


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


class StepScorer:
    """Accumulates one step's attention mass per request and block, over all layers."""

    def __init__(self, block_size: int, key_layout: str):
        self.block_size = block_size
        self.key_layout = key_layout
        self.requests: list[_Scored] = []  # scored one by one (several query rows: prompt chunks)
        self.decodes: list[_Scored] = []  # one query row each: scored together in one padded batch
        self.num_layers = 0
        self._batch = None  # (query rows, block ids [R, n], key mask [R, n * bs], mass [R, n])

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
        rows = torch.tensor([d.query_rows.start for d in self.decodes])
        self._batch = (rows, ids, hidden, torch.zeros(len(self.decodes), width, dtype=torch.float64))

    def _keys(self, pages: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """[kv_heads, blocks * block_size, head_dim] keys of ``block_ids`` in order."""
        k = pages[block_ids]  # [n, kv_heads, block_size, head_dim] as raw memory
        n, kv_heads, bs, head_dim = k.shape
        if self.key_layout == "dt":
            k = k.reshape(n, kv_heads, head_dim, bs).transpose(2, 3)
        return k.permute(1, 0, 2, 3).reshape(kv_heads, n * bs, head_dim)

    def _score_decodes(self, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """All single-row requests at once: one gather, one matmul, one softmax per layer."""
        rows, ids, hidden, mass = self._batch
        k = key_pages[ids]  # [R, n, kv_heads, block_size, head_dim] as raw memory
        reqs, n, kv_heads, bs, head_dim = k.shape
        if self.key_layout == "dt":
            k = k.reshape(reqs, n, kv_heads, head_dim, bs).transpose(3, 4)
        k = k.permute(0, 2, 1, 3, 4).reshape(reqs, kv_heads, n * bs, head_dim).float()
        q = query[rows].float()  # [R, heads, head_dim]
        q = q.view(reqs, kv_heads, q.shape[1] // kv_heads, head_dim)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [R, kv, g, keys]
        logits = logits.masked_fill(hidden[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(dim=(1, 2))  # [R, keys]
        mass += probs.view(reqs, n, bs).sum(dim=2).double()

    def score_layer(self, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """Add one layer's attention mass. ``query``: [tokens, heads, head_dim]."""
        self.num_layers += 1
        if self._batch is not None:
            self._score_decodes(query, key_pages, scale)
        for req in self.requests:
            keys = self._keys(key_pages, req.block_ids)[:, : req.num_keys].float()
            kv_heads = keys.shape[0]
            q_all = query[req.query_rows]
            token_pos = torch.from_numpy(req.token_positions)
            mass = torch.zeros(req.num_keys, dtype=torch.float32)
            for start in range(0, q_all.shape[0], SCORE_CHUNK_ROWS):
                q = q_all[start : start + SCORE_CHUNK_ROWS].float()
                rows, heads, head_dim = q.shape
                q = q.view(rows, kv_heads, heads // kv_heads, head_dim).permute(1, 2, 0, 3)
                logits = torch.matmul(q, keys[:, None].transpose(-1, -2)) * scale  # [kv, g, rows, keys]
                q_pos = torch.from_numpy(req.query_positions[start : start + rows])
                hidden = token_pos[None, :] > q_pos[:, None]
                if hidden.any():
                    logits = logits.masked_fill(hidden, float("-inf"))
                mass += torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))
            padded = torch.zeros(len(req.block_ids) * self.block_size, dtype=torch.float32)
            padded[: req.num_keys] = mass
            req.mass += padded.view(-1, self.block_size).sum(dim=1).double()

    def collect(self) -> dict[str, BlockScores]:
        if self._batch is not None:
            batch_mass = self._batch[3]
            for i, d in enumerate(self.decodes):
                d.mass += batch_mass[i, : len(d.block_ids)]
        out = {}
        for req in self.requests + self.decodes:
            # (query, token) pairs that could see each held token, for every layer scored.
            seen_by = len(req.query_positions) - np.searchsorted(req.query_positions, req.token_positions, side="left")
            per_token = np.zeros(len(req.block_ids) * self.block_size)
            per_token[: req.num_keys] = seen_by
            visibility = per_token.reshape(-1, self.block_size).sum(axis=1) * self.num_layers
            out[req.req_id] = BlockScores(req.logical_blocks.astype(np.int64), req.mass.numpy(), visibility)
        return out
