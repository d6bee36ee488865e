"""The forms of a :class:`~h2o_vllm.policy.PolicyConfig` outside Python: one table of fields.

Each field has one name and four spellings, all derived from it:

    =============  ==================  ===================  =======================  ========================
    field          request (vllm_xargs) server option        environment variable     additional_config["h2o"]
    =============  ==================  ===================  =======================  ========================
    policy         h2o_policy          --h2o-policy         H2O_VLLM_POLICY          policy
    budget         h2o_budget          --h2o-budget         H2O_VLLM_BUDGET          budget
    sink           h2o_sink            --h2o-sink           H2O_VLLM_SINK            sink
    ...            (one row per entry of FIELDS)
    =============  ==================  ===================  =======================  ========================

Server-wide defaults travel to every vLLM process inside
``--additional-config '{"h2o": {...}}'``; a request overrides them with
``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP)::

    {"h2o_policy": "h2o", "h2o_budget": 0.2, "h2o_sink": 32, "h2o_recent": 64,
     "h2o_prompt_window": 32, "h2o_score_norm": "sum", "h2o_score_reduce": "max",
     "h2o_prefill": "staged", "h2o_working_set": 2}

Parsing is strict: a bad value raises :class:`H2OSettingError` naming the field
as the caller spelled it, so the server can answer 400 with ``param`` set.
Fields only turn text into values; :class:`PolicyConfig` checks them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from h2o_vllm.policy import POLICIES, Budget, PolicyConfig, PolicyConfigError

REQUEST_PREFIX = "h2o_"


class H2OSettingError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _integer(value: Any) -> int:
    """An integer, also from "32" or 32.0; never from True, NaN or 2.5."""
    try:
        number = None if isinstance(value, bool) or value is None else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or math.isnan(number) or math.isinf(number) or number != int(number):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(number)


def _optional_integer(value: Any) -> int | None:
    return None if value is None else _integer(value)


def _window(value: Any) -> int | None:
    return _optional_integer(value) or None  # 0 = every prompt query row


def _budget_value(budget: Budget) -> int | float:
    return budget.tokens if budget.tokens is not None else budget.fraction


@dataclass(frozen=True)
class Field:
    name: str  # the additional_config key; the other spellings derive from it
    attr: str  # the PolicyConfig attribute
    parse: Callable[[Any], Any]  # raises ValueError or TypeError
    help: str
    dump: Callable[[Any], Any] = lambda value: value

    @property
    def request_key(self) -> str:
        return REQUEST_PREFIX + self.name

    @property
    def flag(self) -> str:
        return "--h2o-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "H2O_VLLM_" + self.name.upper()


FIELDS = (
    Field("policy", "policy", _text, f"{', '.join(p for p in POLICIES if p != 'none')} or none (the full cache)"),
    Field(
        "budget", "budget", Budget.parse, "KV kept per sequence: tokens (1024) or a fraction (0.2, 20%)", _budget_value
    ),
    Field("sink", "n_sink", _integer, "sink tokens kept at the start"),
    Field("recent", "n_recent", _optional_integer, "recent tokens kept; default: half of what the budget leaves"),
    Field("prompt_window", "prompt_window", _window, "score the prompt with its last W query rows; 0 or unset: all"),
    Field(
        "score_norm", "score_norm", _text, "sum (the paper) or mean (divided by how many queries saw a block; h2o only)"
    ),
    Field("score_reduce", "score_reduce", _text, "sum (the paper) or max (each query's largest head-and-layer mass)"),
    Field(
        "prefill",
        "prefill",
        _text,
        "whole (compress a prompt once it is prefilled), chunked (after each chunk) or staged (after each chunk "
        "to working_set x the budget, then to the budget by the prompt's last rows)",
    ),
    Field("working_set", "working_set", _integer, "prefill staged: budgets kept while a prompt prefills"),
    Field(
        "prefill_score",
        "prefill_score",
        _text,
        "prefill staged: what ranks the working set before the prompt's last rows: auto (key_norm wherever "
        "it can: an attention policy with a prompt window; else attention), attention (each chunk's last "
        "rows) or key_norm (its keys' norms, lowest kept)",
    ),
)
_BY_ATTR = {f.attr: f for f in FIELDS}


def apply(config: PolicyConfig, values: Mapping[str, Any], prefix: str = "") -> PolicyConfig:
    """``config`` with ``values`` applied: keys are field names with ``prefix`` (``h2o_`` for requests).

    With a prefix, keys without it belong to someone else and are ignored; every
    key that has it must be a field.
    """
    known = {prefix + f.name: f for f in FIELDS}
    ours = {k: v for k, v in values.items() if k.startswith(prefix)}
    unknown = sorted(k for k in ours if k not in known)
    if unknown:
        raise H2OSettingError(unknown[0], f"unknown H2O setting; known: {', '.join(sorted(known))}")
    changes = {}
    for key, value in ours.items():
        try:
            changes[known[key].attr] = known[key].parse(value)
        except (TypeError, ValueError) as exc:
            raise H2OSettingError(key, str(exc)) from None
    try:
        return config.replace(**changes)
    except PolicyConfigError as exc:
        raise H2OSettingError(prefix + _BY_ATTR[exc.field].name, exc.message) from None


def for_request(defaults: PolicyConfig, extra_args: Mapping[str, Any] | None) -> PolicyConfig:
    """The server's ``defaults`` with a request's ``h2o_*`` extra args applied (other keys are ignored)."""
    if not extra_args or not any(k.startswith(REQUEST_PREFIX) for k in extra_args):
        return defaults
    return apply(defaults, extra_args, prefix=REQUEST_PREFIX)


def to_dict(config: PolicyConfig) -> dict[str, Any]:
    """Every field of ``config`` by name (the ``additional_config["h2o"]`` section that reproduces it)."""
    return {f.name: f.dump(getattr(config, f.attr)) for f in FIELDS}


def to_server_args(config: PolicyConfig, attrs) -> list[str]:
    """The ``h2o-vllm serve`` options that set ``attrs`` of ``config`` (``--h2o-budget 0.2`` ...; a
    window of None, every prompt row, is sent as 0)."""
    args = []
    for f in FIELDS:
        value = f.dump(getattr(config, f.attr))
        if f.attr == "prompt_window" and value is None:
            value = 0
        if f.attr in attrs and value is not None:
            args += [f.flag, str(value)]
    return args


def to_request_args(config: PolicyConfig, attrs) -> dict[str, Any]:
    """The ``vllm_xargs`` that set ``attrs`` of ``config`` on a request (a window of None is sent as 0)."""
    out = {}
    for f in FIELDS:
        if f.attr in attrs:
            value = f.dump(getattr(config, f.attr))
            out[f.request_key] = 0 if (f.attr == "prompt_window" and value is None) else value
    return out
