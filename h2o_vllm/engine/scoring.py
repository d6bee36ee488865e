"""Worker side of paged H2O: score attention for the query rows the scheduler asked for.

vLLM's CPU attention kernel returns no probabilities, so for the query rows the
scheduler asked to score we recompute ``softmax(scale * q K^T)`` over the keys
the kernel attended (read back from the paged cache), sum it over the tokens of
each block, and combine over heads, layers and query rows as the request's
:mod:`~h2o_vllm.engine.reductions` says. One :class:`StepScorer` lives for one step:
a :class:`FusedScorer` (one call of the operator built by ``fused.py`` per layer for
every request) where the operator loads, else a :class:`TorchScorer` (PyTorch
operators: the decodes together, each prompt chunk on its own).

The runner describes the step in a :class:`StepContext` that it hands to its
attention metadata builders; the builder (one call per step) drops the holes
(:mod:`~h2o_vllm.engine.compaction`) and makes the step's scorer and key-norm sums
(:mod:`~h2o_vllm.engine.key_norms`); every layer's attention call feeds them; the
runner collects them after sampling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from h2o_vllm.engine import fused
from h2o_vllm.engine.compaction import Compaction
from h2o_vllm.engine.messages import BlockScores, ScoreRequest
from h2o_vllm.engine.pages import KeyLayout
from h2o_vllm.engine.reductions import REDUCTIONS, Reduction, exp_rows_

if TYPE_CHECKING:
    from h2o_vllm.engine.key_norms import KeyNormSums
    from h2o_vllm.engine.ranks import RankReducer

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


@dataclass
class StepContext:
    """What the H2O model runner tells its attention metadata builders about one step."""

    req_ids: list[str]  # batch order
    score_requests: dict[str, ScoreRequest]  # requests to score (see StepPlan.score_requests)
    with_holes: set[str]  # requests with holes in their block table
    key_norms: set[str] = field(default_factory=set)  # requests whose new keys' norms are summed
    scorer: StepScorer | None = None  # set by the builder, collected by the runner after sampling
    key_norm_sums: KeyNormSums | None = None  # likewise, for the key_norms requests


@dataclass
class ScoredRequest:
    """One request's scored query rows this step, the keys they attend, and its running total."""

    req_id: str
    reduction: Reduction
    query_rows: slice  # rows of the step's query tensor that are scored
    query_positions: np.ndarray  # their logical positions
    block_ids: torch.Tensor  # physical blocks the kernel attends, in order
    logical_blocks: np.ndarray  # logical index of each of those blocks
    num_keys: int  # tokens held (compacted length)
    token_positions: np.ndarray  # logical position of each held token
    total: torch.Tensor | None = None  # what reduction accumulates over the step's layers

    @property
    def num_rows(self) -> int:
        return len(self.query_positions)

    def visibility(self, block_size: int, num_layers: int) -> np.ndarray:
        """(query, token) pairs that could see each held block, over every layer scored."""
        seen_by = self.num_rows - np.searchsorted(self.query_positions, self.token_positions, side="left")
        per_token = np.zeros(len(self.block_ids) * block_size)
        per_token[: self.num_keys] = seen_by
        return per_token.reshape(-1, block_size).sum(axis=1) * num_layers


@dataclass
class DecodeGroup:
    """The decode-batch rows of one reduction, and their running total."""

    reduction: Reduction
    rows: slice | torch.Tensor  # which rows of the batch (all of them: a slice, which copies nothing)
    members: list[int]  # indices into StepScorer.decodes
    total: torch.Tensor


@dataclass
class DecodeBatch:
    """Every single-row request of the step, scored together: one gather, one matmul, one softmax per layer."""

    query_rows: torch.Tensor  # [R] row of each request's query in the step's query tensor
    block_ids: torch.Tensor  # [R * width] physical blocks, each request padded to the widest with block 0
    key_bias: torch.Tensor  # [R, 1, 1, width * block_size]: -inf on the padding keys
    groups: list[DecodeGroup]

    @classmethod
    def of(cls, decodes: list[ScoredRequest], block_size: int) -> DecodeBatch:
        width = max(len(d.block_ids) for d in decodes)
        ids = torch.zeros(len(decodes), width, dtype=torch.long)  # padding: the null block, masked out
        for i, d in enumerate(decodes):
            ids[i, : len(d.block_ids)] = d.block_ids
        num_keys = torch.tensor([d.num_keys for d in decodes])
        hidden = torch.arange(width * block_size)[None, :] >= num_keys[:, None]
        bias = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))[:, None, None, :]
        groups = []
        for reduction in REDUCTIONS.values():
            members = [i for i, d in enumerate(decodes) if d.reduction is reduction]
            if not members:
                continue
            rows = (
                slice(None)
                if len(members) == len(decodes)
                else torch.tensor([d.reduction is reduction for d in decodes])
            )
            groups.append(DecodeGroup(reduction, rows, members, reduction.decode_total(len(members), width)))
        return cls(torch.tensor([d.query_rows.start for d in decodes]), ids.view(-1), bias, groups)


@dataclass
class FusedBatch:
    """Every scored request of the step, for one ``torch.ops.h2o_vllm.score_layer`` call per layer (``fused.py``).

    Requests are segments of flat row and block arrays; the operator adds each
    layer's mass to ``sum_out`` (one float64 per block, ``sum`` requests) or takes
    the maximum into ``max_out`` (one float32 per row and block, ``max`` requests).
    """

    seg_rows: torch.Tensor  # [S + 1] offsets into the row arrays
    seg_blocks: torch.Tensor  # [S + 1] offsets into block_ids and sum_out
    seg_reduce: torch.Tensor  # [S] 0: sum, 1: max
    block_ids: torch.Tensor  # [B] physical blocks each request attends, in order
    row_query: torch.Tensor  # [R] each scored row's token in the step's query tensor
    row_visible: torch.Tensor  # [R] keys it sees (held tokens at or before its position)
    row_out: torch.Tensor  # [R] where its block scores start in max_out (max requests)
    sum_out: torch.Tensor
    max_out: torch.Tensor
    max_offsets: list[int]  # per request, its start in max_out
    op: Callable = field(default_factory=fused.operator)  # a build's score_layer (tests compare several targets)
    attend_op: Callable = field(default_factory=fused.attend_operator)  # the same build's attend_layer

    @classmethod
    def of(cls, requests: list[ScoredRequest]) -> FusedBatch:
        seg_rows, seg_blocks, reduce_, row_query, row_visible, row_out, max_offsets = [0], [0], [], [], [], [], []
        max_size = 0
        for req in requests:
            rows, blocks = req.num_rows, len(req.block_ids)
            seg_rows.append(seg_rows[-1] + rows)
            seg_blocks.append(seg_blocks[-1] + blocks)
            is_max = req.reduction.name == "max"
            reduce_.append(int(is_max))
            row_query.append(np.arange(req.query_rows.start, req.query_rows.stop))
            row_visible.append(np.searchsorted(req.token_positions, req.query_positions, side="right"))
            row_out.append(max_size + np.arange(rows) * blocks)
            max_offsets.append(max_size)
            max_size += rows * blocks if is_max else 0
        as_long = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
        return cls(
            torch.tensor(seg_rows),
            torch.tensor(seg_blocks),
            torch.tensor(reduce_),
            torch.cat([r.block_ids for r in requests]),
            as_long(row_query),
            as_long(row_visible),
            as_long(row_out),
            torch.zeros(seg_blocks[-1], dtype=torch.float64),
            torch.zeros(max(max_size, 1)),
            max_offsets,
        )

    def score_layer(self, query, key_pages, scale, key_layout: KeyLayout, block_size: int) -> None:
        self.op(
            query, key_pages, scale, int(key_layout), block_size, self.seg_rows, self.seg_blocks, self.seg_reduce,
            self.block_ids, self.row_query, self.row_visible, self.row_out, self.sum_out, self.max_out,
        )  # fmt: skip

    def attend_layer(
        self, query, key_pages, value_pages, scale, v_scale, key_layout: KeyLayout, block_size: int, output
    ) -> None:
        """:meth:`score_layer`, and each scored row's attention output into ``output`` ([tokens, heads,
        head_dim], the query's dtype) from the same probabilities; other rows of ``output`` are left as they are.
        ``value_pages``: strided as ``key_pages``, each page [block_size, head_dim] (vLLM's vec kernels)."""
        self.attend_op(
            query, key_pages, value_pages, scale, v_scale, int(key_layout), block_size, self.seg_rows,
            self.seg_blocks, self.seg_reduce, self.block_ids, self.row_query, self.row_visible, self.row_out,
            self.sum_out, self.max_out, output,
        )  # fmt: skip

    def totals(self, requests: list[ScoredRequest]) -> None:
        """Hand each request its accumulated total, shaped as its reduction's ``block_scores`` expects."""
        blocks = self.seg_blocks.tolist()
        for i, req in enumerate(requests):
            b0, b1 = blocks[i], blocks[i + 1]
            if req.reduction.name == "max":
                start = self.max_offsets[i]
                req.total = self.max_out[start : start + req.num_rows * (b1 - b0)].view(req.num_rows, b1 - b0)
            else:
                req.total = self.sum_out[b0:b1]


class StepScorer(ABC):
    """Accumulates one step's attention mass per request and block, over all layers.

    :meth:`for_step` finds the requests to score and makes the implementation:
    :class:`FusedScorer` where the fused operator loads, else :class:`TorchScorer`.
    """

    def __init__(self, block_size: int, key_layout: KeyLayout, prompts: list[ScoredRequest], decodes):
        self.block_size = block_size
        self.key_layout = key_layout
        self.prompts: list[ScoredRequest] = prompts  # several query rows (prompt chunks)
        self.decodes: list[ScoredRequest] = decodes  # one query row each
        self.num_layers = 0
        self.attends = False  # attend_layer in place of vLLM's kernel (set by the attention builder)

    @staticmethod
    def for_step(
        context: StepContext,
        compaction: Compaction,
        query_start_loc: torch.Tensor,
        logical_seq_lens: np.ndarray,
        block_size: int,
        key_layout: KeyLayout,
        use_fused: bool | None = None,
    ) -> StepScorer | None:
        """The step's scorer, or None when nothing is scored; ``use_fused`` None: the operator where it loads."""
        requests = scored_requests(context, compaction, query_start_loc, logical_seq_lens, block_size)
        if not requests:
            return None
        if use_fused is None:
            use_fused = fused.load()
        elif use_fused and not fused.load():
            raise RuntimeError("the fused scoring operator was asked for and does not load (see the log)")
        prompts = [r for r in requests if r.num_rows > 1]
        decodes = [r for r in requests if r.num_rows == 1]
        return (FusedScorer if use_fused else TorchScorer)(block_size, key_layout, prompts, decodes)

    @abstractmethod
    def score_layer(self, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """Add one layer's attention mass. ``query``: [tokens, heads, head_dim]; ``key_pages``:
        [num_blocks, kv_heads, block_size * head_dim] page memory (as float8 for an fp8 cache)."""

    @abstractmethod
    def _hand_totals(self) -> None:
        """Set every request's ``total`` to what it accumulated, as its reduction's ``block_scores`` reads it."""

    def collect(self, reducer: RankReducer | None = None) -> dict[str, BlockScores]:
        """The step's scores, per request: what the scheduler adds to its ledgers (reduced over the
        tensor- and pipeline-parallel ranks by ``reducer`` first, where there are several)."""
        requests = self.prompts + self.decodes
        self._hand_totals()
        num_layers = self.num_layers
        if reducer is not None:
            by_max = [req.reduction.name == "max" for req in requests]
            num_layers = reducer.attention(
                [r.total for r, m in zip(requests, by_max) if not m],
                [r.total for r, m in zip(requests, by_max) if m],
                num_layers,
            )
        return {
            req.req_id: BlockScores(
                req.logical_blocks.astype(np.int64),
                req.reduction.block_scores(req.total).numpy(),
                req.visibility(self.block_size, num_layers),
            )
            for req in requests
        }


def scored_requests(
    context: StepContext,
    compaction: Compaction,
    query_start_loc: torch.Tensor,
    logical_seq_lens: np.ndarray,
    block_size: int,
) -> list[ScoredRequest]:
    """The step's requests with rows to score, in batch order: their rows, and the keys they attend."""
    requests = []
    qsl = query_start_loc.numpy()
    lens = compaction.seq_lens.numpy()
    for row, req_id in enumerate(context.req_ids[: len(logical_seq_lens)]):
        ask = context.score_requests.get(req_id)
        if ask is None:
            continue
        q_start, q_end = int(qsl[row]), int(qsl[row + 1])
        seq_len = int(logical_seq_lens[row])
        positions = np.arange(seq_len - (q_end - q_start), seq_len)
        skip = int(np.searchsorted(positions, ask.first_position))
        if skip >= len(positions):
            continue
        num_keys = int(lens[row])
        num_blocks = -(-num_keys // block_size)
        logical = compaction.kept_blocks.get(row)
        if logical is None:
            logical = np.arange(num_blocks)
        token_positions = (logical[:, None] * block_size + np.arange(block_size)).reshape(-1)[:num_keys]
        requests.append(
            ScoredRequest(
                req_id,
                REDUCTIONS[ask.reduce],
                slice(q_start + skip, q_end),
                positions[skip:],
                compaction.block_table[row, :num_blocks].long().clone(),
                logical,
                num_keys,
                token_positions,
            )
        )
    return requests


class FusedScorer(StepScorer):
    """One call of the fused operator per layer scores every request of the step (``fused.py``)."""

    def __init__(self, block_size, key_layout, prompts, decodes):
        super().__init__(block_size, key_layout, prompts, decodes)
        self.fused_batch = FusedBatch.of(prompts + decodes)

    def score_layer(self, query, key_pages, scale):
        self.num_layers += 1
        self.fused_batch.score_layer(query, key_pages, scale, self.key_layout, self.block_size)

    def attend_layer(self, query, key_pages, value_pages, scale, v_scale, output):
        """:meth:`score_layer` and the scored rows' attention output, in one pass (``FusedBatch.attend_layer``)."""
        self.num_layers += 1
        self.fused_batch.attend_layer(
            query, key_pages, value_pages, scale, v_scale, self.key_layout, self.block_size, output
        )

    def _hand_totals(self):
        self.fused_batch.totals(self.prompts + self.decodes)


class TorchScorer(StepScorer):
    """PyTorch operators: the decodes together in a :class:`DecodeBatch`, each prompt chunk on its own."""

    def __init__(self, block_size, key_layout, prompts, decodes):
        super().__init__(block_size, key_layout, prompts, decodes)
        for req in prompts:
            req.total = req.reduction.prompt_total(req.num_rows, req.num_keys, block_size)
        self.decode_batch = DecodeBatch.of(decodes, block_size) if decodes else None

    def score_layer(self, query, key_pages, scale):
        self.num_layers += 1
        if self.decode_batch is not None:
            self._score_decodes(self.decode_batch, query, key_pages, scale)
        for req in self.prompts:
            self._score_prompt(req, query, key_pages, scale)

    def _hand_totals(self):
        for group in self.decode_batch.groups if self.decode_batch is not None else ():
            for i, member in enumerate(group.members):
                d = self.decodes[member]
                d.total = group.total[i, ..., : len(d.block_ids)]

    def _keys_t(self, pages: torch.Tensor, block_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
        """float32 K^T of ``block_ids`` (``num_seqs`` equal-length lists, flattened): [seqs, kv_heads, head_dim, keys].

        ``pages`` is [num_blocks, kv_heads, block_size * head_dim] page memory (as float8
        for an fp8 cache); one index_select copies whole pages (a fast memcpy), one copy
        puts keys in order and converts them to float32 (scores are computed in float32
        whatever the model's and the cache's dtype).
        """
        k = torch.index_select(
            pages, 0, block_ids, out=_scratch.get("pages", (len(block_ids), *pages.shape[1:]), pages.dtype)
        )
        ordered = self.key_layout.keys_t(k, num_seqs, self.block_size)
        out = _scratch.get("keys", ordered.shape).copy_(ordered)
        n, head_dim = len(block_ids) // num_seqs, pages.shape[2] // self.block_size
        return out.view(num_seqs, pages.shape[1], head_dim, n * self.block_size)

    def _score_decodes(self, batch: DecodeBatch, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        reqs = len(batch.query_rows)
        k_t = self._keys_t(key_pages, batch.block_ids, reqs)  # [R, kv, d, keys]
        kv_heads, head_dim = k_t.shape[1], k_t.shape[2]
        q = query[batch.query_rows].float().mul_(scale).view(reqs, kv_heads, -1, head_dim)  # [R, kv, g, d]
        logits = torch.matmul(q, k_t).add_(batch.key_bias).view(reqs, -1, k_t.shape[-1])  # [R, heads, keys]
        inverse = exp_rows_(logits)
        for group in batch.groups:
            group.reduction.add_decodes(group.total, logits[group.rows], inverse[group.rows], self.block_size)

    def _score_prompt(self, req: ScoredRequest, query: torch.Tensor, key_pages: torch.Tensor, scale: float) -> None:
        """Rows of one request's prompt chunk, SCORE_CHUNK_ROWS at a time, each over the keys it can see."""
        k_t = self._keys_t(key_pages, req.block_ids, 1)[0]  # [kv, d, keys]
        kv_heads, head_dim = k_t.shape[0], k_t.shape[1]
        q_all = query[req.query_rows]
        layer = req.reduction.prompt_layer(req.total, k_t.shape[-1])
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
            req.reduction.add_prompt_rows(layer, x, inverse, slice(start, start + len(q_pos)), self.block_size)
        req.reduction.end_prompt_layer(req.total, layer, self.block_size)
