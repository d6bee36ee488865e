"""Served-model-name aliases that select a configuration, for clients that cannot send ``vllm_xargs``.

The part after ``@`` is a configuration name (:mod:`h2o_vllm.names`):
``smollm2-135m@h2o_20%_window8_max`` is the model ``smollm2-135m`` with those
``h2o_*`` settings; the short older spelling ``smollm2-135m@h2o-0.2`` (what the
server lists by default) and ``smollm2-135m@full`` (policy ``none``) work too.
Explicit ``vllm_xargs`` in the request win over what the alias says.
"""

from __future__ import annotations

from h2o_vllm import names, settings
from h2o_vllm.profiles import ENGINE
from h2o_vllm.settings import H2OSettingError

SEPARATOR = "@"
DEFAULT_ALIASES = ("h2o-0.1", "h2o-0.2", "h2o-0.5", "streaming-0.1", "streaming-0.2", "streaming-0.5", "full")


def alias_settings(suffix: str) -> dict:
    """``"h2o-0.2"`` -> ``{"h2o_policy": "h2o", "h2o_budget": 0.2}``: the fields the name sets, validated."""
    try:
        named = names.parse_name(suffix, ENGINE).for_engine()
    except ValueError as exc:
        raise H2OSettingError("model", f"alias {suffix!r}: {exc}") from None
    return settings.to_request_args(named.config, named.named)


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
