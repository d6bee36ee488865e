"""Paged H2O inside vLLM's V1 engine (CPU backend).

- :mod:`settings`: server defaults and per-request overrides, ``engine_kwargs()``.
- :mod:`scheduler`: evicts blocks before each step and frees them to the pool.
- :mod:`worker`: applies evictions in the worker and returns the step's scores.
- :mod:`attention`: CPU attention that skips holes and scores the asked-for rows.
- :mod:`scoring`: the torch code behind the last two.

Only :mod:`settings` and :mod:`messages` import without vLLM.
"""

from h2o_vllm.engine.settings import H2OSettingError, H2OSettings, engine_kwargs

__all__ = ["H2OSettings", "H2OSettingError", "engine_kwargs"]
