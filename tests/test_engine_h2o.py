"""Paged H2O in the real vLLM engine, on the tiny random-weight model.

Engines run in this process (``inprocess_llm``) so the tests can read the
scheduler after every step. ``enforce_eager``: this is about behaviour, not speed.
"""

import pytest
from engine_support import BLOCK, generate, generate_tokens, greedy, random_prompts, start_engine

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, num_free_blocks, resident_blocks, scheduler_of
from h2o_vllm.policy import Budget

# -- equivalence: a budget that covers the whole request changes nothing ----------------

EQ_LENGTHS = [17, 45, 96, 130, 222, 317, 480, 650, 801, 1000]
EQ_NEW = [40, 33, 64, 20, 48, 90, 25, 70, 36, 60]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_budget_gives_vanilla_tokens(tiny_model_dir, dtype):
    prompts = random_prompts(EQ_LENGTHS)
    budget = max(p + n for p, n in zip(EQ_LENGTHS, EQ_NEW))
    # Block size 32 as the H2O engine's: vLLM memoises the attention backend per layer shape and
    # block size, so the H2O engine that follows must still get its own (attention.register).
    with start_engine(tiny_model_dir, dtype=dtype, block_size=BLOCK) as llm:
        vanilla = generate_tokens(llm, prompts, EQ_NEW)
    with start_engine(tiny_model_dir, engine_config(budget=Budget(tokens=budget)), dtype=dtype) as llm:
        observer = StepObserver(scheduler_of(llm))
        h2o = generate_tokens(llm, prompts, EQ_NEW)
        assert observer.log.max_running >= 8  # all of them ran concurrently
        assert not observer.log.evictions
    assert h2o == vanilla


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_prefill_with_a_budget_of_the_whole_sequence_gives_vanilla_tokens(tiny_model_dir, dtype):
    """Prefill "chunked" scores every chunk and asks the policy after each; with room for everything
    (a budget of the whole sequence, a recent window longer than any) nothing goes and nothing changes,
    for H2O and for SnapKV (the same engine, per request)."""
    prompts = random_prompts(EQ_LENGTHS)
    common = dict(dtype=dtype, max_num_batched_tokens=128)
    with start_engine(tiny_model_dir, **common) as llm:
        vanilla = generate_tokens(llm, prompts, EQ_NEW)
    config = engine_config(budget=Budget(fraction=1.0), n_recent=4096, prefill="chunked")
    with start_engine(tiny_model_dir, config, **common) as llm:
        observer = StepObserver(scheduler_of(llm))
        h2o = generate_tokens(llm, prompts, EQ_NEW)
        first_chunk = {int(rid.split("-")[0]): steps[0] for rid, steps in observer.log.scheduled.items()}
        split = [i for i, n in first_chunk.items() if n < EQ_LENGTHS[i]]  # prompts prefilled in several chunks
        assert len(split) >= 5 and observer.log.max_running >= 8
        assert not observer.log.evictions
        # SnapKV per request: the prompt's rows score, decode steps ask for no row at all.
        snapkv = generate_tokens(llm, prompts, EQ_NEW, {"h2o_policy": "snapkv"})
        assert not observer.log.evictions
    assert h2o == vanilla
    assert snapkv == vanilla


# -- eviction: memory bound, pool returns, per-request overrides, preemption, abort -------


@pytest.fixture(scope="module")
def small_pool_engine(tiny_model_dir):
    """An H2O engine (25% budget by default) with a pool of 96 blocks."""
    settings = engine_config(budget=Budget(fraction=0.25), n_sink=BLOCK)
    with start_engine(tiny_model_dir, settings, num_gpu_blocks_override=96) as llm:
        yield llm


def budget_check(violations):
    """After each step's scheduling: a compressed request holds at most its budget plus one block."""

    def check(scheduler, output, before):
        for request in scheduler.running:
            state = scheduler.h2o_requests.get(request.request_id)
            if request.request_id not in before:
                continue  # admitted this step
            computed, total = before[request.request_id]
            if state is None or not state.can_evict or computed < total - 1:
                continue  # not yet compressed (or never evicts)
            budget = state.config.budget.blocks_for(computed, BLOCK)
            held = resident_blocks(scheduler, request.request_id)
            if held > budget + 1:
                violations.append((request.request_id, computed, held, budget))

    return check


def test_requests_stay_within_budget_and_pool_returns(small_pool_engine):
    scheduler = scheduler_of(small_pool_engine)
    start = num_free_blocks(scheduler)
    violations = []
    observer = StepObserver(scheduler, [budget_check(violations)])
    try:
        lengths = [300, 420, 550, 610, 700, 800]
        outputs = generate_tokens(small_pool_engine, random_prompts(lengths, seed=1), 120)
    finally:
        observer.close()
    assert all(len(o) == 120 for o in outputs)
    assert sum(len(b) for b in observer.log.evictions.values()) > 50
    assert not violations, violations[:5]
    # A full cache would need 6 x (prompt + 120) / 32 = 119 blocks > the pool of 96: eviction made room.
    assert observer.log.max_running == len(lengths)
    assert num_free_blocks(scheduler) == start
    assert scheduler.h2o_requests == {}
    counters = scheduler.h2o_counters()
    assert counters["evicted_blocks"] >= sum(len(b) for b in observer.log.evictions.values())


def test_per_request_policy_and_preemption(small_pool_engine):
    """Two full-cache requests outgrow the pool and are preempted; everything still finishes."""
    scheduler = scheduler_of(small_pool_engine)
    start = num_free_blocks(scheduler)
    observer = StepObserver(scheduler)
    try:
        # Together the two full-cache requests need 2 x 2000 / 32 = 125 blocks: more than the pool.
        prompts = random_prompts([1000, 900, 500, 400], seed=2)
        extra = [{"h2o_policy": "none"}, {"h2o_policy": "none"}, {"h2o_policy": "streaming"}, {"h2o_budget": 128}]
        new_tokens = [1000, 1100, 300, 300]
        outputs = generate(small_pool_engine, prompts, new_tokens, extra)
    finally:
        observer.close()
    assert [len(o.outputs[0].token_ids) for o in outputs] == new_tokens
    assert observer.log.preemptions > 0
    # The engine's request ids extend the client's ("3" -> "3-1a2b3c4d").
    evicted = {rid.split("-")[0] for rid in observer.log.evictions}
    assert evicted == {outputs[2].request_id, outputs[3].request_id}  # policy none never evicts
    assert num_free_blocks(scheduler) == start
    assert scheduler.h2o_requests == {}


def test_abort_frees_everything(small_pool_engine):
    engine = small_pool_engine.llm_engine
    scheduler = scheduler_of(small_pool_engine)
    start = num_free_blocks(scheduler)
    ids = [
        engine.add_request(f"abort-{i}", {"prompt_token_ids": p}, greedy(400))
        for i, p in enumerate(random_prompts([500, 700], seed=3))
    ]
    for _ in range(60):
        engine.step()
    assert sum(resident_blocks(scheduler, rid) for rid in scheduler.requests) > 0
    assert any(scheduler.h2o_requests[r].counters.evicted_blocks for r in scheduler.h2o_requests)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    assert num_free_blocks(scheduler) == start
    assert scheduler.h2o_requests == {}


def test_bad_request_setting_is_refused_at_the_door(small_pool_engine):
    from vllm.exceptions import VLLMValidationError

    prompts = [{"prompt_token_ids": p} for p in random_prompts([100], seed=4)]
    with pytest.raises(VLLMValidationError, match="h2o_budget") as info:
        small_pool_engine.generate(prompts, greedy(20, {"h2o_budget": -3}), use_tqdm=False)
    assert info.value.parameter == "h2o_budget"
    outputs = small_pool_engine.generate(prompts, greedy(20, {"h2o_budget": 64}), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 20  # the engine is fine


def test_refuses_settings_that_fight_eviction(tiny_model_dir):
    with pytest.raises(Exception, match="block size 64"), start_engine(tiny_model_dir, engine_config(), block_size=64):
        pass
