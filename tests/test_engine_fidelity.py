"""The engine evicts what the Hugging Face reference evicts, on the real default model.

Budget 256 tokens (25% of a 1024-token prompt), 128 new tokens, block size 32,
scores shared across layers, float32. The reference is ``H2OCache`` (issue #3),
which shares only the policy core with the engine: its scores come from
transformers' attention, the engine's from paged KV. Variants: an observation
window (per-request ``h2o_prompt_window``), ``h2o_score_reduce="max"``,
``h2o_prefill="chunked"`` (compressed after each prefill chunk; the reference is fed the
engine's chunks), and key-norm eviction (per-request ``h2o_policy="keynorm"``, whole and
chunked: the engine sums the norms of the keys its attention writes, the reference those
of transformers' keys).
"""

import pytest
import torch

from h2o_vllm.engine import engine_config, engine_kwargs
from h2o_vllm.engine.observe import StepObserver, inprocess_llm, scheduler_of
from h2o_vllm.policy import Budget

PROMPT_TOKENS, NEW_TOKENS, NUM_PROMPTS = 1024, 128, 3
LONG_TOKENS = 3072  # three longer prompts, compressed chunk by chunk to 256 tokens (1/12)
SETTINGS = engine_config(budget=Budget(tokens=256), n_sink=32)
# The engine prefills in chunks of 384 tokens: scoring every chunk must add up to the whole prompt's.
PREFILL_CHUNK = 384
# A second run scores the prompt with its last 64 queries only (observation window), on one prompt.
WINDOW = 64
# Then score_reduce="max" (each query's largest block mass over layers and heads): with every
# prompt query on prompt 2 (the per-query max must add up over prefill chunks and steps; on
# prompts 0 and 1 it happens to pick what the sum picks), and with the observation window on prompt 1.
NEAR_TIE = 1e-4  # top-2 logit gap under which float rounding may pick either token


@pytest.fixture(scope="module")
def prompts(default_model_dir):
    from transformers import AutoTokenizer

    from h2o_vllm.datasets import essays_text

    ids = AutoTokenizer.from_pretrained(default_model_dir)(essays_text())["input_ids"]
    short = [ids[i * 3000 : i * 3000 + PROMPT_TOKENS] for i in range(NUM_PROMPTS)]
    long = [ids[10000 + i * 4000 : 10000 + i * 4000 + LONG_TOKENS] for i in range(3)]
    return short + long


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="sdpa")


# name -> (prompt index, per-request settings). With prefill "chunked" the prompt is compressed
# after each of the engine's prefill chunks, and the reference is fed the same chunks.
# Prompts 0-2 have 1,024 tokens, 3-5 (long0-2) 3,072.
RUN_ARGS = {
    **{f"prompt{i}": (i, {}) for i in range(NUM_PROMPTS)},
    f"prompt0-window{WINDOW}": (0, {"h2o_prompt_window": WINDOW}),
    "prompt2-max": (2, {"h2o_score_reduce": "max"}),
    f"prompt1-window{WINDOW}-max": (1, {"h2o_prompt_window": WINDOW, "h2o_score_reduce": "max"}),
    "prompt0-chunked": (0, {"h2o_prefill": "chunked"}),
    f"prompt1-chunked-window{WINDOW}-max": (
        1,
        {"h2o_prefill": "chunked", "h2o_prompt_window": WINDOW, "h2o_score_reduce": "max"},
    ),
    **{f"long{i}-chunked": (NUM_PROMPTS + i, {"h2o_prefill": "chunked"}) for i in range(3)},
    # Key-norm eviction on an engine whose default is H2O: the policy is per request.
    "prompt0-keynorm": (0, {"h2o_policy": "keynorm"}),
    "prompt1-keynorm": (1, {"h2o_policy": "keynorm"}),
    "prompt2-keynorm-chunked": (2, {"h2o_policy": "keynorm", "h2o_prefill": "chunked"}),
    "long1-keynorm-chunked": (NUM_PROMPTS + 1, {"h2o_policy": "keynorm", "h2o_prefill": "chunked"}),
}
RUNS = list(RUN_ARGS)
CHUNKED = [name for name in RUNS if "chunked" in name]


def run_reference(model, prompt, extra_args, chunks=None):
    """Greedy tokens, top-2 logit gaps and evicted blocks from the HF reference for one run.

    ``chunks``: the sizes the prompt is fed in (the engine's prefill chunks); whole by default.
    """
    from h2o_vllm import settings
    from h2o_vllm.hf import H2OCache, prefill

    cache = H2OCache.for_model(model, settings.for_request(SETTINGS, extra_args))
    ids, tokens, gaps, evicted_in_prefill = torch.tensor([prompt]), [], [], 0
    with torch.no_grad():
        start = 0
        for size in chunks or [len(prompt)]:
            logits = prefill(model, cache, ids[:, start : start + size])[0]
            start += size
            if start < len(prompt):
                evicted_in_prefill = cache.stats.evicted_blocks
        while True:
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            if len(tokens) == NEW_TOKENS:  # the engine computes no KV for the last token either
                break
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return {
        "tokens": tokens,
        "gaps": gaps,
        "evicted": cache.stats.per_row_evicted[0],
        "evicted_in_prefill": evicted_in_prefill,
    }


@pytest.fixture(scope="module")
def engine(default_model_dir, prompts):
    """Every run in one engine, concurrently; the variants are per-request overrides."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with inprocess_llm(
        str(default_model_dir),
        dtype="float32",
        max_model_len=4096,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=512 * 2**20,
        max_num_batched_tokens=PREFILL_CHUNK,
        # Runs of one prompt go together: with prefix caching they would reuse each other's blocks.
        # Here every run computes its prompt, as the reference does; hits: test_engine_prefix_caching.py.
        enable_prefix_caching=False,
        **engine_kwargs(SETTINGS),
    ) as llm:
        observer = StepObserver(scheduler_of(llm))
        params = [
            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args=args or None)
            for _, args in RUN_ARGS.values()
        ]
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=prompts[i]) for i, _ in RUN_ARGS.values()], params, use_tqdm=False
        )
        lengths = [len(prompts[i]) for i, _ in RUN_ARGS.values()]
    log = observer.log
    assert log.steps > NEW_TOKENS + 2  # the prompts really were prefilled in several chunks
    # The engine core's request ids carry a suffix after the client's ("0-1a2b...").
    evictions = {rid.split("-")[0]: blocks for rid, blocks in log.evictions.items()}
    schedules = {rid.split("-")[0]: steps for rid, steps in log.scheduled.items()}
    runs = []
    for o, length in zip(outputs, lengths):
        scheduled, chunks = schedules[o.request_id], []
        while sum(chunks) < length:  # the prompt's chunks, then one token per step
            chunks.append(scheduled[len(chunks)])
        runs.append({"tokens": list(o.outputs[0].token_ids), "evicted": evictions[o.request_id], "chunks": chunks})
    return runs


@pytest.fixture(scope="module")
def reference(hf_model, prompts, engine):
    return [
        run_reference(hf_model, prompts[i], args, engine[k]["chunks"] if "chunked" in name else None)
        for k, (name, (i, args)) in enumerate(RUN_ARGS.items())
    ]


@pytest.mark.parametrize("index", range(len(RUNS)), ids=RUNS)
def test_engine_evicts_the_reference_blocks(reference, engine, index):
    ref, got = reference[index], engine[index]
    # 1024 prompt tokens -> 8 blocks kept of 32 (of 96 for 3072), then one more block out every 32 tokens.
    assert len(ref["evicted"]) >= 24
    assert got["evicted"] == ref["evicted"]


def test_observation_window_and_max_change_the_choice(reference):
    assert reference[RUNS.index(f"prompt0-window{WINDOW}")]["evicted"] != reference[0]["evicted"]
    assert reference[RUNS.index("prompt2-max")]["evicted"] != reference[2]["evicted"]


@pytest.mark.parametrize("prompt", [0, 1])
def test_keynorm_requests_evict_by_key_norm_not_by_the_engines_default(reference, engine, prompt):
    keynorm = RUNS.index(f"prompt{prompt}-keynorm")
    assert engine[keynorm]["evicted"] != engine[prompt]["evicted"]  # the engine's default, H2O
    evicted = reference[keynorm]["evicted"]
    assert sorted(evicted) != list(range(1, len(evicted) + 1))  # not StreamingLLM's oldest first


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_prefill_evicts_before_the_prompt_is_whole(reference, engine, name):
    index = RUNS.index(name)
    assert len(engine[index]["chunks"]) >= 3  # 1,024 or 3,072 prompt tokens in chunks of at most 384
    assert reference[index]["evicted_in_prefill"] > 0
    whole = f"prompt{RUN_ARGS[name][0]}"  # the same prompt compressed once it is whole, if it runs
    if whole in RUN_ARGS:
        assert reference[index]["evicted"] != reference[RUNS.index(whole)]["evicted"]


@pytest.mark.parametrize("index", range(len(RUNS)), ids=RUNS)
def test_engine_tokens_match_the_reference(reference, engine, index):
    ref, got = reference[index], engine[index]
    if got["tokens"] != ref["tokens"]:
        first = next(i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b)
        assert ref["gaps"][first] < NEAR_TIE, f"tokens diverge at {first} with a top-2 gap of {ref['gaps'][first]}"
