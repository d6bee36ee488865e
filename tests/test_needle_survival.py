"""benchmarks/needle_survival.py's bookkeeping: which tokens spell a needle, and where it was lost."""

import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def survival():
    with benchmark_script("needle_survival") as module:
        yield module


def test_the_needle_tokens_spell_the_value_and_nothing_else(survival, default_model_dir):
    from transformers import AutoTokenizer

    from h2o_vllm.datasets import essays_text
    from h2o_vllm.evaluation.ruler import ruler_items

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    for item in ruler_items(tokenizer, essays_text(), ["niah_number"], [1024], 3, seed=1):
        value = item.meta["expected"][0]
        ids, span = survival.needle_tokens(tokenizer, item.prompt, value)
        assert ids == tokenizer(item.prompt)["input_ids"]  # what the server computes
        assert span == list(range(span[0], span[-1] + 1))
        assert tokenizer.decode(ids[span[0] : span[-1] + 1]).strip() == value
        assert value not in tokenizer.decode(ids[span[0] + 1 : span[-1] + 1])  # no token to spare


def test_the_first_eviction_of_a_needle_block_decides_where_it_was_lost(survival):
    prompt, needle = 4096, {40, 41}
    before, at_end, answering = (1024, [3, 40]), (4096, [41, 50]), (4100, [41])
    assert survival.outcome([before, at_end], prompt, needle) == "lost before the question"
    assert survival.outcome([(1024, [3, 5]), at_end, answering], prompt, needle) == "lost at compression"
    assert survival.outcome([(1024, [3]), (4096, [50]), answering], prompt, needle) == "lost while answering"
    assert survival.outcome([(1024, [3]), (4096, [50])], prompt, needle) == "kept"
    assert survival.outcome([], prompt, needle) == "kept"
