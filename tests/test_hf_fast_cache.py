"""The fast transformers cache decides and computes as the reference cache does.

``FastH2OCache`` (fixed buffers written in place, scores and decisions on the device)
against ``H2OCache`` (tensors repacked at every eviction, ledgers on the host): the
logits at every step and the evicted positions, for H2O, key norms and StreamingLLM, on a batch
of 3 left-padded prompts of different lengths, at budgets where eviction happens.
A random 2-layer Llama with 4 query heads sharing 2 KV heads, float32, built here.
"""

import copy
import subprocess
import sys

import pytest
import torch

from h2o_vllm.hf import FastH2OCache, H2OCache, disable_eviction, enable_h2o_llm, enable_streaming_llm, make_cache
from h2o_vllm.policy import Budget, PolicyConfig

PROMPT_LENGTHS = [20, 13, 7]  # left-padded to 20
DECODE_STEPS = 30
LAYOUTS = {"shared": (False, False), "per_layer": (True, False), "per_head": (True, True)}


def _model(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from h2o_vllm.tiny_model import TINY_CONFIG

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        **{**TINY_CONFIG, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
        attn_implementation=impl,
    )
    return LlamaForCausalLM(config).float().eval()


def _prompts(device: str = "cpu"):
    ids = torch.randint(0, 1000, (3, max(PROMPT_LENGTHS)), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        mask[row, -n:] = 1
    return ids.to(device), mask.to(device)


def _decode(model, cache, ids, mask, steps=DECODE_STEPS):
    """Prefill the padded batch, then feed fixed random tokens; logits [batch, steps + 1, vocab] and the
    logical positions each row keeps in each layer after every step."""
    new_tokens = torch.randint(0, 1000, (ids.shape[0], steps), generator=torch.Generator().manual_seed(4))
    logits, kept = [], []
    with torch.no_grad():
        for step in range(steps + 1):
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # as generate() numbers them
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
            )
            logits.append(out.logits[:, -1].cpu())
            kept.append([_kept(cache, layer) for layer in range(len(cache.layers))])
            if step < steps:
                ids = new_tokens[:, step : step + 1].to(mask.device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(logits, dim=1), kept


def _kept(cache, layer_idx: int) -> list[list[int]]:
    """Sorted logical positions each row (batch row, or batch row and KV head) keeps in a layer."""
    positions = cache.layers[layer_idx].positions.cpu()
    padding = cache.padding.cpu().repeat_interleave(positions.shape[0] // len(cache.padding))
    return [sorted(int(p) - int(pad) for p in row if p >= pad) for row, pad in zip(positions, padding)]


def _config(policy: str, block_size: int = 1, **changes) -> PolicyConfig:
    if block_size == 1:
        fields = {"budget": Budget(tokens=12), "n_sink": 2, "n_recent": 4}
    else:
        fields = {"budget": Budget(tokens=16), "n_sink": 4, "n_recent": 8, "block_size": block_size}
    return PolicyConfig(policy, **{**fields, **changes})


def _assert_same(model, config, layout="shared", device="cpu", tolerance=5e-5):
    """The fast cache (on ``device``) against the reference (on the CPU), step by step."""
    per_layer, per_head = LAYOUTS[layout]
    fast_model = model if device == "cpu" else copy.deepcopy(model).to(device)
    reference = H2OCache.for_model(model, config, per_layer=per_layer, per_head=per_head)
    fast = FastH2OCache.for_model(fast_model, config, per_layer=per_layer, per_head=per_head)
    reference_logits, reference_kept = _decode(model, reference, *_prompts())
    fast_logits, fast_kept = _decode(fast_model, fast, *_prompts(device))
    torch.testing.assert_close(fast_logits, reference_logits, rtol=1e-5, atol=tolerance)
    for step, (expected, got) in enumerate(zip(reference_kept, fast_kept)):
        assert got == expected, f"kept positions differ after step {step}"
    assert fast.stats.per_row_evicted == reference.stats.per_row_evicted
    assert fast.stats.evicted_blocks == reference.stats.evicted_blocks > 0
    assert fast.stats.evictions == reference.stats.evictions
    torch.testing.assert_close(fast.resident_tokens().cpu(), reference.resident_tokens().cpu())
    return fast


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("policy", ["h2o", "snapkv", "keynorm", "streaming"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fast_cache_equals_the_reference(impl, policy, layout):
    _assert_same(_model(impl), _config(policy), layout)


@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("policy", ["h2o", "keynorm", "streaming"])
def test_fast_cache_equals_the_reference_in_blocks(policy, layout):
    _assert_same(_model("sdpa"), _config(policy, block_size=4), layout)


@pytest.mark.parametrize(
    "changes",
    [
        {"score_norm": "mean"},
        {"score_reduce": "max"},
        {"prompt_window": 3},
        {"budget": Budget(fraction=0.3), "n_recent": None},
    ],
    ids=["mean", "max", "window", "fraction"],
)
def test_fast_cache_equals_the_reference_for_every_scoring_option(changes):
    _assert_same(_model("sdpa"), _config("h2o", **changes), "shared")
    _assert_same(_model("eager"), _config("h2o", block_size=4, **changes), "per_head")


def test_fast_keynorm_equals_the_reference_with_a_fraction_budget_in_blocks():
    changes = {"budget": Budget(fraction=0.3), "n_recent": None}
    _assert_same(_model("eager"), _config("keynorm", block_size=4, **changes), "per_head")
    _assert_same(_model("sdpa"), _config("keynorm", **changes), "shared")


def test_h2o_keynorm_and_streaming_keep_different_tokens():
    """The equality tests compare decisions that depend on the scores, not on positions only."""
    model = _model("sdpa")
    ids, mask = _prompts()
    kept = {}
    for policy in ("h2o", "keynorm", "streaming"):
        cache = FastH2OCache.for_model(model, _config(policy))
        kept[policy] = _decode(model, cache, ids, mask)[1][-1][0]
    assert kept["h2o"] != kept["streaming"] and kept["keynorm"] not in (kept["h2o"], kept["streaming"])
    assert all(len(row) == 12 for row in kept["h2o"] + kept["keynorm"])


def test_decoding_writes_in_place_into_buffers_of_budget_plus_margin():
    model = _model("sdpa")
    ids, mask = _prompts()
    cache = FastH2OCache.for_model(model, _config("h2o"), margin=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        buffers = [(layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr()) for layer in cache.layers]
        for _ in range(10):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache)
    for layer, pointers in zip(cache.layers, buffers):
        assert layer.key_buffer.shape[2] == 12 + 1  # the budget and one slot for the next token
        assert (layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr()) == pointers  # never reallocated
        assert layer.keys.shape[2] == 12  # what the layer holds
    assert cache.get_seq_length() == max(PROMPT_LENGTHS) + 10


def test_seed_api_generates_with_the_fast_cache_as_with_the_reference():
    model = _model("sdpa")
    ids, mask = _prompts()
    results = {}
    for fast in (True, False):
        enable_h2o_llm(model, n_sink=2, recent_window=4, max_capacity=12, fast=fast)
        assert isinstance(make_cache(model), FastH2OCache) == fast
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
        results[fast] = (out.sequences, out.past_key_values.stats.per_row_evicted)
    assert torch.equal(results[True][0], results[False][0])
    assert results[True][1] == results[False][1]
    enable_streaming_llm(model, n_sink=2, window_size=6)
    assert isinstance(make_cache(model), FastH2OCache) and type(make_cache(model, fast=False)) is H2OCache
    disable_eviction(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["h2o", "keynorm", "streaming"])
def test_fast_cache_equals_the_reference_on_cuda(policy):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU
    _assert_same(_model("sdpa"), _config(policy), "per_layer", device="cuda", tolerance=1e-4)


def test_the_transformers_path_does_not_import_vllm():
    """The lent GPU machine has torch, transformers and triton but no vLLM."""
    code = (
        "import sys, h2o_vllm.hf, h2o_vllm.policy, h2o_vllm.assets, h2o_vllm.tiny_model; "
        "sys.exit(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
