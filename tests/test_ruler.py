"""The RULER-style tasks of ``h2o-vllm eval`` (h2o_vllm/evaluation/ruler.py), without a server."""

import re
from collections import Counter

import pytest

from h2o_vllm.evaluation import ruler

LENGTHS = [1024, 4096]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def items(tokenizer):
    from h2o_vllm.datasets import essays_text

    return ruler.ruler_items(tokenizer, essays_text(), ruler.TASKS, LENGTHS, samples=3)


def by_task(items, task):
    return [i for i in items if i.meta["task"] == task]


def test_every_task_length_and_sample_once_near_its_length(items):
    assert len(items) == len(ruler.TASKS) * len(LENGTHS) * 3
    assert len({i.key for i in items}) == len(items)
    for item in items:
        assert abs(item.prompt_tokens - item.meta["length"]) <= 0.03 * item.meta["length"], item.key
        assert item.scenario == "ruler" and item.prompt and item.meta["expected"]


def test_the_same_arguments_give_the_same_cases_and_another_seed_others(tokenizer):
    from h2o_vllm.datasets import essays_text

    corpus = essays_text()
    once = ruler.ruler_items(tokenizer, corpus, ["niah_uuid", "vt"], [1024], 2)
    again = ruler.ruler_items(tokenizer, corpus, ["niah_uuid", "vt"], [1024], 2)
    other = ruler.ruler_items(tokenizer, corpus, ["niah_uuid", "vt"], [1024], 2, seed=1)
    assert [i.prompt for i in once] == [i.prompt for i in again]
    assert all(a.prompt != b.prompt for a, b in zip(once, other))


def test_needles_hold_what_the_question_asks_for(items):
    for item in by_task(items, "niah_number") + by_task(items, "niah_word") + by_task(items, "niah_uuid"):
        (value,) = item.meta["expected"]
        key = re.search(r"special magic \w+ for ([a-z]+-[a-z]+) mentioned", item.prompt).group(1)
        assert f"for {key} is: {value}." in item.prompt and item.prompt.count(f"for {key} is:") == 1
    for item in by_task(items, "niah_uuid"):
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", item.meta["expected"][0])


def test_multikey_hides_distractors_and_asks_for_one_of_them_anywhere(items):
    asked_first = []
    for item in by_task(items, "niah_multikey"):
        needles = re.findall(r"for ([a-z]+-[a-z]+) is: (\d+)\.", item.prompt)
        assert len(needles) == ruler.NEEDLES_PER_CASE and len({k for k, _ in needles}) == ruler.NEEDLES_PER_CASE
        key = re.search(r"What is the special magic number for ([a-z]+-[a-z]+)", item.prompt).group(1)
        assert dict(needles)[key] == item.meta["expected"][0]
        asked_first.append(needles[0][0] == key)
    assert not all(asked_first)  # the asked needle is not always the first in the text


def test_multivalue_and_multiquery_ask_for_all_four(items):
    for item in by_task(items, "niah_multivalue"):
        values = re.findall(r"for ([a-z]+-[a-z]+) is: (\d+)\.", item.prompt)
        assert len({k for k, _ in values}) == 1 and sorted(v for _, v in values) == sorted(item.meta["expected"])
    for item in by_task(items, "niah_multiquery"):
        values = dict(re.findall(r"for ([a-z]+-[a-z]+) is: (\d+)\.", item.prompt))
        assert len(values) == 4 and sorted(values.values()) == sorted(item.meta["expected"])
        assert all(key in item.prompt.rsplit("\n", 1)[1] for key in values)  # every key is in the question


def test_variable_tracking_is_a_chain_in_order(items):
    for item in by_task(items, "vt"):
        value = re.search(r"assigned the value (\d+) in the text", item.prompt).group(1)
        chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", item.prompt)
        holds, order = {}, []
        for name, source in chain:
            holds[name] = source if source.isdigit() else holds[source[4:]]  # defined before it is used
            order.append(name)
        assert sorted(n for n, v in holds.items() if v == value) == sorted(item.meta["expected"])
        assert len(item.meta["expected"]) == ruler.VT_HOPS + 1


def test_common_words_are_the_ten_most_common(items):
    for item in by_task(items, "cwe"):
        words = Counter(re.findall(r"^\d+\. ([a-z]+)$", item.prompt, flags=re.M))
        top = words.most_common(ruler.CWE_COMMON + 1)
        assert sorted(w for w, _ in top[:-1]) == sorted(item.meta["expected"])
        assert top[-2][1] > top[-1][1]  # no tie at the cut


def test_a_case_scores_the_fraction_of_expected_strings_found():
    assert ruler.case_score("The number is 1234567.", ["1234567"]) == 1.0
    assert ruler.case_score("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    assert ruler.case_score("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case does not matter
    assert ruler.case_score(None, ["x"]) == 0.0 and ruler.case_score("", ["x"]) == 0.0


def test_unknown_tasks_and_lengths_that_do_not_fit_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.ruler_items(tokenizer, "word " * 1000, ["qa_1"], [1024], 1)
    from h2o_vllm.datasets import essays_text

    with pytest.raises(ValueError, match="does not fit"):
        ruler.ruler_items(tokenizer, essays_text(), ["niah_number"], [64], 1)
