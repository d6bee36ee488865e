"""Tensor and pipeline parallelism: two ranks, one decision per block (h2o_vllm/engine/ranks.py).

The tiny model (2 layers; 2 query heads, 1 KV head: with TP=2 each rank holds one query
head and a copy of the KV head, with PP=2 one layer) in float32, in-process engine cores
with one and two worker processes. With eviction active (25% budgets), the evicted blocks
and the greedy tokens of six concurrent requests at TP=2 and at PP=2 equal the
single-process engine's, for both score reductions, for key norms, and compressing between
prefill chunks (prompts come in 128-token chunks, which vLLM pipelines at PP=2: the per-request
cap, not the step's token budget, so a request's chunks are the same in every layout); with a
budget that covers the sequence, the tokens equal vanilla vLLM's at TP=2 and PP=2. Five
engines in all; the settings travel per request.

Without the reduction (rank 0's scores alone) the ``sum`` and ``max`` cases fail; key norms
cannot tell here (the tiny model's one KV head is whole on rank 0): tests/test_ranks.py
checks their reduction.
"""

import pytest
from engine_support import BLOCK, by_client_id, generate, generate_tokens, random_prompts, start_engine, token_ids

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, scheduler_of

LENGTHS = [200, 330, 420, 512, 260, 600]
NEW = 64
SCHEDULING = dict(
    max_num_batched_tokens=2048, long_prefill_token_threshold=128, max_num_seqs=16, enable_prefix_caching=False
)
EVICTING = {
    # An 8-row prompt window: with every prompt row scoring, one head's sums alone happen to rank
    # the blocks as both heads' do on this model, and a missing reduction would go unseen.
    "sum": {"h2o_policy": "h2o", "h2o_budget": 0.25, "h2o_score_reduce": "sum", "h2o_prompt_window": 8},
    "max": {"h2o_policy": "h2o", "h2o_budget": 0.25, "h2o_score_reduce": "max", "h2o_prompt_window": 8},
    "keynorm": {"h2o_policy": "keynorm", "h2o_budget": 0.25},
    "chunked": {"h2o_policy": "h2o", "h2o_budget": 0.25, "h2o_prefill": "chunked", "h2o_prompt_window": 8},
}


@pytest.fixture(scope="module")
def two_ranks():
    # One core per rank: vLLM's default binding wants a NUMA node per rank.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        yield


def run(llm, xargs):
    """Greedy tokens and evicted blocks of LENGTHS x NEW, in prompt order."""
    observer = StepObserver(scheduler_of(llm))
    try:
        outputs = generate(llm, random_prompts(LENGTHS), NEW, xargs)
    finally:
        observer.close()
    assert observer.log.max_running == len(LENGTHS)  # all at once
    evicted = by_client_id(observer.log.evictions)
    return token_ids(outputs), [evicted.get(o.request_id.split("-")[0], []) for o in outputs]


# vLLM 0.32's CPU runner allocates a later pipeline stage's input buffer only in its warm-up,
# which it skips under --enforce-eager: pipeline parallelism on CPU needs the compiled model.
PARALLEL = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2, "enforce_eager": False}}


def results(model_dir, runs: dict, **parallel) -> dict:
    with start_engine(model_dir, engine_config(), **{**SCHEDULING, **parallel}) as llm:
        return {name: run(llm, xargs) for name, xargs in runs.items()}


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir):
    return results(tiny_model_dir, EVICTING)


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, two_ranks):
    return results(tiny_model_dir, {**EVICTING, "covering": {"h2o_budget": 2048}}, **PARALLEL["tp2"])


@pytest.fixture(scope="module")
def pp2(tiny_model_dir, two_ranks):
    return results(tiny_model_dir, {**EVICTING, "covering": {"h2o_budget": 2048}}, **PARALLEL["pp2"])


@pytest.mark.parametrize("mode", ["tp2", "pp2"])
@pytest.mark.parametrize("name", list(EVICTING))
def test_parallel_ranks_evict_as_one_process(request, one_rank, mode, name):
    tokens, evicted = request.getfixturevalue(mode)[name]
    one_tokens, one_evicted = one_rank[name]
    assert sum(len(e) for e in one_evicted) > 5 * len(LENGTHS)  # eviction is active
    assert evicted == one_evicted
    assert tokens == one_tokens


@pytest.mark.parametrize("mode", ["tp2", "pp2"])
def test_parallel_ranks_with_a_covering_budget_give_vanilla_tokens(request, tiny_model_dir, two_ranks, mode):
    with start_engine(tiny_model_dir, **{**SCHEDULING, **PARALLEL[mode]}, block_size=BLOCK) as llm:
        vanilla = generate_tokens(llm, random_prompts(LENGTHS), NEW)
    tokens, evicted = request.getfixturevalue(mode)["covering"]
    assert not any(evicted)
    assert tokens == vanilla
