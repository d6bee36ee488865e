"""H2O settings for the vLLM engine: server-wide defaults and per-request overrides.

Server-wide defaults travel to every vLLM process inside
``--additional-config '{"h2o": {...}}'`` (``vllm_config.additional_config``).
A request overrides them with ``SamplingParams.extra_args`` (``vllm_xargs`` over
HTTP), keys prefixed ``h2o_``::

    {"h2o_policy": "h2o", "h2o_budget": 0.2, "h2o_sink": 32, "h2o_recent": 64,
     "h2o_prompt_window": 32, "h2o_score_norm": "sum", "h2o_score_reduce": "max"}

Parsing is strict: a bad value raises :class:`H2OSettingError` naming the field,
so the server can answer 400 with ``param`` set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from h2o_vllm.policy import POLICIES, SCORE_REDUCE, Budget, PolicyConfig

CONFIG_KEY = "h2o"  # key inside vLLM's additional_config
REQUEST_PREFIX = "h2o_"
# The one block size the CPU engine runs with: CPU attention needs a multiple of 32,
# and the policy's unit (a block) should be as fine as the kernel allows.
ENGINE_BLOCK_SIZE = 32


class H2OSettingError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _int(param: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or value is None:
        raise H2OSettingError(param, f"must be an integer >= {minimum}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise H2OSettingError(param, f"must be an integer >= {minimum}, got {value!r}") from None
    if math.isnan(number) or math.isinf(number) or number != int(number) or number < minimum:
        raise H2OSettingError(param, f"must be an integer >= {minimum}, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class H2OSettings:
    """What decides one request's evictions (or the server's defaults)."""

    policy: str = "h2o"
    budget: Budget = Budget(fraction=0.2)
    n_sink: int = 32  # tokens: the first block
    n_recent: int | None = None  # tokens; None = half of what the budget leaves after the sinks
    prompt_window: int | None = None  # None: every prompt query scores; W: only the last W
    score_norm: str = "sum"
    # How heads and layers combine into one block score: "sum" (the paper) or "max"
    # (per query, the largest mass one head gives the block; see h2o_vllm.hf.cache).
    score_reduce: str = "sum"

    FIELDS = ("policy", "budget", "sink", "recent", "prompt_window", "score_norm", "score_reduce")

    def with_values(self, values: Mapping[str, Any], prefix: str = "") -> "H2OSettings":
        """A copy with ``values`` (keys from FIELDS, with ``prefix``) applied and validated."""
        known = {prefix + f for f in self.FIELDS}
        unknown = sorted(k for k in values if k.startswith(prefix) and k not in known) if prefix else sorted(
            k for k in values if k not in known
        )
        if unknown:
            raise H2OSettingError(unknown[0], f"unknown H2O setting; known: {', '.join(sorted(known))}")
        changes: dict[str, Any] = {}
        for field in self.FIELDS:
            key = prefix + field
            if key not in values:
                continue
            value = values[key]
            if field == "policy":
                if not isinstance(value, str) or value not in POLICIES:
                    raise H2OSettingError(key, f"unknown policy {value!r}; choose one of {', '.join(sorted(POLICIES))}")
                changes["policy"] = value
            elif field == "budget":
                try:
                    changes["budget"] = Budget.parse(value)
                except (TypeError, ValueError) as exc:
                    raise H2OSettingError(key, str(exc)) from None
            elif field == "sink":
                changes["n_sink"] = _int(key, value)
            elif field == "recent":
                changes["n_recent"] = None if value is None else _int(key, value)
            elif field == "prompt_window":
                window = None if value is None else _int(key, value)
                changes["prompt_window"] = window or None  # 0 = every prompt query
            elif field == "score_norm":
                if value not in ("sum", "mean"):
                    raise H2OSettingError(key, f"must be 'sum' or 'mean', got {value!r}")
                changes["score_norm"] = value
            elif field == "score_reduce":
                if value not in SCORE_REDUCE:
                    raise H2OSettingError(key, f"must be one of {', '.join(repr(r) for r in SCORE_REDUCE)}, got {value!r}")
                changes["score_reduce"] = value
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "H2OSettings":
        section = (additional_config or {}).get(CONFIG_KEY) or {}
        return cls().with_values(section)

    def for_request(self, extra_args: Mapping[str, Any] | None) -> "H2OSettings":
        """These defaults with a request's ``h2o_*`` extra args applied (other keys are ignored)."""
        if not extra_args:
            return self
        ours = {k: v for k, v in extra_args.items() if k.startswith(REQUEST_PREFIX)}
        return self.with_values(ours, prefix=REQUEST_PREFIX) if ours else self

    def policy_config(self, block_size: int = ENGINE_BLOCK_SIZE) -> PolicyConfig:
        return PolicyConfig(self.policy, self.budget, self.n_sink, self.n_recent, block_size, self.score_norm)

    @property
    def needs_scores(self) -> bool:
        return self.policy == "h2o"

    def to_config(self) -> dict[str, Any]:
        """The ``additional_config["h2o"]`` section that reproduces these settings."""
        budget = self.budget.tokens if self.budget.tokens is not None else self.budget.fraction
        return {
            "policy": self.policy,
            "budget": budget,
            "sink": self.n_sink,
            "recent": self.n_recent,
            "prompt_window": self.prompt_window,
            "score_norm": self.score_norm,
            "score_reduce": self.score_reduce,
        }


def engine_kwargs(settings: H2OSettings | None = None, **overrides) -> dict[str, Any]:
    """Keyword arguments that turn a ``vllm.LLM`` / ``EngineArgs`` into an H2O engine.

        llm = vllm.LLM(model, **engine_kwargs(H2OSettings(budget=Budget.parse(0.2))))

    The settings that fight eviction are set here, each for a reason:
    block size 32 (CPU attention needs a multiple of 32; smaller is finer
    eviction), prefix caching off (a shared block frees nothing when one request
    drops it, and KV written after an eviction must never be reused through the
    hash chain).
    """
    settings = settings or H2OSettings()
    additional = dict(overrides.pop("additional_config", None) or {})
    additional[CONFIG_KEY] = settings.to_config()
    kwargs = {
        "scheduler_cls": "h2o_vllm.engine.scheduler.H2OScheduler",
        "worker_cls": "h2o_vllm.engine.worker.H2OCPUWorker",
        "block_size": ENGINE_BLOCK_SIZE,
        "enable_prefix_caching": False,
        "additional_config": additional,
    }
    kwargs.update(overrides)
    return kwargs
