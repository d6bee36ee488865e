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


def test_each_finished_configuration_is_written_with_its_paired_difference(survival, tmp_path):
    """A long run writes its files after every configuration, so stopping it keeps what it measured."""
    import json
    from argparse import Namespace

    from report import Run

    cases = [
        {"key": f"k{i}", "value": "1234567", "depth": i / 4, "prompt": [1, 2], "needle_blocks": [0]} for i in range(4)
    ]
    for i, case in enumerate(cases):
        case["whole"] = {"outcome": "kept", "answer": "1234567", "found": 1.0}
        case["staged"] = {"outcome": "lost before the question", "answer": "no", "found": float(i == 0)}
    args = Namespace(out=tmp_path, length=4096, seed=1, dtype="bfloat16", chunk=512)
    run = Run("needle_survival.py --configs whole staged", "abc1234", "test CPU")
    summary = survival.write_results(run, args, "m-4096", "Model", cases, ["whole"])
    assert list(summary) == ["whole"] and summary["whole"]["found"] == 1.0
    summary = survival.write_results(run, args, "m-4096", "Model", cases, ["whole", "staged"])
    assert summary["staged"]["counts"]["lost before the question"] == 4 and summary["staged"]["found"] == 0.25
    data = json.loads((tmp_path / "m-4096.json").read_text())
    assert data["commit"] == "abc1234" and set(data["summary"]) == {"whole", "staged"}
    assert all("prompt" not in case for case in data["cases"]) and all("prompt" in case for case in cases)
    table = (tmp_path / "m-4096.md").read_text()
    assert "| staged | 0 | 0 | 0 | 4 | 25.0% [" in table and "| -75.0 [" in table
    assert (tmp_path / "m-4096.png").stat().st_size > 0
