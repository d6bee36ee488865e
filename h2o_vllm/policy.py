"""Eviction policies: which KV blocks of one sequence to drop. No engine, no torch.

The unit is a *block* of ``block_size`` consecutive logical token positions
(``block_size=1`` is token-level H2O as in the paper; 32 is the vLLM engine's
block). A policy looks at one sequence at a time through a :class:`SequenceView`
and returns the logical indices of the blocks to evict now. Every engine (the
Hugging Face cache, the vLLM scheduler) calls the same code, so they can only
differ in the scores they feed in.

Rules shared by every policy:

- Only *resident*, *full* blocks can be evicted. The last, partly written
  block never is.
- *Sink* blocks (those holding the first ``n_sink`` tokens) and *recent* blocks
  (those holding the last ``n_recent`` tokens) are never evicted.
- The budget is a number of blocks: ``floor(budget_tokens / block_size)``,
  where ``budget_tokens`` is a token count or a fraction of the sequence's
  current length. After eviction a sequence holds at most
  ``max(budget_blocks, protected_blocks)`` blocks: protected blocks win when
  the budget is smaller than sinks plus recent window.

Tie-breaking is deterministic: among equal scores, the older block (lower
index) is evicted first, so a policy's choice depends on the scores only.

What a block's score is depends on the policy's ``score_source``: ``"attention"``
(H2O: the attention mass its tokens receive, added by every query that sees
them), ``"key_norm"`` (key-norm eviction: the L2 norms of its tokens' keys,
added once, when each key is written) or None (StreamingLLM: positions only).
Engines compute only what a request's policy reads.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

# How a block's accumulated score is normalised before ranking: "sum" (the paper) or "mean":
# divided by how many queries could see it (as kvpress and OpenVINO do), so age is no advantage.
SCORE_NORMS = ("sum", "mean")
# How engines combine heads and layers into one block score (the policy only sees the result):
# "sum" as in the paper, or "max": each query's largest mass from one head of one layer.
SCORE_REDUCE = ("sum", "max")
# When a prompt is compressed: "whole" once it is all in the cache (the paper), "chunked" after
# every prefill chunk, so its KV stays near the budget from its first tokens; "staged" after every
# chunk to a working set of ``working_set`` times the budget, then to the budget once the prompt's
# last rows (the question) have scored everything kept.
PREFILL_MODES = ("whole", "chunked", "staged")
# What a policy ranks blocks by (EvictionPolicy.score_source); None: positions only.
ATTENTION, KEY_NORM = "attention", "key_norm"
SCORE_SOURCES = (None, ATTENTION, KEY_NORM)
# Prefill "staged": what ranks the working set before the question is in: the attention of each
# chunk's last rows (ATTENTION), or the norms of the keys (KEY_NORM: lowest kept, no question needed);
# AUTO: KEY_NORM wherever it can rank (PolicyConfig.staging_score), which kept far more needles
# (results/ruler/needle-survival).
AUTO = "auto"
PREFILL_SCORES = (AUTO, ATTENTION, KEY_NORM)


class PolicyConfigError(ValueError):
    """A configuration value that is out of range; ``field`` names the :class:`PolicyConfig` attribute."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Budget:
    """How much KV a sequence may keep: a token count, or a fraction of its current length."""

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.fraction is None):
            raise ValueError("Budget needs exactly one of tokens or fraction")
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or int(self.tokens) != self.tokens or self.tokens < 1
        ):
            raise ValueError(f"budget tokens must be a positive integer, got {self.tokens!r}")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):  # also rejects NaN
            raise ValueError(f"budget fraction must be in (0, 1], got {self.fraction!r}")

    @classmethod
    def parse(cls, value: Budget | int | float | str) -> Budget:
        """``256`` or ``"256"`` -> 256 tokens; ``0.2``, ``"0.2"`` or ``"20%"`` -> 20% of the sequence.

        A float up to 1.0 is a fraction (``1.0`` = the whole sequence); integers are tokens.
        """
        if isinstance(value, Budget):
            return value
        if not isinstance(value, (str, numbers.Real)):
            raise ValueError(f"budget must be a number or a string such as '20%', got {value!r}")
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    return cls(fraction=float(text[:-1]) / 100.0)
                value = float(text)
            except ValueError:
                raise ValueError(
                    f"budget must be tokens (256), a fraction (0.2) or a percentage ('20%'), got {value!r}"
                ) from None
        if isinstance(value, bool):
            raise ValueError(f"budget must be a number, got {value!r}")
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            raise ValueError(f"budget must be finite, got {value!r}")
        if isinstance(value, float) and value <= 1.0:
            return cls(fraction=value)
        if float(value) != int(value):
            raise ValueError(f"a budget of {value!r}: use a fraction below 1 or a whole token count")
        return cls(tokens=int(value))

    def tokens_for(self, num_tokens: int) -> int:
        if self.tokens is not None:
            return self.tokens
        return int(math.floor(self.fraction * num_tokens))

    def blocks_for(self, num_tokens: int, block_size: int) -> int:
        return self.tokens_for(num_tokens) // block_size

    def __str__(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.fraction:.0%}"


@dataclass(frozen=True)
class PolicyConfig:
    """Everything that decides one sequence's evictions, in every engine: the one configuration type.

    The engine's server defaults, a request's ``h2o_*`` overrides, the transformers
    cache, the evaluation and the benchmarks all build one of these
    (:mod:`h2o_vllm.settings` parses its HTTP, CLI and environment forms,
    :mod:`h2o_vllm.names` its names). Values are checked here and nowhere else.
    """

    policy: str = "h2o"
    budget: Budget = Budget(fraction=0.2)
    n_sink: int = 4  # tokens
    n_recent: int | None = None  # tokens; None = half of what the budget leaves after the sinks
    block_size: int = 1  # tokens per eviction unit: 1 = token-level (the paper), 32 = the vLLM engine's block
    score_norm: str = "sum"  # one of SCORE_NORMS
    prompt_window: int | None = None  # None: every prompt query row scores (the paper); W: only the last W
    score_reduce: str = "sum"  # one of SCORE_REDUCE
    prefill: str = "whole"  # one of PREFILL_MODES
    working_set: int = 2  # prefill "staged": budgets kept while the prompt prefills
    prefill_score: str = AUTO  # prefill "staged": what ranks the working set (one of PREFILL_SCORES)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise PolicyConfigError(
                "policy", f"unknown policy {self.policy!r}; choose one of {', '.join(sorted(POLICIES))}"
            )
        if not isinstance(self.budget, Budget):
            raise PolicyConfigError("budget", f"budget must be a Budget, got {self.budget!r}")
        for name, value, minimum in (
            ("n_sink", self.n_sink, 0),
            ("n_recent", self.n_recent, 0),
            ("block_size", self.block_size, 1),
            ("prompt_window", self.prompt_window, 1),
            ("working_set", self.working_set, 1),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            ):
                raise PolicyConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
        if self.score_norm not in SCORE_NORMS:
            raise PolicyConfigError("score_norm", f"must be 'sum' or 'mean', got {self.score_norm!r}")
        if self.score_reduce not in SCORE_REDUCE:
            choices = ", ".join(repr(r) for r in SCORE_REDUCE)
            raise PolicyConfigError("score_reduce", f"must be one of {choices}, got {self.score_reduce!r}")
        if self.prefill not in PREFILL_MODES:
            choices = ", ".join(repr(m) for m in PREFILL_MODES)
            raise PolicyConfigError("prefill", f"must be one of {choices}, got {self.prefill!r}")
        if self.prefill_score not in PREFILL_SCORES:
            choices = ", ".join(repr(m) for m in PREFILL_SCORES)
            raise PolicyConfigError("prefill_score", f"must be one of {choices}, got {self.prefill_score!r}")
        if self.prefill_score == KEY_NORM and not self._staging_can_rank_by_keys:
            raise PolicyConfigError(
                "prefill_score",
                "'key_norm' ranks a staged working set until the prompt's last rows score it: it needs "
                "prefill 'staged', an attention policy (h2o) and a prompt window",
            )
        POLICIES[self.policy].check(self)

    def replace(self, **changes) -> PolicyConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    @property
    def score_source(self) -> str | None:
        """What this policy ranks blocks by: "attention", "key_norm" or None (positions only)."""
        return POLICIES[self.policy].score_source

    @property
    def needs_scores(self) -> bool:
        """Whether this policy ranks blocks by attention scores (engines skip scoring otherwise)."""
        return self.score_source == ATTENTION

    @property
    def needs_key_norms(self) -> bool:
        """Whether this policy ranks blocks by their keys' norms (engines compute them only then)."""
        return self.score_source == KEY_NORM

    @property
    def uses_key_norms(self) -> bool:
        """Whether engines compute this policy's key norms at some point: it ranks by them, or its staged
        working set does (:attr:`staging_score`)."""
        return self.needs_key_norms or self.staging_score == KEY_NORM

    @property
    def staging_score(self) -> str:
        """What ranks a "staged" working set before the prompt's last rows: ``prefill_score``, with
        "auto" read as key norms where they can (prefill "staged", an attention policy, a prompt
        window), attention elsewhere (where it ranks nothing but chunks, or nothing at all)."""
        if self.prefill_score != AUTO:
            return self.prefill_score
        return KEY_NORM if self._staging_can_rank_by_keys else ATTENTION

    @property
    def _staging_can_rank_by_keys(self) -> bool:
        """Prefill "staged" of an attention policy with a prompt window: its last rows reset the norms."""
        return self.prefill == "staged" and self.needs_scores and self.prompt_window is not None

    @property
    def compresses_while_prefilling(self) -> bool:
        """Whether a prompt is compressed between its prefill chunks ("chunked", "staged")."""
        return self.prefill != "whole"

    def prefilling_budget_blocks(self, num_prompt_tokens: int) -> int:
        """Blocks a prompt of ``num_prompt_tokens`` keeps between its chunks with prefill "staged":
        ``working_set`` times its budget, the budget taken of the whole prompt."""
        return self.working_set * self.budget.blocks_for(num_prompt_tokens, self.block_size)

    def recent_tokens(self, num_tokens: int) -> int:
        if self.n_recent is not None:
            return self.n_recent
        return max(0, self.budget.tokens_for(num_tokens) - self.n_sink) // 2

    def bounds(self, num_tokens: int, num_prompt_tokens: int | None = None) -> Bounds:
        """What an eviction of a sequence of ``num_tokens`` tokens may touch and how far it goes.

        With prefill "staged", a sequence still short of its ``num_prompt_tokens`` keeps its
        working set (:meth:`prefilling_budget_blocks`); sinks and recent window are as ever.
        """
        bs = self.block_size
        recent = self.recent_tokens(num_tokens)
        full_blocks = num_tokens // bs
        first_recent = max(0, (num_tokens - recent) // bs) if recent > 0 else full_blocks
        staging = self.staging(num_tokens, num_prompt_tokens)
        return Bounds(
            budget_blocks=(
                self.prefilling_budget_blocks(num_prompt_tokens) if staging else self.budget.blocks_for(num_tokens, bs)
            ),
            sink_blocks=-(-self.n_sink // bs),
            protected_from=min(first_recent, full_blocks),
        )

    def first_scored_position(self, chunk_start: int, chunk_end: int, num_prompt_tokens: int) -> int:
        """The first of the query positions ``[chunk_start, chunk_end)`` computed together whose attention is scored.

        Without a prompt window every row scores. With a window of W rows, the prompt
        scores only its last W rows ("whole"), or the last W rows of each prefill chunk
        ("chunked", so that the cost of a prompt grows linearly with its length), or both
        ("staged": each chunk's last W rows, and the prompt's last W rows even where they
        span two chunks); rows after the prompt (decoding) score unless the policy says they
        do not (:attr:`EvictionPolicy.scores_decoding`). ``chunk_end`` is returned when none does.
        """
        if chunk_start >= num_prompt_tokens and not POLICIES[self.policy].scores_decoding:
            return chunk_end
        if self.prompt_window is None:
            return chunk_start
        window_start = max(0, num_prompt_tokens - self.prompt_window)
        if self.prefill == "staged" and chunk_end > window_start:
            return max(chunk_start, window_start)
        if self.prefill != "whole":
            return max(chunk_start, chunk_end - self.prompt_window)
        return max(chunk_start, min(chunk_end, num_prompt_tokens - self.prompt_window))

    def ranks_by_keys(self, num_tokens: int, num_prompt_tokens: int | None) -> bool:
        """With key norms ranking the working set (:attr:`staging_score`): whether a sequence whose
        first ``num_tokens`` are computed is ranked by its keys' norms (lowest kept), and a chunk
        ending there adds its keys' norms instead of attention: until the chunk that holds the
        first of the prompt's scored rows, which starts the scores from zero (:meth:`resets_scores`)."""
        if self.staging_score != KEY_NORM or num_prompt_tokens is None:
            return False
        return num_tokens <= max(0, num_prompt_tokens - self.prompt_window)

    def staging(self, num_tokens: int, num_prompt_tokens: int | None) -> bool:
        """Whether a sequence of ``num_tokens`` is still filling a "staged" working set."""
        return self.prefill == "staged" and num_prompt_tokens is not None and num_tokens < num_prompt_tokens

    def resets_scores(self, chunk_start: int, chunk_end: int, num_prompt_tokens: int) -> bool:
        """Whether a sequence's accumulated scores are dropped before the rows ``[chunk_start, chunk_end)`` add theirs.

        With prefill "staged" and a prompt window of W rows, the prompt's last W rows alone
        rank what the working set kept, as "whole" ranks the whole prompt: the chunk that
        holds the first of them starts from zero. Rows that score later (decoding) add as ever.
        """
        if self.prefill != "staged" or not self.needs_scores or self.prompt_window is None:
            return False
        window_start = max(0, num_prompt_tokens - self.prompt_window)
        return chunk_start <= window_start < chunk_end

    def evicts_after(self, num_computed_tokens: int, num_tokens: int) -> bool:
        """Whether a sequence with ``num_computed_tokens`` of its ``num_tokens`` in the cache is compressed now.

        "whole": once every known token but the newest is in the cache (a prompt is
        compressed once it is all prefilled); "chunked" and "staged": after every prefill
        chunk too.
        """
        if self.compresses_while_prefilling:
            return num_computed_tokens > 0
        return num_computed_tokens >= num_tokens - 1


@dataclass(frozen=True)
class Bounds:
    """One eviction's limits for one sequence (:meth:`PolicyConfig.bounds`).

    A sequence keeps at most ``budget_blocks`` blocks; blocks below ``sink_blocks`` (the sinks)
    and from ``protected_from`` on (the recent window and the partly written block) stay.
    Engines that decide for a whole batch at once hold each field as a tensor of rows.
    """

    budget_blocks: int
    sink_blocks: int
    protected_from: int

    def protected(self, blocks):
        """Which of ``blocks`` (logical indices: a numpy array or a torch tensor) may not be evicted now."""
        return (blocks < self.sink_blocks) | (blocks >= self.protected_from)


@dataclass
class SequenceView:
    """What a policy sees of one sequence. Arrays are indexed by logical block."""

    num_tokens: int  # logical tokens with KV written (positions 0 .. num_tokens-1)
    resident: np.ndarray  # bool: the block's KV is still in memory
    scores: np.ndarray  # accumulated score per block: attention mass or key norms (see EvictionPolicy.score_source)
    visibility: np.ndarray | None = None  # number of (query, token) pairs that could attend each block
    num_prompt_tokens: int | None = None  # the prompt's length, where the budget depends on it ("staged")

    @classmethod
    def fresh(cls, num_tokens: int, block_size: int, scores=None, visibility=None) -> SequenceView:
        n = -(-num_tokens // block_size)
        return cls(
            num_tokens,
            np.ones(n, dtype=bool),
            np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64),
            None if visibility is None else np.asarray(visibility, dtype=np.float64),
        )


def protected_mask(cfg: PolicyConfig, num_tokens: int, num_blocks: int) -> np.ndarray:
    """Blocks that may never be evicted now: sinks, recent window, and the unfilled tail."""
    return cfg.bounds(num_tokens).protected(np.arange(num_blocks))


class EvictionPolicy(ABC):
    """One eviction rule: a plug-in that says what it ranks blocks by and in which order they go.

    A policy declares its :attr:`score_source` (what engines compute for it) and its
    :meth:`order_key`; every engine applies the shared rules (budget, sinks, recent window,
    only full resident blocks, ties to the older block) around them: :meth:`select` here for
    one sequence with numpy, the fast transformers cache for a batch on the device. Adding a
    policy is a subclass in this module and its entry in :data:`POLICIES`.
    """

    name: ClassVar[str]
    # What the scores it ranks by are (one of SCORE_SOURCES); engines compute them only for such policies.
    score_source: ClassVar[str | None] = None
    # Attention scores only: whether the rows after the prompt (generated tokens) add to them.
    scores_decoding: ClassVar[bool] = True

    def __init__(self, config: PolicyConfig):
        self.config = config

    @classmethod
    def check(cls, config: PolicyConfig) -> None:
        """Refuse settings this policy cannot honour (raise :class:`PolicyConfigError`); most take every one."""
        return None

    def select(self, view: SequenceView) -> list[int]:
        """Logical indices (ascending) of the blocks to evict now."""
        bounds = self.config.bounds(view.num_tokens, view.num_prompt_tokens)
        excess = int(view.resident.sum()) - bounds.budget_blocks
        if excess <= 0:
            return []
        candidates = np.flatnonzero(view.resident & ~bounds.protected(np.arange(len(view.resident))))
        if len(candidates) == 0:
            return []
        visibility = None if view.visibility is None else view.visibility[candidates]
        if self.config.ranks_by_keys(view.num_tokens, view.num_prompt_tokens):
            key = -view.scores[candidates]  # the working set keeps the lowest key norms (as KeyNorm does)
        else:
            key = self.order_key(view.scores[candidates], candidates, visibility)
        # A stable sort of the ascending candidates: among equal keys the older block goes first.
        order = candidates[np.argsort(key, kind="stable")]
        return sorted(int(i) for i in order[:excess])

    @abstractmethod
    def order_key(self, scores, blocks, visibility):
        """What candidates are evicted by, lowest first (ties: the older block).

        ``scores``, ``blocks`` (logical indices) and ``visibility`` (None unless the
        configuration's ``score_norm`` needs it) are numpy arrays or torch tensors of the
        same shape: write it with operations both have.
        """


class NoEviction(EvictionPolicy):
    """The full cache: never evicts."""

    name = "none"

    def select(self, view: SequenceView) -> list[int]:
        return []

    def order_key(self, scores, blocks, visibility):
        return blocks


class StreamingLLM(EvictionPolicy):
    """Sinks + the most recent blocks (Xiao et al., 2023): the oldest non-sink block goes first."""

    name = "streaming"

    def order_key(self, scores, blocks, visibility):
        return blocks


class H2O(EvictionPolicy):
    """Sinks + recent window + heavy hitters: the lowest accumulated score goes first."""

    name = "h2o"
    score_source = ATTENTION

    def order_key(self, scores, blocks, visibility):
        if self.config.score_norm == "mean":
            if visibility is None:
                raise ValueError("score_norm='mean' needs visibility counts")
            return scores / visibility.clip(min=1.0)
        return scores


class SnapKV(H2O):
    """Sinks + recent window + the blocks the prompt's last rows attend to most (after SnapKV,
    Li et al., 2024): H2O whose votes come from the prompt alone.

    The prompt's rows score as H2O's do (with ``prompt_window`` W, its last W rows: SnapKV's
    observation window; ``score_reduce`` as configured); generated tokens add nothing, so
    what the prompt chose stays chosen and a generated block, scored 0, is the first to go
    once it leaves the recent window. SnapKV's pooling of scores over neighbouring positions
    is left out: a block already sums its tokens. A chunk that runs past the prompt (a
    preempted request recomputing its output) scores whole.
    """

    name = "snapkv"
    scores_decoding = False


class KeyNorm(EvictionPolicy):
    """Sinks + recent window + the blocks of lowest key norm (after PagedEviction, arXiv 2509.04377).

    A block's score is the sum, over layers, KV heads and its tokens, of the L2 norms of
    its keys as stored in the cache (after RoPE), each key counted once, when written: no
    attention scores, so nothing to recompute and no kernel that must return probabilities.
    Keys of low norm tend to receive more attention (the premise of L2-norm eviction), so
    the highest sum goes first; among ties the older block. Only full blocks are
    evictable, so the sum ranks as a mean would (``score_norm="mean"`` is refused;
    ``prompt_window`` and ``score_reduce`` shape attention scoring and are ignored).
    """

    name = "keynorm"
    score_source = KEY_NORM

    @classmethod
    def check(cls, config: PolicyConfig) -> None:
        if config.score_norm == "mean":
            raise PolicyConfigError(
                "score_norm",
                f"'mean' divides attention by the queries that saw a block; {cls.name} ranks by key norms "
                "(each key counted once): use 'sum'",
            )

    def order_key(self, scores, blocks, visibility):
        return -scores


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (H2O, SnapKV, KeyNorm, StreamingLLM, NoEviction)}


def make_policy(config: PolicyConfig) -> EvictionPolicy:
    return POLICIES[config.policy](config)
