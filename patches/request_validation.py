"""Refuse bad ``h2o_*`` request settings before a request reaches the engine.

vLLM validates every request's ``SamplingParams`` in
``InputProcessor._validate_params`` (in the API server and in ``vllm.LLM``), and
turns a ``VLLMValidationError`` into HTTP 400 with ``param`` set. We wrap that
one function: a bad ``h2o_budget`` fails only its own request, with a message
that names the field, and never reaches the scheduler (where an exception would
stop the engine).

An H2O engine may start with a KV pool smaller than ``max_model_len`` (see
h2o_vllm/engine/kv_spec.py). A request that could never fit in it (a full cache,
or a prompt prefilled whole, longer than the pool; a budget larger than the pool)
would wait forever, so ``InputProcessor.process_inputs`` is wrapped too:
once the prompt is tokenized and ``max_tokens`` known, such a request gets a 400
that says what it needs and what the pool holds.
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
    if not is_h2o_engine(vllm_config):
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


def is_h2o_engine(vllm_config) -> bool:
    return "H2OScheduler" in str(getattr(vllm_config.scheduler_config, "scheduler_cls", "") or "")


def validate_fits_pool(vllm_config, engine_request) -> None:
    """Refuse a request that needs more KV blocks at once than the engine's whole pool."""
    from vllm.exceptions import VLLMValidationError

    from h2o_vllm import settings
    from h2o_vllm.engine.settings import server_defaults
    from h2o_vllm.footprint import Footprint
    from h2o_vllm.patches import engine_seams

    pool = vllm_config.cache_config.num_gpu_blocks  # set once the engine cores reported theirs
    params = engine_request.sampling_params
    if not pool or params is None or not is_h2o_engine(vllm_config):
        return
    # With data parallelism the frontend holds the engines' pools added up (each the same size);
    # a request runs on one of them. The pool's first block is vLLM's null block.
    engines = engine_seams.engines_behind_frontend(vllm_config)
    usable = pool // engines - 1
    extra = params.extra_args or {}
    config = settings.for_request(server_defaults(vllm_config.additional_config), extra)
    prompt = len(engine_request.prompt_token_ids or ())
    max_new = params.max_tokens or 0
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    bs = vllm_config.cache_config.block_size
    need = Footprint(config).most_blocks(prompt, max_new, chunk)
    if need <= usable:
        return
    if config.policy == "none":
        why, param = f"a full cache of {prompt} prompt and up to {max_new} new tokens", "max_tokens"
        advice = "lower max_tokens, or evict (h2o_policy: h2o, h2o_prefill: chunked or staged)"
    elif config.prefill == "whole" and -(-prompt // bs) > usable:
        why, param = f"its {prompt}-token prompt, prefilled whole before it is compressed", "h2o_prefill"
        advice = 'compress it while it prefills (h2o_prefill: "chunked" or "staged")'
    elif (
        config.prefill == "staged"
        and Footprint(config.replace(working_set=1)).most_blocks(prompt, max_new, chunk) <= usable
    ):
        why = (
            f"budget {config.budget}, {config.working_set}x while it prefills, plus one prefill chunk of {chunk} tokens"
        )
        param, advice = "h2o_working_set", "lower h2o_working_set"
    else:
        chunk_part = f" plus one prefill chunk of {chunk} tokens" if config.compresses_while_prefilling else ""
        staged_part = f", {config.working_set}x while it prefills," if config.prefill == "staged" else ""
        why, param = f"budget {config.budget}{staged_part}{chunk_part}", "h2o_budget"
        advice = "lower h2o_budget"
    whole = "this server's whole KV cache" if engines == 1 else f"the whole KV cache of each of its {engines} engines"
    raise VLLMValidationError(
        f"this request needs up to {need} KV blocks of {bs} tokens at once ({why}), more than "
        f"{whole} ({usable} blocks, {usable * bs} tokens): {advice}",
        parameter=param,
        value=extra.get(param, max_new if param == "max_tokens" else None),
    )


def install() -> bool:
    """Wrap ``InputProcessor._validate_params`` and ``process_inputs`` once per process. False if this vLLM is not supported."""
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

    original_process = InputProcessor.process_inputs

    @functools.wraps(original_process)
    def process_inputs(self, *args, **kwargs):
        engine_request = original_process(self, *args, **kwargs)
        validate_fits_pool(self.vllm_config, engine_request)
        return engine_request

    setattr(_validate_params, _MARK, True)
    InputProcessor._validate_params = _validate_params
    InputProcessor.process_inputs = process_inputs
    return True
