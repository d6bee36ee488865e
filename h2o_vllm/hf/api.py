"""The transformers API (the one the project started from): switch a model to H2O or
StreamingLLM and call ``generate`` as usual.

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    enable_h2o_llm(model, n_sink=8, recent_window=32, max_capacity=256)
    model.generate(**inputs, max_new_tokens=512)     # H2O: 8 sinks + 216 heavy hitters + 32 recent
    enable_streaming_llm(model, n_sink=8, window_size=256)
    disable_eviction(model)                          # back to the full cache, whichever policy was on

``disable_h2o_llm`` and ``disable_streaming_llm`` are the original names of ``disable_eviction``:
each restores the full cache whatever policy was enabled.

Manual forward loops get the policy too, as streaming-perplexity scripts write them:

    pkv = None
    for t in range(n):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values                    # an H2OCache from the first call on

A forward that starts from ``past_key_values=None`` (with the cache on) gets a fresh
cache; one handed another kind of cache warns once, since it cannot evict.

The cache is the fast one (:class:`~h2o_vllm.hf.fast_cache.FastH2OCache`: fixed buffers
written in place, decisions on the device); ``fast=False`` (to ``enable_*`` or to
``make_cache``) gives the reference :class:`~h2o_vllm.hf.cache.H2OCache`, which decides
the same.
"""

from __future__ import annotations

import functools
import warnings

from h2o_vllm.hf import attention
from h2o_vllm.hf.base import EvictingCache
from h2o_vllm.hf.cache import H2OCache
from h2o_vllm.hf.fast_cache import FastH2OCache
from h2o_vllm.policy import Budget, PolicyConfig

_STATE = "_h2o_vllm_state"


def enable_h2o_llm(
    model,
    n_sink: int = 8,
    recent_window: int = 32,
    max_capacity: int = 256,
    *,
    block_size: int = 1,
    per_layer: bool = False,
    per_head: bool = False,
    score_norm: str = "sum",
    prompt_window: int | None = None,
    score_reduce: str = "sum",
    fast: bool = True,
):
    """H2O: keep ``n_sink`` first tokens, ``recent_window`` last ones and
    ``max_capacity - n_sink - recent_window`` heavy hitters.

    ``per_layer=True, per_head=True`` decides per layer and KV head, as the paper's code does;
    the default, one decision for all layers and heads, is what the paged vLLM engine can do.
    ``fast=False``: the reference cache instead of the fast one (the same decisions)."""
    if max_capacity < n_sink + recent_window:
        raise ValueError(f"max_capacity ({max_capacity}) must hold n_sink + recent_window ({n_sink} + {recent_window})")
    config = PolicyConfig(
        "h2o", Budget(tokens=max_capacity), n_sink, recent_window, block_size, score_norm, prompt_window, score_reduce
    )
    return enable_policy(model, config, per_layer=per_layer, per_head=per_head, fast=fast)


def enable_streaming_llm(model, n_sink: int = 8, window_size: int = 256, *, block_size: int = 1, fast: bool = True):
    """StreamingLLM: keep ``n_sink`` first tokens and the last ``window_size`` ones."""
    config = PolicyConfig("streaming", Budget(tokens=n_sink + window_size), n_sink, window_size, block_size)
    return enable_policy(model, config, fast=fast)


def enable_policy(model, config: PolicyConfig, *, per_layer: bool = False, per_head: bool = False, fast: bool = True):
    """Any configuration of the policy core. Re-enabling replaces the previous setting.

    ``fast=True`` (the default) makes :class:`FastH2OCache`s, ``False`` the reference :class:`H2OCache`."""
    attention.register()
    state = getattr(model, _STATE, None)
    if state is None:
        state = {
            "attn_implementation": model.config._attn_implementation,
            "generate": model.generate,
            "forward": model.forward,
        }
        setattr(model, _STATE, state)
    model.set_attn_implementation(attention.h2o_name(state["attn_implementation"]))
    if per_head and not per_layer:
        raise ValueError("per_head needs per_layer=True")
    state["make_cache"] = lambda fast=fast: (FastH2OCache if fast else H2OCache).for_model(
        model, config, per_layer=per_layer, per_head=per_head
    )
    original_generate = state["generate"]

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = state["make_cache"]()
        return original_generate(*args, **kwargs)

    model.generate = generate
    model.forward = _forward_with_policy(model, state)
    return model


def _forward_with_policy(model, state):
    """The model's forward, handed a fresh evicting cache where it would start a cache of its own."""
    original_forward = state["forward"]

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = model.config.use_cache
        if cache is None and use_cache and not args[1:]:
            kwargs["past_key_values"] = state["make_cache"]()
        elif cache is not None and not isinstance(cache, EvictingCache) and not state.get("warned"):
            state["warned"] = True
            warnings.warn(
                f"{type(model).__name__} has an eviction policy enabled but was given a {type(cache).__name__}, "
                "which keeps every token: pass past_key_values=None (or h2o_vllm.hf.make_cache(model)) to evict",
                stacklevel=2,
            )
        return original_forward(*args, **kwargs)

    return forward


def prefill(model, cache: EvictingCache, input_ids, chunk_size: int | None = None):
    """Run a prompt (batch of one, no padding) into ``cache`` ``chunk_size`` tokens at a time; its last logits.

    The cache evicts after every forward, so with ``prefill="chunked"`` configurations this
    is the engine's chunked prefill: the KV stays near the budget while the prompt goes in.
    ``input_ids`` is declared to be the prompt (:meth:`EvictingCache.declare_prompt`); a caller
    feeding one prompt through several calls declares the whole of it first.
    """
    import torch

    chunk_size = chunk_size or input_ids.shape[1]
    cache.declare_prompt(input_ids.shape[1])
    with torch.no_grad():
        for start in range(0, input_ids.shape[1], chunk_size):
            out = model(input_ids=input_ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def make_cache(model, *, fast: bool | None = None) -> EvictingCache:
    """A fresh cache with the policy the model was enabled with (for manual forward loops).

    ``fast``: None for the kind the model was enabled with, True for a :class:`FastH2OCache`,
    False for the reference :class:`H2OCache`."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("call enable_h2o_llm or enable_streaming_llm on the model first")
    return state["make_cache"]() if fast is None else state["make_cache"](fast)


def disable_eviction(model):
    """Back to the unmodified model: full cache, original attention (whichever policy was enabled)."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    model.set_attn_implementation(state["attn_implementation"])
    model.generate = state["generate"]
    model.forward = state["forward"]
    delattr(model, _STATE)
    return model


# The original names: each turns off whatever policy is enabled, not only its own.
disable_h2o_llm = disable_eviction
disable_streaming_llm = disable_eviction
