"""A KV pool smaller than one full-length request (default model, prefill "chunked").

One engine: max_model_len 8,192 (the default model's context) on a pool of 64 blocks of 32
tokens (2,048 tokens), prefill chunks of 512 tokens, a default budget of 1,024 tokens. vLLM
alone refuses to start such a pool (it must hold one max_model_len request); the H2O worker
reports its layers as ``BudgetedAttentionSpec``, whose per-request memory is the budget plus one
chunk, as a sliding window's is its window. Requests that could never fit are refused at the door.
"""

import pytest
from engine_support import BLOCK, generate, start_engine

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, num_free_blocks, resident_blocks, scheduler_of
from h2o_vllm.footprint import Footprint
from h2o_vllm.policy import Budget

CHUNK, POOL, MAX_LEN = 512, 64, 8192
CONFIG = engine_config(budget=Budget(tokens=1024), prefill="chunked")
LONG, NEW = 7000, 48
PEAK = 1024 // BLOCK + CHUNK // BLOCK + 1  # budget + one chunk + the block being written


@pytest.fixture(scope="module")
def engine(default_model_dir):
    with start_engine(
        default_model_dir,
        CONFIG,
        max_model_len=MAX_LEN,
        num_gpu_blocks_override=POOL + 1,  # +1: vLLM's null block
        max_num_batched_tokens=CHUNK,
    ) as llm:
        yield llm


def generate_watched(llm, prompts, extra_args=None, max_tokens=NEW):
    """Greedy outputs (a request may stop at its end-of-sequence token), the engine's step log, and
    each request's peak resident blocks (two ways)."""
    scheduler = scheduler_of(llm)
    start = num_free_blocks(scheduler)
    peaks: dict[str, int] = {}
    counted: dict[str, int] = {}

    def record(scheduler, output, before):
        for request in scheduler.running:
            rid = request.request_id
            peaks[rid] = max(peaks.get(rid, 0), resident_blocks(scheduler, rid))
            counted[rid] = scheduler.h2o_requests[rid].counters.peak_resident_blocks

    observer = StepObserver(scheduler, [record])
    try:
        outputs = generate(llm, prompts, max_tokens, extra_args, ignore_eos=False)
    finally:
        observer.close()
    assert num_free_blocks(scheduler) == start == POOL and scheduler.h2o_requests == {}
    return outputs, observer.log, peaks, counted


def test_the_engine_starts_with_a_pool_smaller_than_one_request(engine):
    from h2o_vllm.engine.kv_spec import BudgetedAttentionSpec
    from h2o_vllm.patches import engine_seams

    scheduler = scheduler_of(engine)
    assert engine_seams.num_total_blocks(scheduler) == POOL < MAX_LEN // BLOCK
    (group,) = scheduler.kv_cache_config.kv_cache_groups
    assert type(group.kv_cache_spec) is BudgetedAttentionSpec


# 2 x 512 while prefilling, ranked by key norms (h2o_prefill_score "auto") until the last 8 rows score.
STAGED = {"h2o_prefill": "staged", "h2o_budget": 512, "h2o_prompt_window": 8}


@pytest.mark.parametrize(
    "extra_args, peak",
    [
        (None, PEAK),
        (STAGED, 2 * 512 // BLOCK + CHUNK // BLOCK + 1),
        ({**STAGED, "h2o_prefill_score": "attention"}, 2 * 512 // BLOCK + CHUNK // BLOCK + 1),  # by each chunk's end
    ],
    ids=["chunked", "staged", "staged-attn"],
)
def test_a_7000_token_prompt_holds_its_budget_plus_one_chunk(engine, essay_ids, extra_args, peak):
    from h2o_vllm import settings

    prompt = essay_ids[20000 : 20000 + LONG]
    assert len(prompt) == LONG and LONG > POOL * BLOCK
    outputs, log, peaks, counted = generate_watched(engine, [prompt], extra_args)
    (rid,) = peaks
    assert peaks[rid] <= peak and counted[rid] <= peak
    config = settings.for_request(CONFIG, extra_args)
    assert max(peaks[rid], counted[rid]) <= Footprint(config).peak_blocks(LONG + NEW, CHUNK)  # what admission reserved
    assert log.preemptions == 0
    assert len(log.evictions[rid]) >= LONG // BLOCK - PEAK
    # Coherent text: English words from the essays' own vocabulary, not a loop on one token.
    out = outputs[0].outputs[0]
    assert len(out.token_ids) == NEW and len(set(out.token_ids)) >= 10
    from h2o_vllm.datasets import essays_text

    vocabulary = {w.strip(".,;:!?\"'()").lower() for w in essays_text().split()}
    words = [w.strip(".,;:!?\"'()").lower() for w in out.text.split()]
    assert words and sum(w in vocabulary for w in words) >= 0.9 * len(words), out.text


def test_mixed_budgets_are_admitted_by_their_own_peaks(engine, essay_ids):
    """Three 3,000-token requests with a budget of 256 (25 blocks at most), then one of 7,000 tokens
    with the default 1,024 (49 blocks). The small ones run two at a time; the long one must wait
    until its own peak is free, counting what the running ones may still take, or someone is
    preempted."""
    small = 256 // BLOCK + CHUNK // BLOCK + 1
    prompts = [essay_ids[30000 + i * 3000 :][:3000] for i in range(3)] + [essay_ids[1000 : 1000 + LONG]]
    args = [{"h2o_budget": 256}] * 3 + [None]
    outputs, log, peaks, counted = generate_watched(engine, prompts, args, max_tokens=16)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16] * 4
    assert log.preemptions == 0
    # The engine's request ids are the outputs' with a suffix.
    peak_of = [next(v for k, v in peaks.items() if k.split("-")[0] == o.request_id) for o in outputs]
    assert all(p <= small for p in peak_of[:3]) and peak_of[3] <= PEAK
    assert log.max_running >= 2  # the gate does not serialise everything


@pytest.mark.parametrize(
    "extra_args, param",
    [
        ({"h2o_policy": "none"}, "max_tokens"),  # a full cache of 7,000 tokens
        ({"h2o_prefill": "whole"}, "h2o_prefill"),  # the whole prompt before it is compressed
        ({"h2o_budget": 3000}, "h2o_budget"),  # a budget larger than the pool
        ({"h2o_prefill": "staged"}, "h2o_working_set"),  # 2 x 1,024 while prefilling; 1 x would fit
    ],
)
def test_requests_that_can_never_fit_are_refused_at_the_door(engine, essay_ids, extra_args, param):
    from vllm.exceptions import VLLMValidationError

    prompt = essay_ids[:LONG]
    with pytest.raises(VLLMValidationError, match="more than this server's whole KV cache") as refused:
        generate_watched(engine, [prompt], extra_args)
    assert refused.value.parameter == param
    scheduler = scheduler_of(engine)
    assert num_free_blocks(scheduler) == POOL and not scheduler.waiting and not scheduler.running
    # Short enough to fit, the same settings run.
    outputs, *_ = generate_watched(engine, [prompt[:1000]], extra_args, max_tokens=4)
    assert len(outputs[0].outputs[0].token_ids) == 4
