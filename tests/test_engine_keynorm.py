"""Key-norm eviction (``h2o_policy: keynorm``) in the vLLM engine, on the tiny random-weight model.

With room for everything (a budget of the whole sequence, a recent window longer than any)
the engine computes and adds the key norms every step, evicts nothing, and gives vanilla
vLLM's tokens, prefilling whole and chunked. With eviction, key-norm requests on an engine
whose default policy is H2O evict exactly the blocks the transformers reference
(``H2OCache``, whose norms come from transformers' own keys) evicts and generate its tokens:
budget 25%, float32, requests of every policy running together, prompts prefilled in
chunks of at most 128 tokens and compressed once whole or after every chunk, prefix caching
on (a key-norm request takes no hit: its keys' norms must be computed).
"""

import pytest
import torch
from engine_support import BLOCK, engine_runs, generate, generate_tokens, random_prompts, run_reference, start_engine

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, scheduler_of
from h2o_vllm.policy import Budget

CHUNK = 128  # max_num_batched_tokens: longer prompts are prefilled in several steps
NEAR_TIE = 1e-4  # top-2 logit gap under which float rounding may pick either token


# -- room for everything: vanilla tokens, norms computed all the same -------------------------

EQ_LENGTHS = [17, 45, 96, 130, 222, 317, 480, 650]
EQ_NEW = [40, 33, 64, 20, 48, 90, 25, 70]


def test_keynorm_with_room_for_everything_gives_vanilla_tokens(tiny_model_dir):
    prompts = random_prompts(EQ_LENGTHS, seed=5)
    with start_engine(tiny_model_dir, block_size=BLOCK, max_num_batched_tokens=CHUNK) as llm:
        vanilla = generate_tokens(llm, prompts, EQ_NEW)
    config = engine_config(policy="keynorm", budget=Budget(fraction=1.0), n_recent=4096)
    scored = set()  # requests whose ledger held key norms at some step

    def norms_arrive(scheduler, output, before):
        for req_id, state in scheduler.h2o_requests.items():
            if state.needs_key_norms and state.ledger.scores.sum() > 0:
                scored.add(req_id)
        assert not output.h2o_plan.score_requests  # key-norm requests are never scored

    with start_engine(tiny_model_dir, config, max_num_batched_tokens=CHUNK) as llm:
        observer = StepObserver(scheduler_of(llm), [norms_arrive])
        extra = [{"h2o_prefill": "chunked"} if i % 2 else None for i in range(len(prompts))]  # and whole
        keynorm = generate_tokens(llm, prompts, EQ_NEW, extra)
    assert observer.log.max_running >= 6 and not observer.log.evictions
    assert len(scored) == len(prompts)
    assert keynorm == vanilla


# -- eviction: the engine decides as the transformers reference ---------------------------------

# The engine's default is H2O; key-norm requests ask for it per request. A recent window of one
# block leaves the budget (25% of the sequence) room to choose among the old blocks.
DEFAULTS = engine_config(budget=Budget(fraction=0.25), n_recent=BLOCK)
LENGTHS = [900, 1000, 760, 850, 1100]
NEW_TOKENS = 96
# name -> (prompt, extra args); all in one wave, then "kn-repeat0" and "h2o-repeat0" on prompt 0 again,
# which is in the prefix cache by then.
RUNS = {
    "kn-whole0": (0, {"h2o_policy": "keynorm"}),
    "kn-chunked1": (1, {"h2o_policy": "keynorm", "h2o_prefill": "chunked"}),
    "kn-whole2": (2, {"h2o_policy": "keynorm"}),
    "kn-chunked3": (3, {"h2o_policy": "keynorm", "h2o_prefill": "chunked"}),
    "h2o0": (0, {}),  # the engine's default on the same prompt as kn-whole0
    "streaming4": (4, {"h2o_policy": "streaming"}),
}
REPEAT = {"kn-repeat0": RUNS["kn-whole0"], "h2o-repeat0": RUNS["h2o0"]}
KEYNORM = [name for name in RUNS if name.startswith("kn-")] + ["kn-repeat0"]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=11)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, prompts):
    with start_engine(tiny_model_dir, DEFAULTS, max_num_batched_tokens=CHUNK) as llm:
        scheduler = scheduler_of(llm)
        observer = StepObserver(scheduler)
        names = list(RUNS)
        outputs = generate(
            llm, [prompts[RUNS[n][0]] for n in names], [NEW_TOKENS] * len(names), [RUNS[n][1] for n in names]
        )
        max_running = observer.log.max_running
        outputs += generate(llm, [prompts[0]] * 2, [NEW_TOKENS] * 2, [args for _, args in REPEAT.values()])
        names += list(REPEAT)
        requests_by_policy = dict(scheduler.h2o_totals.requests_by_policy)
    runs = dict(zip(names, engine_runs(outputs, observer.log)))
    return {"runs": runs, "max_running": max_running, "requests_by_policy": requests_by_policy}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts, engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    out = {}
    for name in KEYNORM + ["h2o0"]:
        index, args = {**RUNS, **REPEAT}[name]
        chunked = args.get("h2o_prefill") == "chunked"
        chunks = engine["runs"][name]["chunks"] if chunked else None
        out[name] = run_reference(model.eval(), prompts[index], DEFAULTS, args, NEW_TOKENS, chunks)
    return out


def test_requests_of_every_policy_ran_together(engine):
    assert engine["max_running"] >= len(RUNS)
    assert engine["requests_by_policy"] == {"keynorm": 5, "h2o": 2, "streaming": 1}
    for name in RUNS:
        assert len(engine["runs"][name]["evicted"]) > 0, name


@pytest.mark.parametrize("name", KEYNORM)
def test_engine_evicts_the_reference_blocks(engine, reference, name):
    ref, got = reference[name], engine["runs"][name]
    assert len(ref["evicted"]) >= 15
    assert got["evicted"] == ref["evicted"]


@pytest.mark.parametrize("name", KEYNORM)
def test_engine_tokens_match_the_reference(engine, reference, name):
    ref, got = reference[name], engine["runs"][name]
    if got["tokens"] != ref["tokens"]:
        first = next(i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b)
        assert ref["gaps"][first] < NEAR_TIE, f"tokens diverge at {first} with a top-2 gap of {ref['gaps'][first]}"


def test_a_keynorm_request_evicts_by_key_norm_not_by_the_engines_default(engine, reference):
    """The same prompt under the engine's default (H2O) and under keynorm: other blocks, and not the oldest.

    (h2o0 took prompt 0 from the prefix cache, so its reference would be a cold request with a
    prompt window: tests/test_engine_prefix_caching.py; here the cold H2O reference differs too.)"""
    runs = engine["runs"]
    assert runs["kn-whole0"]["evicted"] != runs["h2o0"]["evicted"]
    assert reference["kn-whole0"]["evicted"] != reference["h2o0"]["evicted"]
    evicted = runs["kn-whole0"]["evicted"]
    assert sorted(evicted) != list(range(1, len(evicted) + 1))  # not StreamingLLM's oldest first


def test_chunked_keynorm_evicts_before_the_prompt_is_whole(engine):
    run = engine["runs"]["kn-chunked1"]
    assert len(run["chunks"]) >= 5
    assert run["evicted"] != engine["runs"]["kn-whole0"]["evicted"]


def test_a_keynorm_request_takes_no_prefix_cache_hit(engine):
    """Prompt 0 is in the prefix cache when the repeats arrive (h2o-repeat0 takes it): a hit would skip
    computing those keys and leave their norms out, so kn-repeat0 takes none and decides as kn-whole0 did."""
    runs = engine["runs"]
    assert runs["h2o-repeat0"]["cached"] >= LENGTHS[0] // BLOCK * BLOCK - BLOCK
    assert runs["kn-repeat0"]["cached"] == 0
    assert runs["kn-repeat0"]["evicted"] == runs["kn-whole0"]["evicted"]
    assert runs["kn-repeat0"]["tokens"] == runs["kn-whole0"]["tokens"]
