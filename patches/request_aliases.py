"""Model-name aliases (``smollm2-135m@h2o-0.2``) become per-request H2O settings.

vLLM builds each OpenAI request's ``SamplingParams`` in the request class's
``to_sampling_params``; we wrap that one method on the completion and chat
request classes and add the alias's ``h2o_*`` values to ``extra_args`` (the
request's own ``vllm_xargs`` win). The aliases themselves are ordinary extra
``--served-model-name`` entries, so vLLM routes and lists them.

The same wrapper refuses ``h2o_*`` fields at the top level of a request (where the
OpenAI client's ``extra_body={"h2o_budget": 0.2}`` puts them): vLLM keeps unknown
fields in ``model_extra`` and ignores them, so the request would silently run with
the server's defaults. They belong in ``vllm_xargs``; the 400 says so.
"""

from __future__ import annotations

import functools

from h2o_vllm.patches.versions import is_supported_vllm

_MARK = "_h2o_vllm_wrapped"


def _wrap(cls) -> None:
    original = cls.to_sampling_params
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        from vllm.exceptions import VLLMValidationError

        from h2o_vllm.aliases import split_alias
        from h2o_vllm.settings import REQUEST_PREFIX, H2OSettingError

        misplaced = sorted(k for k in (self.model_extra or {}) if k.startswith(REQUEST_PREFIX))
        if misplaced:
            raise VLLMValidationError(
                f"{misplaced[0]}: H2O settings go inside vllm_xargs, e.g. "
                f'{{"vllm_xargs": {{"{misplaced[0]}": ...}}}} (with the OpenAI client: '
                f'extra_body={{"vllm_xargs": {{...}}}}); as a top-level field it would be ignored',
                parameter=misplaced[0],
                value=self.model_extra[misplaced[0]],
            )
        try:
            _, alias_args = split_alias(getattr(self, "model", None))
        except H2OSettingError as exc:
            raise VLLMValidationError(str(exc), parameter="model", value=self.model) from None
        if alias_args:
            params.extra_args = {**alias_args, **(params.extra_args or {})}
        return params

    setattr(to_sampling_params, _MARK, True)
    cls.to_sampling_params = to_sampling_params


def install() -> bool:
    if not is_supported_vllm():
        return False
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    _wrap(CompletionRequest)
    _wrap(ChatCompletionRequest)
    return True
