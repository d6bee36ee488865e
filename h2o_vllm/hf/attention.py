"""Attention functions that let an evicting cache (:class:`~h2o_vllm.hf.base.EvictingCache`) score and evict.

Registered with transformers' ``AttentionInterface`` as ``h2o_eager`` and
``h2o_sdpa``: each runs the model's own eager or SDPA attention and hands the
result to the cache, which scores the keys (from eager's probabilities, or
recomputed in query chunks for SDPA so that a long prompt never needs its full
query-by-key matrix at once) and evicts. Without such a cache in play they are
exactly the base implementation.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from h2o_vllm.hf import handoff

# name -> (base attention, mask builder, whether the base wants an additive float mask)
BASES = {
    "eager": (eager_attention_forward, eager_mask, True),
    "sdpa": (sdpa_attention_forward, sdpa_mask, False),
}
PREFIX = "h2o_"


def _make(base_name: str):
    base, _, additive = BASES[base_name]

    def h2o_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        cache = handoff.take()
        if cache is None:
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return cache.attend(module, base, query, key, value, attention_mask, scaling, dropout, additive, **kwargs)

    h2o_attention.__name__ = f"h2o_{base_name}_attention"
    return h2o_attention


def register() -> None:
    """Make ``h2o_eager`` and ``h2o_sdpa`` known to transformers. Idempotent."""
    for name, (_, mask_fn, _) in BASES.items():
        AttentionInterface.register(PREFIX + name, _make(name))
        AttentionMaskInterface.register(PREFIX + name, mask_fn)


def h2o_name(attn_implementation: str) -> str:
    base = attn_implementation.removeprefix(PREFIX)
    if base not in BASES:
        raise ValueError(
            f"H2O needs eager or sdpa attention, but the model uses {attn_implementation!r}; "
            "load it with attn_implementation='sdpa' or 'eager'"
        )
    return PREFIX + base
