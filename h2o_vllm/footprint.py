"""How many KV blocks a sequence holds under a policy configuration: what an eviction keeps,
what admission reserves, what the door checks, and how much of a prefix-cache hit a request may
take without changing its decisions.

:mod:`h2o_vllm.policy` decides which blocks go; this module is the block arithmetic that follows
from those rules, shared by the vLLM engine (the scheduler's admission and prefix-cache cap, the
KV cache spec, the door in patches/request_validation.py) and the transformers fast cache (its
page plan). Integer arithmetic on a :class:`PolicyConfig`; no engine, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2o_vllm.policy import PolicyConfig


@dataclass(frozen=True)
class Footprint:
    """The block arithmetic of one configuration (``Footprint(config).peak_blocks(...)``)."""

    config: PolicyConfig

    def kept_blocks(self, num_tokens: int, prefilling: bool = False) -> int:
        """The most blocks an eviction leaves a sequence of up to ``num_tokens``: its budget, or the
        sinks, the recent window and the partly written block if they are more. ``prefilling``:
        between prefill chunks, where prefill "staged" keeps its working set instead of the budget."""
        bs = self.config.block_size
        protected = -(-self.config.n_sink // bs) + -(-self.config.recent_tokens(num_tokens) // bs) + 2
        if prefilling and self.config.prefill == "staged":
            return max(self.config.prefilling_budget_blocks(num_tokens), protected)
        return max(self.config.budget.blocks_for(num_tokens, bs), protected)

    def peak_blocks(self, max_tokens: int, chunk_tokens: int, prefilling: bool = True) -> int | None:
        """The most blocks a sequence of up to ``max_tokens`` holds at once, prefilled ``chunk_tokens`` at a time.

        With prefill "chunked" or "staged": what an eviction keeps between chunks (the budget,
        "staged" its working set, or the sinks, the recent window and the partly written block
        if they are more), plus the new blocks of the next chunk: ``ceil(chunk_tokens /
        block_size)``, as the chunk first fills the partly written block it continues. Once
        the prompt is in (``prefilling`` False), what an eviction keeps is the budget and a
        decoding request takes one block at a time (``chunk_tokens`` 1). None where it is not
        bounded below the whole sequence (no eviction, or a prompt prefilled whole before it
        is compressed).
        """
        if self.config.policy == "none" or not self.config.compresses_while_prefilling:
            return None
        return self.kept_blocks(max_tokens, prefilling) + -(-chunk_tokens // self.config.block_size)

    def most_blocks(self, num_prompt_tokens: int, max_new_tokens: int, chunk_tokens: int) -> int:
        """The most blocks one request (a prompt and up to ``max_new_tokens``) holds at once, over its life.

        No eviction: all of it. Prefill "whole": its whole prompt, then what an eviction
        keeps plus the block being written. "chunked" and "staged": :meth:`peak_blocks`.
        """
        bs = self.config.block_size
        total = num_prompt_tokens + max_new_tokens
        full = -(-total // bs)
        if self.config.policy == "none":
            return full
        peak = self.peak_blocks(total, chunk_tokens)
        if peak is None:
            peak = max(-(-num_prompt_tokens // bs), self.kept_blocks(total) + 1)
        return min(peak, full)

    def can_evict(self, num_prompt_tokens: int, max_new_tokens: int | None) -> bool:
        """Whether a request of ``num_prompt_tokens`` and up to ``max_new_tokens`` (None: unknown) may ever evict.

        A token budget that covers the whole request never evicts: then scoring is wasted work.
        """
        if self.config.policy == "none":
            return False
        budget = self.config.budget.tokens
        return budget is None or max_new_tokens is None or budget < num_prompt_tokens + max_new_tokens

    def max_prefix_hit(self, num_prompt_tokens: int, longest_tokens: int) -> int | None:
        """The most prompt tokens an evicting request may take from a prefix cache (None: no limit).

        A hit skips its tokens' queries, so only what they would have decided may depend on it:
        - prefill "chunked": what an eviction keeps (:meth:`kept_blocks` of ``longest_tokens``),
          so that the hit plus the first chunk stays within :meth:`peak_blocks`;
        - "staged": the same with its working set, and with a prompt window of W rows no
          further than the block boundary at or before ``num_prompt_tokens - W``, so the
          window's rows run (their chunk resets the scores and ranks what was kept);
        - "whole" with a prompt window of W rows: up to the last block boundary at or before
          ``num_prompt_tokens - W``, so the window's rows always run and see every key, and a
          hit decides as a miss does;
        - "whole" with every prompt row scoring (the paper): no limit. The rows that run (those
          after the hit) score, so a hit of H tokens decides as a miss with ``prompt_window``
          ``num_prompt_tokens - H`` would;
        - StreamingLLM ("whole"): no limit, its choice depends on positions only;
        - key norms (either prefill, or ranking a staged working set): no hit at all (0). A hit
          skips computing its tokens' keys, so their norms would be missing from the ledger and
          the hit blocks would look the least important of all; a hit decides as a miss does only
          if the request computes every key itself. (Remembering each cached block's norms
          would need a store keyed by block hash that lives as long as the prefix cache's
          blocks; the request still offers its blocks to the prefix cache for requests of
          other policies.)
        Hits are whole blocks, so every limit is a multiple of ``block_size``.
        """
        bs = self.config.block_size
        if self.config.uses_key_norms:
            return 0
        window = self.config.prompt_window if self.config.needs_scores else None
        before_window = None if window is None else max(0, num_prompt_tokens - window) // bs * bs
        if self.config.prefill == "chunked":
            return self.kept_blocks(longest_tokens) * bs
        if self.config.prefill == "staged":
            working_set = self.kept_blocks(longest_tokens, prefilling=True) * bs
            return working_set if before_window is None else min(working_set, before_window)
        return before_window
