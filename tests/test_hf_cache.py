"""H2O for transformers: exactness without eviction, real eviction with it, and the seed API.

Uses the tiny random model for mechanics and the real default model where the
weights matter (the exactness test against the unmodified model).
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from h2o_vllm.hf import (
    EvictingCache,
    H2OCache,
    disable_streaming_llm,
    enable_h2o_llm,
    enable_policy,
    enable_streaming_llm,
)
from h2o_vllm.policy import Budget, PolicyConfig

PROMPTS = [
    "The history of the Roman empire is long and complicated. It began when",
    "Water boils at",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.padding_side = "left"
    return tok


def _load(path, impl, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_budget_as_large_as_the_sequence_gives_the_unmodified_tokens(default_model_dir, tokenizer, impl):
    model = _load(default_model_dir, impl)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # batch of 2, left-padded
    baseline = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    enable_h2o_llm(model, n_sink=4, recent_window=8, max_capacity=inputs.input_ids.shape[1] + 24)
    with_h2o = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    disable_streaming_llm(model)
    again = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(baseline, with_h2o)
    assert torch.equal(baseline, again)


def _run_tokens(model, cache, ids):
    """Feed ``ids`` [batch, n] one token at a time through ``cache``; return per-step logits."""
    logits = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_eviction_frees_memory_and_holds_the_budget(tiny_model_dir, impl, block_size):
    model = _load(tiny_model_dir, impl)
    cfg = PolicyConfig("h2o", Budget(tokens=16), n_sink=block_size, n_recent=2 * block_size, block_size=block_size)
    cache = H2OCache.for_model(model, cfg)
    ids = torch.randint(0, 1000, (2, 60), generator=torch.Generator().manual_seed(0))
    _run_tokens(model, cache, ids)
    for layer in cache.layers:
        assert layer.keys.shape[-2] <= 16  # evicted KV is gone from the tensors
        assert layer.seen == 60  # logical positions kept counting
    assert cache.get_seq_length() == 60
    assert cache.stats.evicted_blocks > 0
    for row in range(2):
        kept = sorted(cache.layers[0].positions[row].tolist())
        assert kept[:block_size] == list(range(block_size))  # sinks stay
        assert kept[-2 * block_size :] == list(range(60 - 2 * block_size, 60))  # the recent window stays


def _assert_matches_a_plain_cache_cut_by_hand(model, cache, ids, tolerance):
    """Each step's logits equal those of transformers' own DynamicCache from which the same
    slots were cut by hand, layer by layer and KV head by KV head: masks, positions and
    repacking are right."""
    import copy

    from transformers import DynamicCache

    reference_model = copy.deepcopy(model)  # the same weights, with the model's own attention back
    reference_model.set_attn_implementation(model.config._attn_implementation.removeprefix("h2o_"))
    plain, positions = DynamicCache(), None  # positions: [layer][kv head] of the plain cache's slots
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            ref = reference_model(
                input_ids=ids[:, t : t + 1], past_key_values=plain, position_ids=torch.tensor([[t]]), use_cache=True
            ).logits[0, -1]
            torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
            kv_heads = plain.layers[0].keys.shape[1]
            if positions is None:
                positions = [[[] for _ in range(kv_heads)] for _ in plain.layers]
            for layer_idx, layer in enumerate(plain.layers):
                kept_heads = _kept_per_head(cache, layer_idx, 0)
                keys, values = [], []
                for h in range(kv_heads):
                    kept = set(kept_heads[h if cache.per_head else 0])
                    positions[layer_idx][h].append(t)
                    index = [i for i, p in enumerate(positions[layer_idx][h]) if p in kept]
                    positions[layer_idx][h] = [positions[layer_idx][h][i] for i in index]
                    keys.append(layer.keys[:, h : h + 1, index])
                    values.append(layer.values[:, h : h + 1, index])
                layer.keys, layer.values = torch.cat(keys, dim=1), torch.cat(values, dim=1)


def _kept_per_head(cache, layer_idx: int, row: int) -> list[list[int]]:
    """Logical positions each KV head of batch row ``row`` keeps (one list without per_head)."""
    layer = cache.layers[layer_idx]
    return [
        sorted(p for p in layer.positions[row * cache.rows_per_sequence + h].tolist() if p >= 0)
        for h in range(cache.rows_per_sequence)
    ]


def test_cache_matches_a_plain_cache_with_the_same_slots_removed(tiny_model_dir):
    model = _load(tiny_model_dir, "sdpa")
    cfg = PolicyConfig("h2o", Budget(tokens=12), n_sink=2, n_recent=4, block_size=1)
    cache = H2OCache.for_model(model, cfg)
    ids = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(1))
    _assert_matches_a_plain_cache_cut_by_hand(model, cache, ids, tolerance=1e-5)
    assert cache.layers[0].keys.shape[-2] == 12 and cache.stats.evicted_blocks == 30 - 12


def test_a_cache_without_the_attention_wrapper_is_refused(tiny_model_dir):
    model = _load(tiny_model_dir, "sdpa")
    cache = H2OCache(PolicyConfig("h2o"), num_layers=2)
    with pytest.raises(RuntimeError, match="h2o_eager or h2o_sdpa"), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=cache)


def test_token_level_h2o_keeps_heavy_hitters_that_streaming_drops(tiny_model_dir):
    model = _load(tiny_model_dir, "eager")
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    h2o = H2OCache.for_model(model, PolicyConfig("h2o", Budget(tokens=12), n_sink=2, n_recent=4))
    streaming = H2OCache.for_model(model, PolicyConfig("streaming", Budget(tokens=12), n_sink=2, n_recent=10))
    _run_tokens(model, h2o, ids)
    _run_tokens(model, streaming, ids)
    assert sorted(streaming.layers[0].positions[0].tolist()) == [0, 1] + list(range(30, 40))
    kept = sorted(h2o.layers[0].positions[0].tolist())
    assert len(kept) == 12 and kept[:2] == [0, 1] and kept[-4:] == [36, 37, 38, 39]
    assert any(2 <= p < 30 for p in kept)  # heavy hitters from the middle


def test_per_layer_decisions_differ_between_layers(tiny_model_dir):
    model = _load(tiny_model_dir, "sdpa")
    cfg = PolicyConfig("h2o", Budget(tokens=10), n_sink=1, n_recent=2)
    cache = H2OCache.for_model(model, cfg, per_layer=True)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    _run_tokens(model, cache, ids)
    kept = [tuple(sorted(layer.positions[0].tolist())) for layer in cache.layers]
    assert all(len(k) == 10 for k in kept)
    assert kept[0] != kept[1]


def test_prompt_is_compressed_right_after_prefill_and_scoring_is_chunked(tiny_model_dir):
    model = _load(tiny_model_dir, "sdpa")
    cfg = PolicyConfig("h2o", Budget(fraction=0.25), n_sink=4, n_recent=8, block_size=4)
    full = H2OCache.for_model(model, cfg, score_chunk=16)
    windowed = H2OCache.for_model(model, cfg.replace(prompt_window=8), score_chunk=16)
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=full, use_cache=True)
        model(input_ids=ids, past_key_values=windowed, use_cache=True)
    assert full.layers[0].keys.shape[-2] == 48  # 25% of 200 = 50 tokens -> 12 blocks of 4
    assert windowed.layers[0].keys.shape[-2] == 48
    assert full.stats.per_row_evicted != windowed.stats.per_row_evicted  # the window changes the choice


def test_staged_prefill_with_room_for_the_prompt_keeps_what_a_whole_prefill_keeps(tiny_model_dir):
    """Prefill "staged" in chunks: with a working set that holds the prompt, nothing goes while it
    prefills and the prompt's last rows alone rank it, so the blocks kept are those of a whole
    prefill; with a working set of 2 budgets, blocks go between chunks and the budget holds after."""
    from h2o_vllm.hf import prefill

    model = _load(tiny_model_dir, "sdpa")
    ids = torch.randint(0, 1000, (1, 203), generator=torch.Generator().manual_seed(6))
    cfg = PolicyConfig("h2o", Budget(fraction=0.2), n_sink=4, block_size=8, prompt_window=8, score_reduce="max")
    caches = {}
    for name, config, chunk in (
        ("whole", cfg, None),
        ("roomy", cfg.replace(prefill="staged", working_set=10), 48),
        ("staged2", cfg.replace(prefill="staged", working_set=2), 48),
    ):
        caches[name] = H2OCache.for_model(model, config, score_chunk=16)
        prefill(model, caches[name], ids, chunk)
    assert caches["roomy"].stats.per_row_evicted == caches["whole"].stats.per_row_evicted != [[]]
    assert caches["staged2"].stats.per_row_evicted != caches["whole"].stats.per_row_evicted
    assert caches["staged2"].layers[0].keys.shape[-2] == caches["whole"].layers[0].keys.shape[-2]  # the budget


def test_chunked_scores_equal_eager_probabilities(tiny_model_dir):
    """SDPA scoring (recomputed in chunks) ranks exactly as eager's own probabilities do."""
    ids = torch.randint(0, 1000, (1, 90), generator=torch.Generator().manual_seed(5))
    cfg = PolicyConfig("h2o", Budget(tokens=30), n_sink=2, n_recent=6)
    ledgers = {}
    for impl in ("sdpa", "eager"):
        model = _load(tiny_model_dir, impl)
        cache = H2OCache.for_model(model, cfg, score_chunk=7)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        ledgers[impl] = cache
    np.testing.assert_allclose(ledgers["sdpa"].ledgers[0][0].scores, ledgers["eager"].ledgers[0][0].scores, rtol=1e-4)
    assert ledgers["sdpa"].stats.per_row_evicted == ledgers["eager"].stats.per_row_evicted


def test_seed_api_validates_and_switches(tiny_model_dir, tokenizer):
    model = _load(tiny_model_dir, "sdpa")
    with pytest.raises(ValueError, match="max_capacity"):
        enable_h2o_llm(model, n_sink=8, recent_window=32, max_capacity=16)
    enable_streaming_llm(model, n_sink=2, window_size=6)
    assert model.config._attn_implementation == "h2o_sdpa"
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 20
    disable_streaming_llm(model)
    assert model.config._attn_implementation == "sdpa"
    flash = _load(tiny_model_dir, "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"):
        enable_policy(flash, PolicyConfig("h2o"))


def test_rows_of_a_batch_can_follow_different_policies(tiny_model_dir):
    """One batched pass with a policy per row decides exactly as separate runs do."""
    model = _load(tiny_model_dir, "sdpa")
    configs = [
        PolicyConfig("h2o", Budget(tokens=10), n_sink=2, n_recent=3),
        PolicyConfig("streaming", Budget(tokens=10), n_sink=2, n_recent=3),
        PolicyConfig("none"),
    ]
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(6))
    batched = H2OCache.for_model(model, configs)
    batched_logits = _run_tokens(model, batched, ids.repeat(3, 1))
    for row, cfg in enumerate(configs):
        alone = H2OCache.for_model(model, cfg)
        alone_logits = _run_tokens(model, alone, ids)
        kept_alone = sorted(alone.layers[0].positions[0].tolist())
        kept_batched = sorted(p for p in batched.layers[0].positions[row].tolist() if p >= 0)
        assert kept_batched == kept_alone
        torch.testing.assert_close(batched_logits[row], alone_logits[0], rtol=1e-4, atol=1e-4)
    assert len(kept_batched) == 32  # the 'none' row kept everything


def _gqa_model(impl: str, seed: int = 0):
    """A random 2-layer Llama with 2 KV heads shared by 4 query heads (the tiny model has one KV head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from h2o_vllm.tiny_model import TINY_CONFIG

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        **{**TINY_CONFIG, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
        attn_implementation=impl,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_per_head_cache_matches_a_plain_cache_cut_head_by_head(impl):
    """Each KV head keeps its own tokens, and attention sees exactly those."""
    model = _gqa_model(impl)
    cfg = PolicyConfig("h2o", Budget(tokens=12), n_sink=2, n_recent=4, block_size=1)
    cache = H2OCache.for_model(model, cfg, per_layer=True, per_head=True)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(7))
    _assert_matches_a_plain_cache_cut_by_hand(model, cache, ids, tolerance=1e-4)
    kept = [_kept_per_head(cache, layer_idx, 0) for layer_idx in range(2)]
    assert all(
        len(head) == 12 and head[:2] == [0, 1] and head[-4:] == [36, 37, 38, 39] for heads in kept for head in heads
    )
    assert any(heads[0] != heads[1] for heads in kept)  # the heads chose differently
    assert cache.resident_tokens().tolist() == [12.0]


def test_per_head_scores_are_each_kv_heads_attention_mass():
    """A KV head's ledger holds the attention its query heads gave each token, summed over queries."""
    model = _gqa_model("eager")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions  # [batch, 4 heads, q, k] per layer
    cache = H2OCache.for_model(
        model, PolicyConfig("h2o", Budget(tokens=64), n_sink=1, n_recent=1), per_layer=True, per_head=True
    )
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    for layer_idx, probs in enumerate(attentions):
        per_kv_head = probs.view(2, 2, 2, 24, 24).sum(dim=(2, 3))  # [batch, kv head, key]
        for row in range(2):
            for h in range(2):
                np.testing.assert_allclose(
                    cache.ledgers[layer_idx][row * 2 + h].scores, per_kv_head[row, h].numpy(), rtol=1e-4, atol=1e-6
                )


def test_per_head_rows_of_a_batch_decide_as_they_would_alone():
    model = _gqa_model("sdpa")
    configs = [
        PolicyConfig("h2o", Budget(tokens=10), n_sink=2, n_recent=3),
        PolicyConfig("h2o", Budget(tokens=14), n_sink=1, n_recent=6),
    ]
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(9))
    batched = H2OCache.for_model(model, configs, per_layer=True, per_head=True)
    batched_logits = _run_tokens(model, batched, ids)
    for row, cfg in enumerate(configs):
        alone = H2OCache.for_model(model, cfg, per_layer=True, per_head=True)
        alone_logits = _run_tokens(model, alone, ids[row : row + 1])
        for layer_idx in range(2):
            assert _kept_per_head(batched, layer_idx, row) == _kept_per_head(alone, layer_idx, 0)
        torch.testing.assert_close(batched_logits[row], alone_logits[0], rtol=1e-4, atol=1e-4)


def test_per_head_needs_per_layer(tiny_model_dir):
    with pytest.raises(ValueError, match="per_layer"):
        H2OCache(PolicyConfig("h2o"), num_layers=2, per_head=True)
    with pytest.raises(ValueError, match="per_layer"):
        enable_h2o_llm(_load(tiny_model_dir, "sdpa"), per_head=True)


def test_seed_api_evicts_in_a_manual_forward_loop_from_none(tiny_model_dir):
    """Streaming-perplexity scripts call the model token by token from ``past_key_values=None``:
    the enabled policy must hold there too, and decide as ``generate()`` does."""
    import warnings

    from transformers import DynamicCache

    model = _load(tiny_model_dir, "sdpa")
    enable_h2o_llm(model, n_sink=4, recent_window=8, max_capacity=32)
    ids = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(3))
    pkv = None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            pkv = model(input_ids=ids[:, t : t + 1], past_key_values=pkv, use_cache=True).past_key_values
    assert isinstance(pkv, EvictingCache) and pkv.get_seq_length() == 200
    assert all(layer.keys.shape[-2] <= 32 for layer in pkv.layers)  # 200 tokens seen, 32 kept
    # A whole prompt then greedy tokens, by hand and by generate(): the same tokens and evictions.
    prompt, new = ids[:, :60], 40
    with torch.no_grad():
        out = model(input_ids=prompt)  # use_cache from the model's config
        cache, tokens = out.past_key_values, []
        for i in range(new):
            tokens.append(int(out.logits[0, -1].argmax()))
            if i < new - 1:
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache)
    generated = model.generate(
        input_ids=prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, pad_token_id=0
    )
    assert generated.sequences[0, 60:].tolist() == tokens
    assert generated.past_key_values.stats.per_row_evicted == cache.stats.per_row_evicted
    assert cache.stats.evicted_blocks > 0
    # A cache that cannot evict is used as given, with a warning, once.
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True)
        model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True)
    assert len([w for w in caught if "keeps every token" in str(w.message)]) == 1
    disable_streaming_llm(model)
    assert type(model(input_ids=prompt, use_cache=True).past_key_values) is DynamicCache
