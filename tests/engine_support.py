"""What the engine test modules share: one engine builder, greedy generation, seeded random prompts,
reading an engine's runs off its step log, and the transformers reference those runs are compared with.

An engine here is vLLM on CPU, eager, seeded, in float32, with sequences of up to 2,048 tokens and
a 64 MiB KV cache (``ENGINE_ARGS``); a test names what it changes (``start_engine(..., **overrides)``).
"""

from __future__ import annotations

import contextlib
import random

from h2o_vllm.engine import engine_kwargs
from h2o_vllm.engine.observe import inprocess_llm
from h2o_vllm.patches import engine_seams

BLOCK = 32  # the H2O engine's block size (h2o_vllm.engine.settings.ENGINE_BLOCK_SIZE)
ENGINE_ARGS = dict(dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, kv_cache_memory_bytes=64 * 2**20)


@contextlib.contextmanager
def start_engine(model_dir, h2o=None, *, inprocess: bool = True, **overrides):
    """A ``vllm.LLM`` on ``model_dir``, shut down on exit: ``ENGINE_ARGS`` with ``overrides`` over
    them, and with ``h2o`` (a ``PolicyConfig``: the engine's defaults) H2O's scheduler, worker, block
    size and settings (``engine_kwargs``; ``overrides`` win there too); without it, vanilla vLLM.

    Its engine core runs in this process (``inprocess_llm``: the scheduler is read with
    ``scheduler_of``); ``inprocess=False``: in vLLM's own engine core and worker processes.
    """
    kwargs = {**ENGINE_ARGS, **overrides}
    if h2o is not None:
        kwargs = engine_kwargs(h2o, **kwargs)
    if inprocess:
        with inprocess_llm(str(model_dir), **kwargs) as llm:
            yield llm
        return
    from vllm import LLM

    llm = LLM(model=str(model_dir), **kwargs)
    try:
        yield llm
    finally:
        engine_seams.shutdown_llm(llm)
        del llm


def greedy(max_tokens: int, extra_args: dict | None = None, *, ignore_eos: bool = True):
    """Greedy ``SamplingParams``; ``extra_args`` carries a request's H2O settings (``h2o_*``)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos, extra_args=extra_args)


def generate(llm, prompts, max_tokens, extra_args=None, *, ignore_eos: bool = True):
    """Greedy outputs (``RequestOutput``, in order) of ``prompts`` (token id lists), submitted together.

    ``max_tokens``: one for all or a list, one per prompt; ``extra_args``: one dict (or None) for all
    or a list, one per prompt. ``ignore_eos=False``: a request may stop at its end-of-sequence token.
    """
    from vllm.inputs import TokensPrompt

    if not isinstance(max_tokens, list):
        max_tokens = [max_tokens] * len(prompts)
    if not isinstance(extra_args, list):
        extra_args = [extra_args] * len(prompts)
    params = [greedy(m, x, ignore_eos=ignore_eos) for m, x in zip(max_tokens, extra_args)]
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def token_ids(outputs) -> list[list[int]]:
    """Each output's generated token ids."""
    return [list(o.outputs[0].token_ids) for o in outputs]


def generate_tokens(llm, prompts, max_tokens, extra_args=None) -> list[list[int]]:
    """:func:`generate`, the generated token ids only."""
    return token_ids(generate(llm, prompts, max_tokens, extra_args))


def random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids, one of each length, the same for the same ``seed``."""
    rng = random.Random(seed)
    return [random_tokens(n, rng) for n in lengths]


def by_client_id(per_request: dict) -> dict:
    """A step log's ``{engine request id: value}`` keyed by the client's id: the engine's ids extend
    the client's with a suffix ("3" -> "3-1a2b3c4d")."""
    return {rid.split("-")[0]: value for rid, value in per_request.items()}


def engine_runs(outputs, log) -> list[dict]:
    """Each output's run, in order, from its ``StepObserver`` log: its greedy ``tokens``, the blocks it
    ``evicted`` in order, its prompt's prefill ``chunks`` (what it computed after a prefix-cache hit, as
    the engine scheduled it) and that hit (``cached`` tokens)."""
    evictions, schedules = by_client_id(log.evictions), by_client_id(log.scheduled)
    runs = []
    for o in outputs:
        cached, scheduled, chunks = o.num_cached_tokens, schedules[o.request_id], []
        while (cached or 0) + sum(chunks) < len(o.prompt_token_ids):  # the prompt's chunks, then a token a step
            chunks.append(scheduled[len(chunks)])
        runs.append(
            {
                "tokens": list(o.outputs[0].token_ids),
                "evicted": evictions.get(o.request_id, []),
                "chunks": chunks,
                "cached": cached,
            }
        )
    return runs


def run_reference(model, prompt, defaults, extra_args, new_tokens: int, chunks=None) -> dict:
    """One request through the transformers reference (``H2OCache``): its greedy ``tokens``, each
    token's top-2 logit ``gaps``, the blocks it ``evicted`` in order, and how many it had evicted before
    its prompt was whole (``evicted_in_prefill``).

    ``defaults``: the engine's ``PolicyConfig``, with the request's ``extra_args`` over it; ``chunks``:
    the sizes the prompt is fed in (the engine's prefill chunks), whole by default.
    """
    import torch

    from h2o_vllm import settings
    from h2o_vllm.hf import H2OCache, prefill

    cache = H2OCache.for_model(model, settings.for_request(defaults, extra_args))
    ids, tokens, gaps, evicted_in_prefill = torch.tensor([prompt]), [], [], 0
    cache.declare_prompt(len(prompt))  # fed in the engine's chunks: where the prompt ends decides what scores
    with torch.no_grad():
        start = 0
        for size in chunks or [len(prompt)]:
            logits = prefill(model, cache, ids[:, start : start + size])[0]
            start += size
            if start < len(prompt):
                evicted_in_prefill = cache.stats.evicted_blocks
        while True:
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            if len(tokens) == new_tokens:  # the engine computes no KV for the last token either
                break
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return {
        "tokens": tokens,
        "gaps": gaps,
        "evicted": cache.stats.per_row_evicted[0],
        "evicted_in_prefill": evicted_in_prefill,
    }
