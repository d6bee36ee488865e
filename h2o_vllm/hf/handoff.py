"""How the attention function finds the cache of the layer it runs for.

A transformers attention layer first calls ``cache.update(...)`` and then the
attention function, back to back on one thread. The cache offers itself here in
``update`` and the attention function (:mod:`h2o_vllm.hf.attention`) takes it.
"""

from __future__ import annotations

import threading

_active = threading.local()


def offer(cache) -> None:
    """Hand ``cache`` to the attention call that follows; refuse if the last offer was never taken."""
    if getattr(_active, "cache", None) is cache:
        # The previous layer's attention never picked the cache up: nothing would be scored.
        name = type(cache).__name__
        raise RuntimeError(
            f"{name} needs the model's attention switched to h2o_eager or h2o_sdpa; "
            f"create it with {name}.for_model(model, ...) or use enable_h2o_llm(model, ...)"
        )
    _active.cache = cache


def take():
    """The cache offered for this attention call (None: no evicting cache in play)."""
    cache = getattr(_active, "cache", None)
    _active.cache = None
    return cache
