"""What the reference and the fast transformers caches share: the configuration they score and
evict by, how a model is switched to the ``h2o_`` attention, and the hand-off to it."""

from __future__ import annotations

from abc import abstractmethod

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from h2o_vllm.hf import attention
from h2o_vllm.policy import PolicyConfig


class EvictingCache(Cache):
    """A transformers ``Cache`` whose layers' attention calls :meth:`attend`, which scores and evicts.

    ``policy_config`` is one configuration for every batch row or, where the subclass
    allows it, a list of one per row. With ``per_layer=False`` (the default, as paging
    requires) one decision after the last layer holds for all layers; with ``per_layer``
    each layer decides alone, and with ``per_head`` as well each KV head of each layer.
    """

    def __init__(
        self,
        layers,
        policy_config: PolicyConfig | list[PolicyConfig],
        *,
        per_layer: bool = False,
        per_head: bool = False,
        score_chunk: int = 256,
    ):
        if per_head and not per_layer:
            raise ValueError(
                "per_head needs per_layer=True: a KV head of one layer has nothing to share with another layer's"
            )
        super().__init__(layers=layers)
        self.policy_config = policy_config
        configs = policy_config if isinstance(policy_config, list) else [policy_config]
        scored = [c for c in configs if c.needs_scores]
        if len({(c.prompt_window, c.score_reduce, c.prefill) for c in scored}) > 1:
            raise ValueError(
                f"the scored rows of one {type(self).__name__} must share prompt_window, score_reduce and prefill"
            )
        # How attention is scored (prompt window, score reduction): the scored rows' common settings.
        self.scoring: PolicyConfig | None = scored[0] if scored else None
        # Some row ranks by its keys' norms (always, or while a staged working set fills).
        self.key_norms = any(c.uses_key_norms for c in configs)
        self.evicts = any(c.policy != "none" for c in configs)
        self.per_layer = per_layer
        self.per_head = per_head
        # A "row" is a batch row, or with per_head a (batch row, KV head) pair: index b * rows_per_sequence + h.
        self.rows_per_sequence = 1  # the number of KV heads with per_head
        self.score_chunk = score_chunk
        self.padding: torch.Tensor | None = None  # [rows] left-padding tokens per row
        # The prompt's length, left padding included: the first forward's, unless declare_prompt said more.
        self.prompt_tokens = 0
        self._declared_prompt_tokens: int | None = None

    @classmethod
    def for_model(cls, model, policy_config: PolicyConfig, **kwargs):
        """A cache for ``model``, whose attention is switched to the h2o_ wrapper if it is not yet.

        The wrapper runs the model's own eager or SDPA attention, unchanged when no
        evicting cache is in play, so the switch is harmless for other uses of the model.
        """
        attention.register()
        wanted = attention.h2o_name(model.config._attn_implementation)
        if model.config._attn_implementation != wanted:
            model.set_attn_implementation(wanted)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(policy_config, config.num_hidden_layers, **kwargs)

    def declare_prompt(self, num_tokens: int) -> None:
        """Say, before the first forward, that the prompt has ``num_tokens`` tokens (left padding
        included) and will come in several forwards (chunked prefill, :func:`h2o_vllm.hf.prefill`);
        otherwise the first forward is taken to be the whole prompt. Which rows score may depend
        on where the prompt ends (:meth:`PolicyConfig.first_scored_position`). Of several
        declarations the longest counts."""
        self._declared_prompt_tokens = max(num_tokens, self._declared_prompt_tokens or 0)

    def _prompt_length(self, first_forward: int) -> int:
        return max(first_forward, self._declared_prompt_tokens or 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0

    @abstractmethod
    def resident_tokens(self) -> torch.Tensor:
        """[batch] KV tokens each batch row holds, averaged over layers (and KV heads with per_head)."""

    @abstractmethod
    def attend(
        self, module, base_attention, query, key, value, attention_mask, scaling, dropout, additive_mask, **kwargs
    ):
        """Run ``base_attention`` over what the layer holds, then score and evict; returns its (output, weights)."""


class EvictingLayer(CacheLayerMixin):
    """What every evicting cache's layer says to transformers: ``seen`` positions so far, no fixed
    length, no compiling, cropping or beam search."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    seen = 0  # positions handed out so far (what generation counts as cache length)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("evicting caches (H2OCache, FastH2OCache) do not support beam search")


def left_padding(attention_mask, batch: int, q_len: int) -> torch.Tensor:
    """Leading padding tokens per row, read from the mask transformers built for the first forward."""
    if attention_mask is None or attention_mask.dim() != 4:
        return torch.zeros(batch, dtype=torch.long)
    last_row = attention_mask[:, 0, -1, -q_len:]
    visible = last_row if last_row.dtype == torch.bool else last_row == 0
    if visible.shape[0] != batch:
        visible = visible.expand(batch, -1)
    # Padding sits on the left: count the leading invisible columns.
    return (visible.cumsum(dim=1) == 0).sum(dim=1).long().cpu()
