"""An fp8 KV cache (``kv_cache_dtype="fp8"``) under H2O, in the real vLLM engine on the tiny model.

vLLM 0.32 keeps fp8 caches with its AVX-512 and AMX attention kernels only. Where this
CPU has them, H2O scores from the fp8 pages (viewed as float8, times the layer's key
scale): a covering budget gives vanilla vLLM's fp8 tokens, and with eviction the fused
operator and the PyTorch path (two implementations reading the same pages) evict the same
blocks and write the same tokens. On a CPU without them vLLM refuses the cache and
``h2o-vllm serve`` refuses it first, with the reason (tests/test_serve_args.py).
"""

import pytest
from engine_support import BLOCK, by_client_id, generate_tokens, random_prompts, start_engine
from test_engine_h2o import EQ_LENGTHS, EQ_NEW

from h2o_vllm.cpu import cpu_flags
from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, num_free_blocks, scheduler_of
from h2o_vllm.patches import engine_seams
from h2o_vllm.policy import Budget

FP8_HERE = bool(cpu_flags() & {"avx512f", "amx_tile"})
FP8 = dict(dtype="bfloat16", kv_cache_dtype="fp8")


def test_fp8_cache_runs_where_vllm_has_fp8_kernels_and_is_refused_elsewhere(tiny_model_dir):
    settings = engine_config(budget=Budget(fraction=0.25))
    if FP8_HERE:
        with start_engine(tiny_model_dir, settings, **FP8) as llm:
            assert generate_tokens(llm, random_prompts([100]), 4)[0]
    else:
        refused = pytest.raises(Exception, match="FP8 KV cache on CPU requires x86 with AVX-512 or AMX")
        with refused, start_engine(tiny_model_dir, settings, **FP8):
            pass


def fp8_large_budget_gives_vanilla_fp8_tokens(tiny_model_dir):
    prompts = random_prompts(EQ_LENGTHS)
    budget = max(p + n for p, n in zip(EQ_LENGTHS, EQ_NEW))
    with start_engine(tiny_model_dir, block_size=BLOCK, **FP8) as llm:
        vanilla = generate_tokens(llm, prompts, EQ_NEW)
    with start_engine(tiny_model_dir, engine_config(budget=Budget(tokens=budget)), **FP8) as llm:
        observer = StepObserver(scheduler_of(llm))
        h2o = generate_tokens(llm, prompts, EQ_NEW)
        assert not observer.log.evictions and observer.log.max_running >= 8
    assert h2o == vanilla


def fp8_eviction_scores_fp8_pages_and_both_scorers_agree(tiny_model_dir, monkeypatch):
    import torch

    seen = []
    scored = engine_seams.scored_key_pages

    def spy(impl, layer, kv_cache):
        pages, scale = scored(impl, layer, kv_cache)
        seen.append((kv_cache.dtype, pages.dtype, scale / impl.scale))
        return pages, scale

    monkeypatch.setattr(engine_seams, "scored_key_pages", spy)
    prompts = random_prompts([300, 420, 550, 610, 700, 800], seed=1)
    settings = engine_config(budget=Budget(fraction=0.25), n_sink=BLOCK)
    runs = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("H2O_VLLM_FUSED_SCORING", fused)
        from h2o_vllm.engine import fused as fused_module

        fused_module.load.cache_clear()
        with start_engine(tiny_model_dir, settings, num_gpu_blocks_override=96, **FP8) as llm:
            scheduler = scheduler_of(llm)
            start = num_free_blocks(scheduler)
            observer = StepObserver(scheduler)
            tokens = generate_tokens(llm, prompts, 120)
            observer.close()
            assert num_free_blocks(scheduler) == start
        evicted = sum(len(b) for b in observer.log.evictions.values())
        assert evicted > 50 and observer.log.max_running == len(prompts)
        runs[fused] = (tokens, by_client_id(observer.log.evictions))
    fused_module.load.cache_clear()
    assert seen and {s[:2] for s in seen} == {(torch.uint8, torch.float8_e4m3fn)}
    assert {s[2] for s in seen} == {1.0}  # the layers' key scale (1.0: the checkpoint has none)
    assert runs["1"] == runs["0"]


# The engine tests exist where vLLM keeps fp8 caches (AVX-512, AMX); elsewhere the refusal above is the test.
if FP8_HERE:
    test_fp8_large_budget_gives_vanilla_fp8_tokens = fp8_large_budget_gives_vanilla_fp8_tokens
    test_fp8_eviction_scores_fp8_pages_and_both_scorers_agree = fp8_eviction_scores_fp8_pages_and_both_scorers_agree
