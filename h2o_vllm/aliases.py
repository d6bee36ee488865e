"""Served-model-name aliases that select a policy and budget, for clients that cannot send ``vllm_xargs``.

``smollm2-135m@h2o-0.2`` is the model ``smollm2-135m`` with ``{"h2o_policy": "h2o",
"h2o_budget": 0.2}``; ``smollm2-135m@streaming-256`` keeps 256 tokens with
StreamingLLM; ``smollm2-135m@full`` is the full cache (policy ``none``). Explicit
``vllm_xargs`` in the request win over what the alias says.
"""

from __future__ import annotations

from h2o_vllm.engine.settings import H2OSettingError, H2OSettings

SEPARATOR = "@"
DEFAULT_ALIASES = ("h2o-0.1", "h2o-0.2", "h2o-0.5", "streaming-0.1", "streaming-0.2", "streaming-0.5", "full")


def alias_settings(suffix: str) -> dict:
    """``"h2o-0.2"`` -> ``{"h2o_policy": "h2o", "h2o_budget": "0.2"}``, validated."""
    if suffix in ("full", "none"):
        values = {"h2o_policy": "none"}
    else:
        policy, dash, budget = suffix.partition("-")
        if not dash or not budget:
            raise H2OSettingError("model", f"alias {suffix!r} must look like POLICY-BUDGET (h2o-0.2, streaming-256) or full")
        values = {"h2o_policy": policy, "h2o_budget": budget}
    try:
        H2OSettings().for_request(values)
    except H2OSettingError as exc:
        raise H2OSettingError("model", f"alias {suffix!r}: {exc}") from None
    return values


def split_alias(model_name: str | None) -> tuple[str | None, dict]:
    """(base name, h2o extra args) of a requested model name; no alias -> (name, {})."""
    if not model_name or SEPARATOR not in model_name:
        return model_name, {}
    base, _, suffix = model_name.rpartition(SEPARATOR)
    return base, alias_settings(suffix)


def alias_names(base: str, suffixes) -> list[str]:
    for suffix in suffixes:
        alias_settings(suffix)  # refuse a bad alias at start-up, not at the first request
    return [f"{base}{SEPARATOR}{s}" for s in suffixes]
