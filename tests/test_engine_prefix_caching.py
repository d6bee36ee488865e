"""Prefix caching on, with eviction (vLLM's default, which H2O keeps).

What must hold: with a budget covering every request, tokens and cache hits equal vanilla
vLLM's with prefix caching; only KV computed over the full context (before a request's
first eviction) is ever hashed, so a request that continues another's conversation never
reuses compressed KV; evicting a block another request shares frees nothing and is counted
as such; the pool comes back whole, holding nothing but the cache, after a mixed load.
Tiny random-weight model, engines in this process (``inprocess_llm``), ``enforce_eager``.
"""

import random

import pytest
from engine_support import BLOCK, generate, random_tokens, start_engine, token_ids

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, num_free_blocks, scheduler_of
from h2o_vllm.patches import engine_seams
from h2o_vllm.policy import Budget


def tokens_and_hits(outputs):
    return token_ids(outputs), [o.num_cached_tokens for o in outputs]


def pool_is_whole(scheduler) -> bool:
    """Every block free; those still holding KV are held by the prefix cache alone (reference count 0)."""
    return (
        num_free_blocks(scheduler) == engine_seams.num_total_blocks(scheduler)
        and engine_seams.blocks_in_use(scheduler) == 0
        and not getattr(scheduler, "h2o_requests", None)
    )


# -- equivalence: with a budget covering everything, H2O is vanilla with prefix caching ------


def shared_prefix_workload(seed=0):
    """Two prefix owners (200 and 420 tokens), then 10 requests: 8 continue them, 2 repeat an owner exactly."""
    rng = random.Random(seed)
    prefixes = [random_tokens(200, rng), random_tokens(420, rng)]
    owners = [prefixes[0] + random_tokens(20, rng), prefixes[1] + random_tokens(37, rng)]
    followers = [prefixes[i % 2] + random_tokens(rng.randrange(10, 150), rng) for i in range(8)] + owners
    new = [rng.randrange(20, 60) for _ in followers]
    return owners, followers, new


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_budget_gives_vanilla_tokens_and_hits_with_prefix_caching(tiny_model_dir, dtype):
    owners, followers, new = shared_prefix_workload()
    runs = {}
    longest = max(len(p) + n for p, n in zip(followers, new))
    for name, h2o, overrides in (
        ("vanilla", None, {"block_size": BLOCK}),
        ("h2o", engine_config(budget=Budget(tokens=longest)), {}),
    ):
        with start_engine(tiny_model_dir, h2o, dtype=dtype, **overrides) as llm:
            scheduler = scheduler_of(llm)
            assert engine_seams.prefix_caching_enabled(scheduler)  # vLLM's default, kept by H2O
            observer = StepObserver(scheduler)
            first = tokens_and_hits(generate(llm, owners, 24))
            second = tokens_and_hits(generate(llm, followers, new))
            runs[name] = (first, second, observer.log.max_running)
            assert pool_is_whole(scheduler)
            if name == "h2o":
                assert not observer.log.evictions
    (v_first, v_second, _), (h_first, h_second, running) = runs["vanilla"], runs["h2o"]
    assert running >= 8
    assert h_first == v_first and h_second[0] == v_second[0]  # greedy tokens
    assert h_second[1] == v_second[1]  # cache hits, request by request
    assert sum(1 for hit in h_second[1] if hit > 0) >= 8
    assert h_second[1][-2:] == [len(o) // BLOCK * BLOCK for o in owners]  # exact repeats: all whole blocks


# -- never reuse compressed KV -----------------------------------------------------------------


@pytest.fixture(scope="module")
def evicting_engine(tiny_model_dir):
    """H2O at 20% (every prompt row scores), prefix caching on, prefill chunks of at most 128 tokens."""
    config = engine_config(budget=Budget(fraction=0.2))
    with start_engine(tiny_model_dir, config, max_num_batched_tokens=128) as llm:
        yield llm


def pristine_check(violations):
    """After every step: no block at or above a request's caching cap is in the prefix cache, and below
    the cap every block it still holds is (it was computed over the full context and hashed when scheduled)."""

    def check(scheduler, output, before):
        for request in scheduler.running:
            state = scheduler.h2o_requests.get(request.request_id)
            cap = None if state is None else state.cache_cap_tokens
            if cap is None:
                continue
            blocks = engine_seams.request_blocks(scheduler, request.request_id)
            hashed = engine_seams.hashed_blocks(scheduler, request.request_id)
            above = [i for i in range(cap // BLOCK, len(blocks)) if hashed[i]]
            below = [i for i in range(cap // BLOCK) if not blocks[i].is_null and not hashed[i]]
            if above or below:
                violations.append((request.request_id, cap, above, below))

    return check


@pytest.mark.parametrize(
    "a_args, offered",
    [
        ({}, lambda n_a, first_chunk: n_a // BLOCK * BLOCK),  # whole: the prompt's full blocks, nothing decoded
        ({"h2o_prefill": "chunked"}, lambda n_a, first_chunk: first_chunk),  # chunked: the first chunk only
    ],
    ids=["whole", "chunked"],
)
def test_kv_computed_after_an_eviction_is_never_reused(evicting_engine, a_args, offered):
    """A evicts, then generates; B's prompt is A's prompt and A's output. B (no eviction, so no limit on
    its hit) takes from the cache exactly what A computed before its first eviction, and its tokens equal
    B's on a cold cache."""
    llm, rng = evicting_engine, random.Random(7)
    scheduler = scheduler_of(llm)
    llm.reset_prefix_cache()
    violations = []
    observer = StepObserver(scheduler, [pristine_check(violations)])
    try:
        prompt_a = random_tokens(500, rng)
        out_a = generate(llm, [prompt_a], 150, a_args)[0]
        assert observer.log.evictions  # A evicted
        prompt_b = prompt_a + list(out_a.outputs[0].token_ids)
        none = {"h2o_policy": "none"}
        warm = generate(llm, [prompt_b], 40, none)[0]
        (first_chunk,) = [s[0] for rid, s in observer.log.scheduled.items() if rid.split("-")[0] == out_a.request_id]
        assert warm.num_cached_tokens == offered(len(prompt_a), first_chunk) > 0
        llm.reset_prefix_cache()
        cold = generate(llm, [prompt_b], 40, none)[0]
        assert cold.num_cached_tokens == 0
        assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
        # Control: A with a budget covering it (no eviction) offers everything, decoded blocks included.
        llm.reset_prefix_cache()
        full_a = generate(llm, [prompt_a], 150, {**a_args, "h2o_budget": 1.0, "h2o_recent": 4096})[0]
        prompt_c = prompt_a + list(full_a.outputs[0].token_ids)
        assert generate(llm, [prompt_c], 40, none)[0].num_cached_tokens == (len(prompt_c) - 1) // BLOCK * BLOCK
    finally:
        observer.close()
    assert not violations
    assert pool_is_whole(scheduler)


def test_shared_blocks_are_dropped_not_freed_and_counted(evicting_engine):
    """8 requests share a 320-token prefix: evicting a prefix block another request holds drops one
    reference, frees nothing, and is counted as shared (the engine refused such blocks before)."""
    llm, rng = evicting_engine, random.Random(3)
    scheduler = scheduler_of(llm)
    llm.reset_prefix_cache()
    totals = scheduler.h2o_totals
    evicted0, shared0 = totals.evicted_blocks, totals.evicted_shared_blocks
    prefix = random_tokens(320, rng)
    prompts = [prefix + random_tokens(100, rng) for _ in range(8)]
    snapshots, per_request = [], {}

    def record(scheduler, output, before):
        snapshots.append(scheduler.h2o_snapshot())
        for rid, state in scheduler.h2o_requests.items():
            per_request[rid] = (state.counters.evicted_blocks, state.counters.evicted_shared_blocks)

    observer = StepObserver(scheduler, [record])
    try:
        outputs = generate(llm, prompts, 60, {"h2o_prompt_window": 16})
    finally:
        observer.close()
    assert sum(o.num_cached_tokens > 0 for o in outputs) >= 6
    evicted, shared = totals.evicted_blocks - evicted0, totals.evicted_shared_blocks - shared0
    assert 0 < shared < evicted
    assert sum(e for e, _ in per_request.values()) == evicted and sum(s for _, s in per_request.values()) == shared
    assert max(s["shared_kv_blocks"] for s in snapshots) > 0
    # Distinct blocks in use, shared ones once: the snapshot agrees with the pool.
    for snap in snapshots:
        assert snap["resident_kv_blocks"] <= snap["kv_total_blocks"] - snap["kv_free_blocks"]
    assert pool_is_whole(scheduler)


# -- the pool after a mixed load -----------------------------------------------------------------


def test_pool_holds_only_the_cache_after_200_mixed_requests(tiny_model_dir):
    """200 requests, 32 at a time, over a pool that cannot hold them all: shared prefixes, repeats,
    every policy and prefill mode, preemptions welcome. Afterwards every block is free."""
    rng = random.Random(11)
    prefixes = [random_tokens(n, rng) for n in (64, 300, 700)]
    kinds = [
        None,
        {"h2o_policy": "streaming"},
        {"h2o_policy": "none"},
        {"h2o_prefill": "chunked"},
        {"h2o_prompt_window": 8, "h2o_score_reduce": "max"},
        {"h2o_budget": 2048},
    ]
    prompts, extra, new = [], [], []
    for i in range(200):
        prefix = prefixes[i % 3] if i % 4 else []
        prompts.append(prefix + random_tokens(rng.randrange(1, 200), rng))
        extra.append(kinds[i % len(kinds)])
        new.append(rng.randrange(8, 80))
    config = engine_config(budget=Budget(fraction=0.25))
    with start_engine(
        tiny_model_dir,
        config,
        max_num_seqs=32,
        num_gpu_blocks_override=201,  # +1: the null block
        max_num_batched_tokens=512,
    ) as llm:
        scheduler = scheduler_of(llm)
        observer = StepObserver(scheduler)
        outputs = generate(llm, prompts, new, extra)
        assert [len(o.outputs[0].token_ids) for o in outputs] == new
        assert observer.log.max_running >= 16 and observer.log.evictions
        assert sum(o.num_cached_tokens > 0 for o in outputs) >= 100
        assert scheduler.h2o_totals.evicted_shared_blocks > 0
        assert pool_is_whole(scheduler)
        assert engine_seams.cached_free_blocks(scheduler) > 0  # the cache kept what it may reuse


# -- a hit decides as a miss does (default model) ---------------------------------------------

PROMPT, SHARED, NEW, WINDOW = 1024, 640, 64, 64


@pytest.fixture(scope="module")
def essay_engine(default_model_dir):
    """The default model, float32, H2O at 20%, prefix caching on."""
    with start_engine(
        default_model_dir, engine_config(budget=Budget(fraction=0.2)), kv_cache_memory_bytes=256 * 2**20
    ) as llm:
        yield llm


@pytest.fixture(scope="module")
def essay_prompts(essay_ids):
    p = essay_ids[:PROMPT]
    q = p[:SHARED] + essay_ids[5000 : 5000 + PROMPT - SHARED]  # P's first 640 tokens, then other text
    return p, q


def run_alone(llm, prompt, extra, cold):
    """One request on its own (same batches every time): its tokens, cache hit and evictions in order."""
    scheduler = scheduler_of(llm)
    if cold:
        assert llm.reset_prefix_cache()
    observer = StepObserver(scheduler)
    try:
        (out,) = generate(llm, [prompt], NEW, extra)
    finally:
        observer.close()
    (evictions,) = observer.log.evictions.values()
    return list(out.outputs[0].token_ids), out.num_cached_tokens, evictions


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_window_scoring_decides_alike_on_a_hit_and_a_miss(essay_engine, essay_prompts, reduce):
    """With an observation window, a hit stops where the window starts: the window's rows run and see
    every key either way, so the evictions and greedy tokens are a cold cache's."""
    p, q = essay_prompts
    extra = {"h2o_prompt_window": WINDOW, "h2o_score_reduce": reduce}
    p_cold = run_alone(essay_engine, p, extra, cold=True)
    p_warm = run_alone(essay_engine, p, extra, cold=False)
    q_warm = run_alone(essay_engine, q, extra, cold=False)
    q_cold = run_alone(essay_engine, q, extra, cold=True)
    assert p_cold[1] == 0 and q_cold[1] == 0
    assert p_warm[1] == PROMPT - WINDOW  # vLLM would give 992: capped at the window's start
    assert q_warm[1] == SHARED
    assert p_warm[2] == p_cold[2] and q_warm[2] == q_cold[2]  # the same blocks, in the same order
    assert p_warm[0] == p_cold[0] and q_warm[0] == q_cold[0]
    assert pool_is_whole(scheduler_of(essay_engine))


def test_every_row_scoring_on_a_hit_scores_the_rows_that_run(essay_engine, essay_prompts):
    """Every prompt row scores (the paper): a hit of H tokens leaves its rows out, so the request
    decides as a cold one whose window is the N - H rows that ran."""
    p, _ = essay_prompts
    p_cold = run_alone(essay_engine, p, None, cold=True)
    p_warm = run_alone(essay_engine, p, None, cold=False)
    hit = p_warm[1]
    assert hit == (PROMPT - 1) // BLOCK * BLOCK  # vLLM's own hit: nothing capped
    as_window = run_alone(essay_engine, p, {"h2o_prompt_window": PROMPT - hit}, cold=True)
    assert p_warm[2] == as_window[2] and p_warm[0] == as_window[0]
    assert p_warm[2] != p_cold[2]  # and so not as the cold request with every row
