"""Refuse bad ``h2o_*`` request settings before a request reaches the engine.

vLLM validates every request's ``SamplingParams`` in
``InputProcessor._validate_params`` (in the API server and in ``vllm.LLM``), and
turns a ``VLLMValidationError`` into HTTP 400 with ``param`` set. We wrap that
one function: a bad ``h2o_budget`` fails only its own request, with a message
that names the field, and never reaches the scheduler (where an exception would
stop the engine).
"""

from __future__ import annotations

import functools

from h2o_vllm.patches.versions import is_supported_vllm

_MARK = "_h2o_vllm_wrapped"


def validate_h2o_args(vllm_config, params) -> None:
    from vllm.exceptions import VLLMValidationError

    from h2o_vllm import settings
    from h2o_vllm.engine.settings import server_defaults

    extra = getattr(params, "extra_args", None)
    if not extra or not any(k.startswith("h2o_") for k in extra):
        return
    scheduler_cls = str(getattr(vllm_config.scheduler_config, "scheduler_cls", "") or "")
    if "H2OScheduler" not in scheduler_cls:
        raise VLLMValidationError(
            "h2o_* settings need an H2O engine (h2o-vllm serve, or engine_kwargs())", parameter=sorted(extra)[0]
        )
    try:
        config = settings.for_request(server_defaults(vllm_config.additional_config), extra)
    except settings.H2OSettingError as exc:
        raise VLLMValidationError(str(exc), parameter=exc.param, value=extra.get(exc.param)) from None
    max_len = vllm_config.model_config.max_model_len
    if "h2o_budget" in extra and config.budget.tokens is not None and config.budget.tokens > max_len:
        raise VLLMValidationError(
            f"h2o_budget: {config.budget.tokens} tokens is above the longest sequence this server allows "
            f"(max_model_len {max_len}); use at most {max_len}, or a fraction such as 0.2",
            parameter="h2o_budget",
            value=extra["h2o_budget"],
        )


def install() -> bool:
    """Wrap ``InputProcessor._validate_params`` once per process. False if this vLLM is not supported."""
    if not is_supported_vllm():
        return False
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        validate_h2o_args(self.vllm_config, params)
        return result

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params
    return True
