"""The engine evicts what the Hugging Face reference evicts, on the real default model.

Budget 256 tokens (25% of a 1024-token prompt), 128 new tokens, block size 32,
scores shared across layers, float32. The reference is ``H2OCache`` (issue #3),
which shares only the policy core with the engine: its scores come from
transformers' attention, the engine's from paged KV. Variants: an observation
window (per-request ``h2o_prompt_window``) and ``h2o_score_reduce="max"``.
"""

import pytest
import torch

from h2o_vllm.engine import engine_config, engine_kwargs
from h2o_vllm.engine.observe import StepObserver, inprocess_llm, scheduler_of
from h2o_vllm.policy import Budget

PROMPT_TOKENS, NEW_TOKENS, NUM_PROMPTS = 1024, 128, 3
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
    return [ids[i * 3000 : i * 3000 + PROMPT_TOKENS] for i in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def run_reference(model, prompts, prompt_window=None, score_reduce="sum"):
    """Greedy tokens, top-2 logit gaps and evicted blocks from the HF reference, per prompt."""
    from h2o_vllm.hf import H2OCache

    runs = []
    for prompt in prompts:
        cache = H2OCache.for_model(model, SETTINGS.replace(prompt_window=prompt_window, score_reduce=score_reduce))
        x, tokens, gaps = torch.tensor([prompt]), [], []
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                gaps.append(float(top2[0] - top2[1]))
                tokens.append(int(logits.argmax()))
                x = torch.tensor([[tokens[-1]]])
        runs.append({"tokens": tokens, "gaps": gaps, "evicted": cache.stats.per_row_evicted[0]})
    return runs


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    return (
        run_reference(hf_model, prompts)
        + run_reference(hf_model, prompts[:1], prompt_window=WINDOW)
        + run_reference(hf_model, prompts[2:3], score_reduce="max")
        + run_reference(hf_model, prompts[1:2], prompt_window=WINDOW, score_reduce="max")
    )


@pytest.fixture(scope="module")
def engine(default_model_dir, prompts):
    """The same runs in the engine; the windowed and max ones are per-request overrides."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with inprocess_llm(
        str(default_model_dir),
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=512 * 2**20,
        max_num_batched_tokens=PREFILL_CHUNK,
        **engine_kwargs(SETTINGS),
    ) as llm:
        observer = StepObserver(scheduler_of(llm))
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        windowed = SamplingParams(
            temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args={"h2o_prompt_window": WINDOW}
        )
        maxed = SamplingParams(
            temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args={"h2o_score_reduce": "max"}
        )
        windowed_max = SamplingParams(
            temperature=0.0,
            max_tokens=NEW_TOKENS,
            ignore_eos=True,
            extra_args={"h2o_prompt_window": WINDOW, "h2o_score_reduce": "max"},
        )
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts + prompts[:1] + prompts[2:3] + prompts[1:2]],
            [params] * len(prompts) + [windowed, maxed, windowed_max],
            use_tqdm=False,
        )
        chunks = observer.log.steps
    by_client_id = {rid.split("-")[0]: blocks for rid, blocks in observer.log.evictions.items()}
    assert chunks > NEW_TOKENS + 2  # the prompts really were prefilled in several chunks
    return [{"tokens": list(o.outputs[0].token_ids), "evicted": by_client_id[o.request_id]} for o in outputs]


RUNS = [f"prompt{i}" for i in range(NUM_PROMPTS)] + [
    f"prompt0-window{WINDOW}",
    "prompt2-max",
    f"prompt1-window{WINDOW}-max",
]


@pytest.mark.parametrize("index", range(len(RUNS)), ids=RUNS)
def test_engine_evicts_the_reference_blocks(reference, engine, index):
    ref, got = reference[index], engine[index]
    # 1024 prompt tokens -> 8 blocks kept of 32, then one more block out every 32 tokens.
    assert len(ref["evicted"]) >= 24
    assert got["evicted"] == ref["evicted"]


def test_observation_window_and_max_change_the_choice(reference):
    assert reference[RUNS.index(f"prompt0-window{WINDOW}")]["evicted"] != reference[0]["evicted"]
    assert reference[RUNS.index("prompt2-max")]["evicted"] != reference[2]["evicted"]


@pytest.mark.parametrize("index", range(len(RUNS)), ids=RUNS)
def test_engine_tokens_match_the_reference(reference, engine, index):
    ref, got = reference[index], engine[index]
    if got["tokens"] != ref["tokens"]:
        first = next(i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b)
        assert ref["gaps"][first] < NEAR_TIE, f"tokens diverge at {first} with a top-2 gap of {ref['gaps'][first]}"
