"""Key-norm eviction (``policy="keynorm"``) outside the engine: the transformers reference against a
hand computation from transformers' own keys, rows of mixed policies, and the engine's per-step sums.

The engine against the reference: tests/test_engine_keynorm.py (tiny model) and
tests/test_engine_fidelity.py (default model); the fast cache against the reference:
tests/test_hf_fast_cache.py; the policy core's rules: tests/test_policy.py.
"""

import copy

import numpy as np
import pytest
import torch

from h2o_vllm.hf import H2OCache
from h2o_vllm.policy import Budget, PolicyConfig


def _gqa_model(impl: str = "sdpa", seed: int = 0):
    """A random 2-layer Llama with 2 KV heads shared by 4 query heads, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from h2o_vllm.tiny_model import TINY_CONFIG

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        **{**TINY_CONFIG, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
        attn_implementation=impl,
    )
    return LlamaForCausalLM(config).float().eval()


def _hand_evict(scores, resident, num_tokens, bs, budget_tokens, n_sink, n_recent):
    """The rule, written out: over budget, evict full unprotected resident blocks, highest score first, ties older."""
    budget_blocks = budget_tokens // bs
    excess = int(resident.sum()) - budget_blocks
    candidates = [
        b
        for b in range(len(resident))
        if resident[b] and b >= -(-n_sink // bs) and b < (num_tokens - n_recent) // bs and b < num_tokens // bs
    ]
    if excess <= 0:
        return []
    return sorted(sorted(candidates, key=lambda b: (-scores[b], b))[:excess])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_reference_evicts_what_a_hand_computation_from_plain_keys_says(impl, block_size):
    """transformers' own DynamicCache runs alongside, cut to what the hand computation keeps: each new
    key's L2 norm (summed over KV heads and layers) added to its block once, the highest sum out first.
    The H2OCache must evict the same blocks at every step and give the same logits."""
    from transformers import DynamicCache

    model = _gqa_model(impl)
    plain_model = copy.deepcopy(model)  # the model's own attention, never switched to h2o_
    bs, budget, n_sink, n_recent = block_size, 16 if block_size == 1 else 28, block_size, 2 * block_size
    config = PolicyConfig("keynorm", Budget(tokens=budget), n_sink=n_sink, n_recent=n_recent, block_size=bs)
    cache = H2OCache.for_model(model, config)
    ids = torch.randint(0, 1000, (1, 60), generator=torch.Generator().manual_seed(1))
    prompt = 24
    plain, slots = DynamicCache(), []  # slots: the logical position of each slot of the plain cache
    scores, resident, evicted = np.zeros(0), np.zeros(0, dtype=bool), []
    with torch.no_grad():
        for start, end in [(0, prompt)] + [(t, t + 1) for t in range(prompt, ids.shape[1])]:
            out = model(input_ids=ids[:, start:end], past_key_values=cache, use_cache=True).logits[0, -1]
            ref = plain_model(
                input_ids=ids[:, start:end],
                past_key_values=plain,
                position_ids=torch.arange(start, end)[None],
                use_cache=True,
            ).logits[0, -1]
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            # By hand: the new keys (rotated, as the plain cache holds them) of every layer and KV head.
            slots += list(range(start, end))
            blocks = -(-end // bs)
            scores = np.concatenate([scores, np.zeros(blocks - len(scores))])
            resident = np.concatenate([resident, np.ones(blocks - len(resident), dtype=bool)])
            for layer in plain.layers:
                new_keys = layer.keys[0, :, -(end - start) :].double()  # [kv_heads, new, head_dim]
                for i, position in enumerate(range(start, end)):
                    for head in range(new_keys.shape[0]):
                        scores[position // bs] += float(torch.sqrt((new_keys[head, i] ** 2).sum()))
            gone = _hand_evict(scores, resident, end, bs, budget, n_sink, n_recent)
            resident[gone] = False
            evicted += gone
            assert cache.stats.per_row_evicted[0] == evicted, f"after position {end - 1}"
            keep = [i for i, p in enumerate(slots) if resident[p // bs]]
            slots = [slots[i] for i in keep]
            for layer in plain.layers:
                layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
    assert len(evicted) >= (ids.shape[1] - budget) // bs - 1
    assert sorted(evicted) != list(range(-(-n_sink // bs), -(-n_sink // bs) + len(evicted)))  # not oldest first


def _block_norms(keys: torch.Tensor, bs: int) -> np.ndarray:
    """[kv_heads, tokens, head_dim] -> per block, the sum of the tokens' key norms (summed over the heads given)."""
    norms = keys.double().norm(dim=-1).sum(dim=0)
    return np.array([float(norms[b * bs : (b + 1) * bs].sum()) for b in range(-(-keys.shape[1] // bs))])


@pytest.mark.parametrize("layout", ["shared", "per_layer", "per_head"])
def test_ledgers_hold_each_decision_groups_key_norms(layout):
    """No eviction (a budget of everything): after a prompt, every ledger holds its block's key norms,
    over all layers and KV heads (shared), the layer's KV heads (per_layer), or one KV head (per_head)."""
    from transformers import DynamicCache

    model = _gqa_model("sdpa")
    plain_model = copy.deepcopy(model)  # the model's own attention, never switched to h2o_
    per_layer, per_head = layout != "shared", layout == "per_head"
    bs = 4
    cache = H2OCache.for_model(
        model,
        PolicyConfig("keynorm", Budget(tokens=64), n_sink=0, n_recent=0, block_size=bs),
        per_layer=per_layer,
        per_head=per_head,
    )
    ids = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(2))
    plain = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        plain_model(input_ids=ids, past_key_values=plain, use_cache=True)
    for row in range(2):
        if layout == "shared":
            expected = sum(_block_norms(layer.keys[row], bs) for layer in plain.layers)
            np.testing.assert_allclose(cache.ledgers[0][row].scores, expected, rtol=1e-6)
            continue
        for layer_idx, layer in enumerate(plain.layers):
            if per_head:
                for head in range(2):
                    expected = _block_norms(layer.keys[row, head : head + 1], bs)
                    np.testing.assert_allclose(cache.ledgers[layer_idx][row * 2 + head].scores, expected, rtol=1e-6)
            else:
                np.testing.assert_allclose(
                    cache.ledgers[layer_idx][row].scores, _block_norms(layer.keys[row], bs), rtol=1e-6
                )


def test_rows_of_a_batch_with_keynorm_decide_as_they_would_alone():
    """Attention mass goes only to the H2O row's ledger, key norms only to the keynorm row's."""
    model = _gqa_model("sdpa")
    configs = [
        PolicyConfig("keynorm", Budget(tokens=10), n_sink=2, n_recent=3),
        PolicyConfig("h2o", Budget(tokens=10), n_sink=2, n_recent=3),
        PolicyConfig("streaming", Budget(tokens=10), n_sink=2, n_recent=3),
    ]
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(6))

    def run(cache, batch):
        with torch.no_grad():
            for t in range(ids.shape[1]):
                model(input_ids=batch[:, t : t + 1], past_key_values=cache, use_cache=True)

    batched = H2OCache.for_model(model, configs)
    run(batched, ids.repeat(3, 1))
    kept = []
    for row, config in enumerate(configs):
        alone = H2OCache.for_model(model, config)
        run(alone, ids)
        assert batched.stats.per_row_evicted[row] == alone.stats.per_row_evicted[0], config.policy
        np.testing.assert_allclose(batched.ledgers[0][row].scores, alone.ledgers[0][0].scores, rtol=1e-5)
        kept.append(sorted(alone.layers[0].positions[0].tolist()))
    assert kept[0] != kept[1] and kept[0] != kept[2]


def test_keynorm_needs_no_attention_scores():
    """No attention is scored for keynorm (sdpa recomputes nothing): the cache has no scoring configuration."""
    cache = H2OCache(PolicyConfig("keynorm"), num_layers=2)
    assert cache.scoring is None and cache.key_norms
    assert not H2OCache(PolicyConfig("h2o"), num_layers=2).key_norms


# -- the engine's per-step sums --------------------------------------------------------------


def test_step_key_norms_equal_brute_force():
    """Three requests in one step's key tensor: a prompt chunk of keynorm request A (positions 40..89),
    an H2O request B in between (not summed), and a decoding keynorm request C (position 70); two layers."""
    from h2o_vllm.engine import key_norms, scoring

    bs, kv_heads, head_dim = 32, 3, 16
    qsl = torch.tensor([0, 50, 80, 81], dtype=torch.int32)
    logical_lens = np.array([90, 200, 71])
    context = scoring.StepContext(["A", "B", "C"], {}, set(), key_norms={"A", "C"})
    sums = key_norms.KeyNormSums.for_step(context, qsl, logical_lens, bs)
    torch.manual_seed(0)
    layers = [torch.randn(81, kv_heads, head_dim) for _ in range(2)]
    for key in layers:
        sums.add_layer(key)
    got = sums.collect()
    assert set(got) == {"A", "C"}

    def brute(rows, first_position):
        mass = {}
        for key in layers:
            for i, row in enumerate(rows):
                block = (first_position + i) // bs
                mass[block] = mass.get(block, 0.0) + sum(float(key[row, h].double().norm()) for h in range(kv_heads))
        return mass

    for name, rows, first in (("A", range(0, 50), 40), ("C", range(80, 81), 70)):
        expected = brute(rows, first)
        assert got[name].blocks.tolist() == sorted(expected)
        np.testing.assert_allclose(got[name].mass, [expected[b] for b in sorted(expected)], rtol=1e-12)
        assert got[name].visibility is None
    assert got["A"].blocks.tolist() == [1, 2]  # positions 40..89: blocks 1 and 2


def test_step_key_norms_of_contiguous_rows_read_the_keys_in_place():
    from h2o_vllm.engine import key_norms, scoring

    context = scoring.StepContext(["A", "B"], {}, set(), key_norms={"A", "B"})
    sums = key_norms.KeyNormSums.for_step(context, torch.tensor([0, 3, 4], dtype=torch.int32), np.array([3, 40]), 32)
    assert sums.token_rows == slice(0, 4)
    key = torch.randn(6, 2, 8)  # two padding rows at the end
    sums.add_layer(key)
    got = sums.collect()
    np.testing.assert_allclose(got["A"].mass, [float(key[:3].double().norm(dim=-1).sum())])
    np.testing.assert_allclose(got["B"].mass, [float(key[3].double().norm(dim=-1).sum())])
    assert got["B"].blocks.tolist() == [1]
    none = scoring.StepContext(["A"], {}, set(), key_norms={"Z"})
    assert key_norms.KeyNormSums.for_step(none, torch.tensor([0, 3], dtype=torch.int32), np.array([3]), 32) is None
