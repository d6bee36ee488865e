"""Tensor parallelism: two ranks, one decision per block (h2o_vllm/engine/ranks.py).

The tiny model (2 query heads, 1 KV head: with TP=2 each rank holds one query head and a
copy of the KV head) in float32, in-process engine cores with one and two worker
processes. With eviction active (25% budgets), the evicted blocks and the greedy tokens
of six concurrent requests at TP=2 equal the single-process engine's, for both score
reductions and for key norms; with a budget that covers the sequence, the tokens equal
vanilla vLLM's at TP=2. Three engines in all; the settings travel per request.

Without the reduction (rank 0's scores alone) the ``sum`` and ``max`` cases fail; key norms
cannot tell here (the tiny model's one KV head is whole on rank 0): tests/test_ranks.py
checks their reduction.
"""

import pytest
from test_engine_h2o import BLOCK, generate_outputs, random_prompts

from h2o_vllm.engine import engine_config, engine_kwargs
from h2o_vllm.engine.observe import StepObserver, inprocess_llm, scheduler_of

LENGTHS = [200, 330, 420, 512, 260, 600]
NEW = 64
COMMON = dict(
    dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, kv_cache_memory_bytes=64 * 2**20,
    max_num_batched_tokens=2048, max_num_seqs=16, enable_prefix_caching=False,
)  # fmt: skip
EVICTING = {
    # An 8-row prompt window: with every prompt row scoring, one head's sums alone happen to rank
    # the blocks as both heads' do on this model, and a missing reduction would go unseen.
    "sum": {"h2o_policy": "h2o", "h2o_budget": 0.25, "h2o_score_reduce": "sum", "h2o_prompt_window": 8},
    "max": {"h2o_policy": "h2o", "h2o_budget": 0.25, "h2o_score_reduce": "max", "h2o_prompt_window": 8},
    "keynorm": {"h2o_policy": "keynorm", "h2o_budget": 0.25},
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
        outputs = generate_outputs(llm, random_prompts(LENGTHS), NEW, [xargs] * len(LENGTHS))
    finally:
        observer.close()
    assert observer.log.max_running == len(LENGTHS)  # all at once
    evicted = {k.split("-")[0]: v for k, v in observer.log.evictions.items()}
    return [list(o.outputs[0].token_ids) for o in outputs], [
        evicted.get(o.request_id.split("-")[0], []) for o in outputs
    ]


def results(model_dir, tp: int, runs: dict) -> dict:
    with inprocess_llm(str(model_dir), tensor_parallel_size=tp, **COMMON, **engine_kwargs(engine_config())) as llm:
        return {name: run(llm, xargs) for name, xargs in runs.items()}


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir):
    return results(tiny_model_dir, 1, EVICTING)


@pytest.fixture(scope="module")
def tp2(tiny_model_dir, two_ranks):
    return results(tiny_model_dir, 2, {**EVICTING, "covering": {"h2o_budget": 2048}})


@pytest.mark.parametrize("name", list(EVICTING))
def test_tp2_evicts_as_one_process(one_rank, tp2, name):
    tokens, evicted = tp2[name]
    one_tokens, one_evicted = one_rank[name]
    assert sum(len(e) for e in one_evicted) > 5 * len(LENGTHS)  # eviction is active
    assert evicted == one_evicted
    assert tokens == one_tokens


def test_tp2_with_a_covering_budget_gives_vanilla_tokens(tiny_model_dir, two_ranks, tp2):
    with inprocess_llm(str(tiny_model_dir), tensor_parallel_size=2, block_size=BLOCK, **COMMON) as llm:
        vanilla = [list(o.outputs[0].token_ids) for o in generate_outputs(llm, random_prompts(LENGTHS), NEW)]
    tokens, evicted = tp2["covering"]
    assert not any(evicted)
    assert tokens == vanilla
