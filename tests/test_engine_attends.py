"""Decode steps of requests that all evicted attend with the fused operator (scores and output in one pass).

The engine runs three H2O requests alone (no request of another policy in the batch), so once each
has evicted, its decode steps call ``attend_layer`` in place of vLLM's kernel and ``score_layer``. It
must still evict what the transformers reference evicts and write its tokens (as
``test_engine_fidelity.py`` checks for the kernel path); a request that never evicts keeps vLLM's
kernel, so with a budget at least the sequence the tokens stay vanilla vLLM's.
"""

import pytest
import torch
from engine_support import engine_runs, generate, run_reference, start_engine

from h2o_vllm.engine import attention, engine_config, scoring
from h2o_vllm.engine.observe import StepObserver, scheduler_of
from h2o_vllm.engine.pages import KeyLayout
from h2o_vllm.policy import Budget

PROMPT_TOKENS, NEW_TOKENS = 1024, 96
SETTINGS = engine_config(budget=Budget(tokens=256), n_sink=32)
NEAR_TIE = 1e-4  # top-2 logit gap under which float rounding may pick either token


@pytest.fixture(scope="module")
def prompts(essay_ids):
    return [essay_ids[i * 3000 : i * 3000 + PROMPT_TOKENS] for i in range(3)]


@pytest.fixture(scope="module")
def engine(default_model_dir, prompts):
    calls = {"attend": 0, "score": 0}
    attend, score = scoring.FusedScorer.attend_layer, scoring.FusedScorer.score_layer

    def counted(name, method):
        def wrapper(self, *args):
            calls[name] += 1
            return method(self, *args)

        return wrapper

    mp = pytest.MonkeyPatch()
    mp.setattr(scoring.FusedScorer, "attend_layer", counted("attend", attend))
    mp.setattr(scoring.FusedScorer, "score_layer", counted("score", score))
    try:
        with start_engine(
            default_model_dir, SETTINGS, max_model_len=PROMPT_TOKENS + NEW_TOKENS, enable_prefix_caching=False
        ) as llm:
            observer = StepObserver(scheduler_of(llm))
            outputs = generate(llm, prompts, NEW_TOKENS)
    finally:
        mp.undo()
    return engine_runs(outputs, observer.log), calls


@pytest.fixture(scope="module")
def reference(default_model_dir, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return [run_reference(model, p, SETTINGS, None, NEW_TOKENS) for p in prompts]


def test_decode_steps_attend_with_the_fused_operator(engine):
    _, calls = engine
    layers = 30
    # All but the prompt steps and the first decode steps before every request evicted.
    assert calls["attend"] >= layers * (NEW_TOKENS - 8), calls
    assert calls["attend"] % layers == 0 and calls["score"] % layers == 0


@pytest.mark.parametrize("index", range(3))
def test_attending_engine_evicts_and_writes_what_the_reference_does(engine, reference, index):
    runs, _ = engine
    ref, got = reference[index], runs[index]
    assert len(ref["evicted"]) >= 20
    assert got["evicted"] == ref["evicted"]
    if got["tokens"] != ref["tokens"]:
        first = next(i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b)
        assert ref["gaps"][first] < NEAR_TIE, f"tokens diverge at {first} with a top-2 gap of {ref['gaps'][first]}"


class _Scorer(scoring.FusedScorer):
    def __init__(self, decodes, prompts=(), layout=KeyLayout.DT):  # no operator needed to decide
        self.decodes, self.prompts, self.key_layout = list(decodes), list(prompts), layout


class _Row:
    def __init__(self, req_id):
        self.req_id = req_id


def test_only_steps_of_scored_decodes_that_all_evicted_attend():
    step = scoring.StepContext(["a", "b"], {}, with_holes={"a", "b"})
    rows = [_Row("a"), _Row("b")]
    assert attention.attends_itself(step, _Scorer(rows), num_reqs=2, num_tokens=2)
    # b never evicted (a budget at least its sequence): vLLM's kernel, so its tokens stay vanilla's
    assert not attention.attends_itself(scoring.StepContext(["a", "b"], {}, {"a"}), _Scorer(rows), 2, 2)
    assert not attention.attends_itself(step, _Scorer(rows[:1]), 2, 2)  # b not scored (StreamingLLM, key norms)
    assert not attention.attends_itself(step, _Scorer(rows, prompts=[_Row("c")]), 3, 40)  # a prompt chunk
    assert not attention.attends_itself(step, _Scorer(rows, layout=KeyLayout.AMX), 2, 2)  # amx pages
