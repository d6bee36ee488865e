"""Property tests of the engine-agnostic policy core."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o_vllm.footprint import Footprint
from h2o_vllm.policy import Budget, PolicyConfig, PolicyConfigError, SequenceView, make_policy, protected_mask


@st.composite
def scenarios(draw, policy=st.sampled_from(["h2o", "keynorm", "streaming", "none"])):
    block_size = draw(st.sampled_from([1, 2, 4, 16, 32]))
    num_tokens = draw(st.integers(1, 40 * block_size))
    num_blocks = -(-num_tokens // block_size)
    if draw(st.booleans()):
        budget = Budget(fraction=draw(st.floats(0.01, 1.0)))
    else:
        budget = Budget(tokens=draw(st.integers(1, 2 * num_tokens)))
    name = draw(policy)
    cfg = PolicyConfig(
        policy=name,
        budget=budget,
        n_sink=draw(st.integers(0, 3 * block_size)),
        n_recent=draw(st.one_of(st.none(), st.integers(0, 6 * block_size))),
        block_size=block_size,
        score_norm="sum" if name == "keynorm" else draw(st.sampled_from(["sum", "mean"])),
    )
    # Coarse scores so that ties happen often.
    scores = np.array(draw(st.lists(st.integers(0, 5), min_size=num_blocks, max_size=num_blocks)), dtype=float)
    visibility = np.array(draw(st.lists(st.integers(1, 9), min_size=num_blocks, max_size=num_blocks)), dtype=float)
    resident = np.array(draw(st.lists(st.booleans(), min_size=num_blocks, max_size=num_blocks)))
    resident |= protected_mask(cfg, num_tokens, num_blocks)  # protected blocks are never gone
    view = SequenceView(num_tokens, resident, scores, visibility)
    return cfg, view


def _evict(cfg, view):
    return make_policy(cfg).select(view)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_budget_holds_unless_protected_blocks_exceed_it(case):
    cfg, view = case
    evicted = _evict(cfg, view)
    assert evicted == sorted(set(evicted))
    assert all(view.resident[i] for i in evicted)  # only resident blocks go
    after = int(view.resident.sum()) - len(evicted)
    budget_blocks = cfg.budget.blocks_for(view.num_tokens, cfg.block_size)
    protected = int(protected_mask(cfg, view.num_tokens, len(view.resident)).sum())
    if cfg.policy == "none":
        assert evicted == []
    else:
        assert after <= max(budget_blocks, protected, int(view.resident.sum()) - _num_candidates(cfg, view))
        assert after >= min(int(view.resident.sum()), budget_blocks)  # never evicts more than needed


def _num_candidates(cfg, view):
    return int((view.resident & ~protected_mask(cfg, view.num_tokens, len(view.resident))).sum())


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_sinks_recent_and_unfilled_blocks_are_never_evicted(case):
    cfg, view = case
    bs, n = cfg.block_size, view.num_tokens
    for block in _evict(cfg, view):
        first, last = block * bs, block * bs + bs - 1
        assert last < n, "an unfilled block was evicted"
        assert first >= cfg.n_sink, "a sink token was evicted"
        assert last < n - cfg.recent_tokens(n), "a recent token was evicted"


@settings(max_examples=400, deadline=None)
@given(scenarios(policy=st.sampled_from(["h2o", "keynorm", "streaming"])), st.integers(1, 64))
def test_larger_budget_never_evicts_what_a_smaller_one_keeps(case, extra_tokens):
    cfg, view = case
    if cfg.n_recent is None:  # the default recent window grows with the budget; pin it
        cfg = PolicyConfig(**{**cfg.__dict__, "n_recent": cfg.recent_tokens(view.num_tokens)})
    small = cfg.budget
    large = (
        Budget(tokens=small.tokens + extra_tokens)
        if small.tokens is not None
        else Budget(fraction=min(1.0, small.fraction + extra_tokens / 64))
    )
    evicted_small = set(_evict(cfg, view))
    evicted_large = set(_evict(PolicyConfig(**{**cfg.__dict__, "budget": large}), view))
    assert evicted_large <= evicted_small


@settings(max_examples=200, deadline=None)
@given(scenarios(policy=st.just("none")))
def test_none_never_evicts(case):
    cfg, view = case
    view.resident[:] = True
    assert _evict(PolicyConfig(**{**cfg.__dict__, "budget": Budget(tokens=1)}), view) == []


def test_h2o_evicts_lowest_scores_and_breaks_ties_towards_older_blocks():
    cfg = PolicyConfig("h2o", Budget(tokens=5), n_sink=1, n_recent=1, block_size=1)
    view = SequenceView.fresh(10, 1, scores=[9, 1, 3, 1, 7, 0.5, 8, 2, 6, 9])
    # 10 resident, budget 5 -> evict 5 of blocks 1..8: scores 0.5 (5), 1 (1), 1 (3), 2 (7), 3 (2)
    assert make_policy(cfg).select(view) == [1, 2, 3, 5, 7]


def test_streaming_keeps_sinks_and_the_most_recent_blocks():
    cfg = PolicyConfig("streaming", Budget(tokens=4 * 32), n_sink=8, n_recent=32, block_size=32)
    view = SequenceView.fresh(10 * 32 + 5, 32, scores=np.arange(11)[::-1])  # scores are ignored
    # 11 blocks (the last holds 5 tokens), budget 4: keep block 0 (sinks) and the 3 newest (8, 9, 10)
    assert make_policy(cfg).select(view) == [1, 2, 3, 4, 5, 6, 7]


def test_keynorm_evicts_highest_norms_and_breaks_ties_towards_older_blocks():
    cfg = PolicyConfig("keynorm", Budget(tokens=5), n_sink=1, n_recent=1, block_size=1)
    view = SequenceView.fresh(10, 1, scores=[0, 9, 3, 9, 7, 0.5, 8, 2, 6, 99])
    # 10 resident, budget 5 -> evict 5 of blocks 1..8 (0 is the sink, 9 recent): 9 (1), 9 (3), 8 (6), 7 (4), 6 (8)
    assert make_policy(cfg).select(view) == [1, 3, 4, 6, 8]
    # H2O ranks the other way: the lowest go, 0.5 (5), 2 (7), 3 (2), 6 (8), 7 (4).
    assert make_policy(cfg.replace(policy="h2o")).select(view) == [2, 4, 5, 7, 8]


def test_keynorm_keeps_sinks_recent_window_and_the_partly_written_block():
    cfg = PolicyConfig("keynorm", Budget(tokens=3 * 32), n_sink=32, n_recent=32, block_size=32)
    # 6 blocks, the last partly written: sinks (0), recent (4, and 5: partial) are kept whatever their norms.
    view = SequenceView.fresh(5 * 32 + 3, 32, scores=[100, 1, 2, 3, 100, 100])
    assert make_policy(cfg).select(view) == [1, 2, 3]
    view.resident[2] = False  # an evicted block is never chosen again; one more goes to reach the budget
    assert make_policy(cfg).select(view) == [1, 3]


def test_keynorm_settings():
    """Key norms are not attention: no visibility to divide by (``mean`` is refused), no prefix hit
    (a hit's keys are never computed, so their norms would be missing); window and reduce are ignored."""
    config = PolicyConfig("keynorm")
    assert config.score_source == "key_norm" and config.needs_key_norms and not config.needs_scores
    assert PolicyConfig("h2o").score_source == "attention" and not PolicyConfig("h2o").needs_key_norms
    assert PolicyConfig("streaming").score_source is None and PolicyConfig("none").score_source is None
    with pytest.raises(ValueError, match="score_norm.*key norms"):
        PolicyConfig("keynorm", score_norm="mean")
    for prefill in ("whole", "chunked"):
        assert Footprint(PolicyConfig("keynorm", block_size=32, prefill=prefill)).max_prefix_hit(1000, 1200) == 0
    windowed = PolicyConfig("keynorm", prompt_window=8, score_reduce="max")
    view = SequenceView.fresh(10, 1, scores=[0, 9, 3, 9, 7, 0.5, 8, 2, 6, 99])
    assert make_policy(windowed.replace(budget=Budget(tokens=5), n_sink=1, n_recent=1)).select(view) == [1, 3, 4, 6, 8]


def test_mean_normalisation_ranks_by_attention_per_query():
    view = SequenceView.fresh(6, 1, scores=[0, 8, 3, 0, 0, 0], visibility=[1, 8, 2, 1, 1, 1])
    base = dict(budget=Budget(tokens=5), n_sink=1, n_recent=3, block_size=1)
    # sum: block 2 (3) < block 1 (8); mean: block 1 (1.0) < block 2 (1.5)
    assert make_policy(PolicyConfig("h2o", score_norm="sum", **base)).select(view) == [2]
    assert make_policy(PolicyConfig("h2o", score_norm="mean", **base)).select(view) == [1]


@pytest.mark.parametrize(
    "value, expected",
    [
        (256, Budget(tokens=256)),
        ("256", Budget(tokens=256)),
        (0.2, Budget(fraction=0.2)),
        ("20%", Budget(fraction=0.2)),
        (1.0, Budget(fraction=1.0)),
        (1, Budget(tokens=1)),
        ("0.5", Budget(fraction=0.5)),
    ],
)
def test_budget_parsing(value, expected):
    assert Budget.parse(value) == expected


@pytest.mark.parametrize(
    "bad", [0, -3, float("nan"), float("inf"), "abc", 2.5, True, "-10%", "0%", "x%", [0.2], {"a": 1}, None]
)
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(bad)


def test_budget_rounds_down_to_whole_blocks():
    assert Budget(fraction=0.2).blocks_for(1024, 32) == 6  # 204.8 tokens -> 6 blocks
    assert Budget(tokens=256).blocks_for(5000, 32) == 8
    assert math.isclose(Budget(fraction=0.5).tokens_for(101), 50)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig(policy="lru")


def test_which_query_rows_score_whole_and_chunked():
    """A prompt of 100 tokens computed in chunks [0, 40), [40, 80), [80, 100), then decoded."""
    every = PolicyConfig("h2o")
    whole = PolicyConfig("h2o", prompt_window=8)
    chunked = PolicyConfig("h2o", prompt_window=8, prefill="chunked")
    chunks = [(0, 40), (40, 80), (80, 100), (100, 101)]
    assert [every.first_scored_position(s, e, 100) for s, e in chunks] == [0, 40, 80, 100]
    assert [whole.first_scored_position(s, e, 100) for s, e in chunks] == [40, 80, 92, 100]  # 40, 80: none
    assert [chunked.first_scored_position(s, e, 100) for s, e in chunks] == [32, 72, 92, 100]


def test_staged_prefill_scores_each_chunk_end_and_the_prompts_last_rows_alone():
    """Staged: each chunk's last W rows, and the prompt's last W rows even where they span two
    chunks; the chunk holding the first of those starts from zero (its scores reset)."""
    staged = PolicyConfig("h2o", prompt_window=8, prefill="staged")
    chunks = [(0, 40), (40, 95), (95, 100), (100, 101)]
    assert [staged.first_scored_position(s, e, 100) for s, e in chunks] == [32, 92, 95, 100]
    assert [staged.resets_scores(s, e, 100) for s, e in chunks] == [False, True, False, False]
    assert [staged.first_scored_position(s, e, 100) for s, e in [(0, 40), (40, 80), (80, 100)]] == [32, 72, 92]
    assert staged.resets_scores(80, 100, 100) and staged.resets_scores(0, 100, 100)  # one chunk: as "whole"
    for other in (
        staged.replace(prefill="chunked"),
        staged.replace(prompt_window=None),  # every row scores: nothing to reset
        staged.replace(policy="streaming"),
        staged.replace(policy="keynorm"),
    ):
        assert not other.resets_scores(40, 95, 100)
    assert staged.evicts_after(40, 100) and not staged.evicts_after(0, 100)
    assert staged.compresses_while_prefilling and not PolicyConfig().compresses_while_prefilling
    with pytest.raises(ValueError, match="working_set"):
        PolicyConfig(prefill="staged", working_set=0)


def test_a_working_set_ranked_by_keys_keeps_the_lowest_norms_until_the_question_scores():
    cfg = PolicyConfig(
        "h2o", Budget(tokens=4), n_sink=0, n_recent=0, prompt_window=2, prefill="staged", working_set=1
    ).replace(prefill_score="key_norm")
    policy, scores = make_policy(cfg), np.array([5.0, 1, 4, 2, 3, 9, 8, 7, 6, 0])
    assert [cfg.ranks_by_keys(n, 20) for n in (10, 18, 19, 20, 21)] == [True, True, False, False, False]
    assert not cfg.ranks_by_keys(10, None) and not cfg.replace(prefill_score="attention").ranks_by_keys(10, 20)
    staging = SequenceView(10, np.ones(10, dtype=bool), scores, None, 20)
    assert policy.select(staging) == [0, 2, 5, 6, 7, 8]  # the four lowest norms stay: 9, 1, 3, 4
    asked = SequenceView(20, np.ones(20, dtype=bool), np.concatenate([scores, np.zeros(10)]), None, 20)
    assert 5 not in policy.select(asked)  # the prompt is in: the highest attention stays, as h2o ranks
    for bad in (
        dict(prefill="chunked"),
        dict(prompt_window=None),  # nothing would reset the norms before the question ranks
        dict(policy="keynorm"),
        dict(policy="streaming"),
    ):
        with pytest.raises(PolicyConfigError, match="prefill_score"):
            cfg.replace(**bad)
    with pytest.raises(PolicyConfigError, match="prefill_score"):
        cfg.replace(prefill_score="keys")


def test_auto_ranks_a_staged_working_set_by_keys_wherever_it_can():
    staged = PolicyConfig("h2o", prompt_window=8, prefill="staged")
    assert staged.prefill_score == "auto" and PolicyConfig().prefill_score == "auto"  # the default
    assert staged.staging_score == "key_norm" and staged.uses_key_norms and staged.ranks_by_keys(10, 100)
    assert staged.replace(prefill_score="attention").staging_score == "attention"
    assert not staged.replace(prefill_score="attention").uses_key_norms
    for elsewhere in (
        staged.replace(prefill="whole"),
        staged.replace(prefill="chunked"),
        staged.replace(prompt_window=None),  # every row scores: nothing resets the norms
        staged.replace(policy="streaming"),
        staged.replace(policy="keynorm"),  # ranks by key norms anyway, highest kept
    ):
        assert elsewhere.staging_score == "attention" and not elsewhere.ranks_by_keys(10, 100)
    assert not staged.replace(prefill="whole").uses_key_norms
    assert Footprint(staged).max_prefix_hit(4096, 4096) == 0  # key norms are not in the prefix cache
    assert Footprint(staged.replace(prefill_score="attention")).max_prefix_hit(4096, 4096) != 0


def test_staged_prefill_keeps_its_working_set_until_the_prompt_is_in():
    """Working set: ``working_set`` x the budget of the whole prompt; after the prompt, the budget."""
    cfg = PolicyConfig("h2o", budget=Budget(fraction=0.2), block_size=32, prefill="staged", working_set=3)
    assert cfg.bounds(1024, 4096).budget_blocks == 3 * 25
    assert cfg.bounds(4096, 4096).budget_blocks == 25 and cfg.bounds(4100, 4096).budget_blocks == 25
    assert cfg.bounds(1024).budget_blocks == 6  # prompt unknown: the budget, as "chunked"
    assert cfg.replace(prefill="chunked").bounds(1024, 4096).budget_blocks == 6
    footprint = Footprint(cfg)
    assert footprint.kept_blocks(4096, prefilling=True) == 75 and footprint.kept_blocks(4096) == 25
    assert footprint.peak_blocks(4096, 512) == 75 + 16
    assert footprint.peak_blocks(4096, 1, prefilling=False) == 25 + 1  # decoding: one block at a time


def _run_prompt(cfg, attention, chunks, block_size):
    """Prefill ``attention`` (rows: queries, columns: keys, causal) chunk by chunk through a ledger as an
    engine does: reset where the policy says, add the scored rows, evict after each chunk (as the policy
    says). Returns the resident blocks once the prompt is in, and the most blocks held at once."""
    from h2o_vllm.ledger import BlockLedger

    prompt = attention.shape[0]
    ledger, policy, held = BlockLedger(block_size, prompt), make_policy(cfg), 0
    for start, end in chunks:
        if cfg.evicts_after(start, prompt):
            ledger.evict(policy)
        ledger.grow(end)
        held = max(held, int(ledger.resident.sum()))
        if cfg.resets_scores(start, end, prompt):
            ledger.reset_scores()
        for row in range(cfg.first_scored_position(start, end, prompt), end):
            keys = np.flatnonzero(ledger.resident.repeat(block_size)[: row + 1])
            ledger.add(keys, attention[row, keys])
    ledger.evict(policy)  # the step after the last chunk: the prompt is in
    return np.flatnonzero(ledger.resident), held


@settings(max_examples=60, deadline=None)
@given(st.integers(6, 24), st.integers(1, 64), st.integers(1, 6), st.randoms(use_true_random=False))
def test_staged_prefill_with_room_for_the_prompt_keeps_what_whole_keeps(blocks, window, chunk_blocks, rng):
    """A working set that holds the whole prompt evicts nothing while prefilling, and the prompt's last
    rows alone rank it: the blocks kept are those of "whole". With a working set of 2, the blocks held
    never exceed the peak admission reserves, and the budget is met once the prompt is in."""
    bs = 4
    prompt = blocks * bs - rng.randrange(bs)
    attention = np.array([[rng.random() for _ in range(prompt)] for _ in range(prompt)])
    chunk = chunk_blocks * bs
    chunks = [(s, min(s + chunk, prompt)) for s in range(0, prompt, chunk)]
    base = PolicyConfig("h2o", budget=Budget(fraction=0.25), n_sink=4, block_size=bs, prompt_window=window)
    whole, _ = _run_prompt(base, attention, [(0, prompt)], bs)
    staged, _ = _run_prompt(base.replace(prefill="staged", working_set=blocks), attention, chunks, bs)
    assert list(staged) == list(whole)
    two = base.replace(prefill="staged", working_set=2)
    kept, held = _run_prompt(two, attention, chunks, bs)
    assert held <= Footprint(two).peak_blocks(prompt, chunk)
    assert len(kept) <= Footprint(two).kept_blocks(prompt)


def test_snapkv_scores_the_prompt_as_h2o_does_and_decoding_not_at_all():
    """The same chunks as above; a decode step's ``chunk_end`` back means none of its rows score."""
    chunks = [(0, 40), (40, 80), (80, 100), (100, 101), (130, 131)]
    for changes in ({}, {"prompt_window": 8}, {"prompt_window": 8, "prefill": "chunked"}):
        h2o, snap = PolicyConfig("h2o", **changes), PolicyConfig("snapkv", **changes)
        assert [snap.first_scored_position(s, e, 100) for s, e in chunks[:3]] == [
            h2o.first_scored_position(s, e, 100) for s, e in chunks[:3]
        ]
        assert [snap.first_scored_position(s, e, 100) for s, e in chunks[3:]] == [101, 131]
        assert [h2o.first_scored_position(s, e, 100) for s, e in chunks[3:]] == [100, 130]
    assert PolicyConfig("snapkv").needs_scores  # the prompt's rows are attention scores


def test_snapkv_ranks_as_h2o_does():
    scores = np.array([0.0, 3.0, 1.0, 0.5, 2.0, 0.0, 9.0, 1.0])
    view = SequenceView.fresh(8 * 4, 4, scores=scores)
    config = PolicyConfig(budget=Budget(tokens=16), n_sink=4, n_recent=4, block_size=4)
    assert make_policy(config.replace(policy="snapkv")).select(view) == make_policy(config).select(view)


@given(
    st.sampled_from(["h2o", "snapkv", "keynorm", "streaming"]),
    st.sampled_from(["whole", "chunked", "staged"]),
    st.none() | st.integers(1, 300),
    st.integers(1, 3000),
    st.integers(0, 1000),
)
def test_a_prefix_cache_hit_never_takes_rows_a_decision_needs(policy, prefill, window, prompt, new):
    """The hit an evicting request may take (whole blocks): with a window, never into the window's rows,
    so they run on a hit as on a miss; chunked, at most what an eviction keeps, so that the hit plus one
    chunk stays within the peak; otherwise vLLM's hit."""
    config = PolicyConfig(policy, block_size=32, prefill=prefill, prompt_window=window, budget=Budget(fraction=0.2))
    cap = Footprint(config).max_prefix_hit(prompt, prompt + new)
    if policy == "keynorm":
        assert cap == 0  # every key's norm must be computed
    elif prefill == "chunked":
        assert cap == Footprint(config).kept_blocks(prompt + new) * 32
    elif prefill == "staged":
        assert cap % 32 == 0 and cap <= Footprint(config).kept_blocks(prompt + new, prefilling=True) * 32
        if policy in ("h2o", "snapkv") and window is not None:
            assert cap <= max(0, prompt - window)
            assert config.first_scored_position(cap, prompt, prompt) <= max(0, prompt - window)
    elif policy in ("h2o", "snapkv") and window is not None:
        assert cap % 32 == 0 and 0 <= cap <= max(0, prompt - window) < cap + 32
        assert config.first_scored_position(cap, prompt, prompt) == max(0, prompt - window)
    else:
        assert cap is None


def test_which_requests_can_evict():
    assert not Footprint(PolicyConfig("none")).can_evict(1000, 100)
    assert not Footprint(PolicyConfig(budget=Budget(tokens=1100))).can_evict(1000, 100)
    assert Footprint(PolicyConfig(budget=Budget(tokens=1099))).can_evict(1000, 100)
    assert Footprint(PolicyConfig(budget=Budget(tokens=1100))).can_evict(1000, None)  # unknown length: it may
    assert Footprint(PolicyConfig(budget=Budget(fraction=1.0))).can_evict(10, 1)


def test_chunked_prefill_compresses_after_every_chunk():
    whole, chunked = PolicyConfig("h2o"), PolicyConfig("h2o", prefill="chunked")
    assert not whole.evicts_after(40, 100) and whole.evicts_after(99, 100) and whole.evicts_after(100, 101)
    assert chunked.evicts_after(40, 100) and not chunked.evicts_after(0, 100)
    with pytest.raises(ValueError, match="prefill"):
        PolicyConfig(prefill="lazy")


@settings(max_examples=300, deadline=None)
@given(
    scenarios(policy=st.sampled_from(["h2o", "keynorm", "streaming"])),
    st.sampled_from(["chunked", "staged"]),
    st.integers(1, 12),
    st.integers(1, 4),
    st.randoms(),
)
def test_chunked_prefill_never_holds_more_than_its_peak(case, prefill, chunk_blocks, new_blocks, rng):
    """Prefill a prompt chunk by chunk, evicting after each, then decode: the blocks held never
    exceed ``peak_blocks`` (what admission reserves) nor ``most_blocks`` (what the door checks);
    once decoding, never more than the decoding peak."""
    cfg, view = case
    cfg = cfg.replace(prefill=prefill)
    bs, chunk = cfg.block_size, chunk_blocks * cfg.block_size - rng.randrange(cfg.block_size)
    prompt, new = view.num_tokens, new_blocks * bs
    peak, most = Footprint(cfg).peak_blocks(prompt + new, chunk), Footprint(cfg).most_blocks(prompt, new, chunk)
    assert Footprint(cfg).kept_blocks(prompt) >= protected_mask(cfg, prompt, -(-prompt // bs)).sum()
    policy = make_policy(cfg)
    resident = np.zeros(0, dtype=bool)
    decoding_peak = Footprint(cfg).peak_blocks(prompt + new, 1, prefilling=False)
    computed, held, held_decoding = 0, 0, 0
    while computed < prompt + new:
        step = min(chunk, prompt - computed) if computed < prompt else 1
        computed += step
        blocks = -(-computed // bs)
        resident = np.concatenate([resident, np.ones(blocks - len(resident), dtype=bool)])
        held = max(held, int(resident.sum()))
        if computed > prompt:
            held_decoding = max(held_decoding, int(resident.sum()))
        scores = np.array([rng.random() for _ in range(blocks)])
        evicted = policy.select(SequenceView(computed, resident.copy(), scores, np.ones(blocks), prompt))
        resident[evicted] = False
    assert held <= peak and held <= most and held_decoding <= decoding_peak
