"""Paged H2O inside vLLM's V1 engine (CPU backend).

- :mod:`settings`: the engine's defaults and ``engine_kwargs()``.
- :mod:`scheduler`: evicts blocks before each step and frees them to the pool.
- :mod:`worker`: applies evictions in the worker and returns the step's scores.
- :mod:`attention`: CPU attention that skips holes and scores the asked-for rows.
- :mod:`scoring`: the torch code behind the last two.
- :mod:`messages`: what the scheduler and the workers tell each other each step.
- :mod:`kv_spec`: the KV cache spec that lets vLLM size the pool by the budget.

Only :mod:`settings` and :mod:`messages` import without vLLM.
"""

from h2o_vllm.engine.settings import ENGINE_DEFAULTS, engine_config, engine_kwargs, server_defaults

__all__ = ["ENGINE_DEFAULTS", "engine_config", "engine_kwargs", "server_defaults"]
