"""The H2O engine's configuration: its defaults, and the vLLM arguments that start it.

A request's configuration is a :class:`~h2o_vllm.policy.PolicyConfig`: the
server's defaults (``--additional-config '{"h2o": {...}}'``, which vLLM hands to
every process as ``vllm_config.additional_config``) with the request's ``h2o_*``
extra args applied (:func:`h2o_vllm.settings.for_request`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from h2o_vllm import settings
from h2o_vllm.policy import PolicyConfig
from h2o_vllm.profiles import ENGINE, ENGINE_BLOCK_SIZE

CONFIG_KEY = "h2o"  # key inside vLLM's additional_config
# What the engine assumes where the server says nothing (h2o_vllm.profiles.ENGINE).
ENGINE_DEFAULTS = ENGINE


def engine_config(**changes) -> PolicyConfig:
    """The engine's defaults with ``changes`` (PolicyConfig attributes): ``engine_config(budget=Budget(tokens=256))``."""
    return ENGINE_DEFAULTS.replace(**changes)


def server_defaults(additional_config: Mapping[str, Any] | None) -> PolicyConfig:
    """The configuration every request starts from, read from vLLM's ``additional_config``."""
    section = (additional_config or {}).get(CONFIG_KEY) or {}
    return settings.apply(ENGINE_DEFAULTS, section)


def engine_kwargs(config: PolicyConfig | None = None, **overrides) -> dict[str, Any]:
    """Keyword arguments that turn a ``vllm.LLM`` / ``EngineArgs`` into an H2O engine.

        llm = vllm.LLM(model, **engine_kwargs(engine_config(budget=Budget.parse(0.2))))

    The one vLLM setting eviction needs is set here: block size 32 (CPU attention
    needs a multiple of 32; smaller is finer eviction). Prefix caching stays as vLLM
    sets it (on by default; ``enable_prefix_caching=False`` turns it off): the
    scheduler shares only KV computed before a request's first eviction.
    """
    config = config or ENGINE_DEFAULTS  # its block size is not sent: the engine's is ENGINE_BLOCK_SIZE
    additional = dict(overrides.pop("additional_config", None) or {})
    additional[CONFIG_KEY] = settings.to_dict(config)
    kwargs = {
        "scheduler_cls": "h2o_vllm.engine.scheduler.H2OScheduler",
        "worker_cls": "h2o_vllm.engine.worker.H2OCPUWorker",
        "block_size": ENGINE_BLOCK_SIZE,
        "additional_config": additional,
    }
    kwargs.update(overrides)
    return kwargs
