"""The engine evicts what the Hugging Face reference evicts, on the real default model.

Budget 256 tokens (25% of a 1024-token prompt), 128 new tokens, block size 32,
scores shared across layers, float32. The reference is ``H2OCache`` (issue #3),
which shares only the policy core with the engine: its scores come from
transformers' attention, the engine's from paged KV. Variants: an observation
window (per-request ``h2o_prompt_window``), ``h2o_score_reduce="max"``,
``h2o_prefill="chunked"`` (compressed after each prefill chunk; the reference is fed the
engine's chunks), and key-norm eviction (per-request ``h2o_policy="keynorm"``, whole and
chunked: the engine sums the norms of the keys its attention writes, the reference those
of transformers' keys), and SnapKV (``h2o_policy="snapkv"``: only prompt rows score), and ``h2o_prefill="staged"``
(a working set of ``h2o_working_set`` budgets while prefilling, then the budget ranked by the
prompt's last rows alone: with room for the whole prompt it evicts what "whole" evicts), its working
set ranked by key norms too (``h2o_prefill_score="key_norm"``).
"""

import pytest
import torch
from engine_support import engine_runs, generate, run_reference, start_engine

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, scheduler_of
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
def prompts(essay_ids):
    short = [essay_ids[i * 3000 : i * 3000 + PROMPT_TOKENS] for i in range(NUM_PROMPTS)]
    long = [essay_ids[10000 + i * 4000 : 10000 + i * 4000 + LONG_TOKENS] for i in range(3)]
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
    # SnapKV: H2O whose votes come from the prompt alone (no decode row scores).
    f"prompt0-snapkv-window{WINDOW}": (0, {"h2o_policy": "snapkv", "h2o_prompt_window": WINDOW}),
    "long2-snapkv-chunked": (NUM_PROMPTS + 2, {"h2o_policy": "snapkv", "h2o_prefill": "chunked"}),
    # Staged: two budgets while the 3,072-token prompt prefills, ranked by each chunk's last rows
    # (h2o_prefill_score "attention"), then the prompt's last 64 rows rank what was kept.
    f"long0-staged-attn-window{WINDOW}-max": (
        NUM_PROMPTS,
        {
            "h2o_prefill": "staged",
            "h2o_prefill_score": "attention",
            "h2o_prompt_window": WINDOW,
            "h2o_score_reduce": "max",
        },
    ),
    # The same with the working set ranked by its keys' norms until those rows score: what
    # h2o_prefill_score "auto" (the default) does here.
    f"long0-staged-keys-window{WINDOW}-max": (
        NUM_PROMPTS,
        {"h2o_prefill": "staged", "h2o_prompt_window": WINDOW, "h2o_score_reduce": "max"},
    ),
    # Room for the whole prompt (8 budgets of 8 blocks): nothing goes while it prefills.
    f"prompt0-roomy-staged8-window{WINDOW}": (
        0,
        {"h2o_prefill": "staged", "h2o_working_set": 8, "h2o_prompt_window": WINDOW},
    ),
}
RUNS = list(RUN_ARGS)
FED_IN_CHUNKS = [name for name in RUNS if "chunked" in name or "staged" in name]  # the reference gets the chunks
CHUNKED = [name for name in FED_IN_CHUNKS if "roomy" not in name]


@pytest.fixture(scope="module")
def engine(default_model_dir, prompts):
    """Every run in one engine, concurrently; the variants are per-request overrides."""
    with start_engine(
        default_model_dir,
        SETTINGS,
        max_model_len=4096,
        kv_cache_memory_bytes=512 * 2**20,
        max_num_batched_tokens=PREFILL_CHUNK,
        # Runs of one prompt go together: with prefix caching they would reuse each other's blocks.
        # Here every run computes its prompt, as the reference does; hits: test_engine_prefix_caching.py.
        enable_prefix_caching=False,
    ) as llm:
        observer = StepObserver(scheduler_of(llm))
        runs = RUN_ARGS.values()
        outputs = generate(llm, [prompts[i] for i, _ in runs], NEW_TOKENS, [args or None for _, args in runs])
    assert observer.log.steps > NEW_TOKENS + 2  # the prompts really were prefilled in several chunks
    return engine_runs(outputs, observer.log)


@pytest.fixture(scope="module")
def reference(hf_model, prompts, engine):
    return [
        run_reference(
            hf_model, prompts[i], SETTINGS, args, NEW_TOKENS, engine[k]["chunks"] if name in FED_IN_CHUNKS else None
        )
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


def test_staged_prefill_with_room_for_the_prompt_evicts_what_whole_evicts(reference, engine):
    roomy, whole = RUNS.index(f"prompt0-roomy-staged8-window{WINDOW}"), RUNS.index(f"prompt0-window{WINDOW}")
    assert len(engine[roomy]["chunks"]) >= 3 and reference[roomy]["evicted_in_prefill"] == 0
    assert engine[roomy]["evicted"] == engine[whole]["evicted"]


def test_a_working_set_ranked_by_keys_is_not_the_one_attention_ranks(reference, engine):
    keys, attention = (
        RUNS.index(f"long0-staged-keys-window{WINDOW}-max"),
        RUNS.index(f"long0-staged-attn-window{WINDOW}-max"),
    )
    assert reference[keys]["evicted_in_prefill"] > 0
    assert engine[keys]["evicted"][:24] != engine[attention]["evicted"][:24]


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
