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


def test_results_carry_intervals_and_a_paired_comparison_with_the_full_cache(tmp_path):
    """60 single-needle cases: the full cache finds every key, h2o_20% misses the first 30 and
    streaming_20% one (within noise of the full cache)."""
    from h2o_vllm.evaluation import report
    from h2o_vllm.evaluation.client import Answer
    from h2o_vllm.evaluation.configs import eval_configs
    from h2o_vllm.evaluation.scenarios import Item

    items = [
        Item("ruler", f"niah_number/1024/s{s}", 24, prompt="..", group="niah_number 1K", meta=meta)
        for s, meta in ((s, {"task": "niah_number", "length": 1024, "expected": [str(1000000 + s)]}) for s in range(60))
    ]
    configs = eval_configs(["h2o", "streaming"], [0.2])
    answers = []
    for i, item in enumerate(items):
        value = item.meta["expected"][0]
        answers += [
            Answer("full", "ruler", item.key, f" {value}."),
            Answer("h2o_20%", "ruler", item.key, " 0000000." if i < 30 else f" {value}"),
            Answer("streaming_20%", "ruler", item.key, None if i == 0 else value, "HTTP 500" if i == 0 else None),
        ]
    results = report.score(items, answers, configs, tokenizer=None)
    full, h2o, streaming = (results[n]["ruler"] for n in ("full", "h2o_20%", "streaming_20%"))
    assert full["tasks"]["niah_number"]["estimate"] == 1.0 and full["tasks"]["niah_number"]["method"] == "wilson"
    assert h2o["tasks"]["niah_number"]["estimate"] == 0.5 and h2o["tasks"]["niah_number"]["n"] == 60
    assert h2o["tasks"]["niah_number"]["low"] < 0.5 < h2o["tasks"]["niah_number"]["high"]
    worse, same = h2o["vs_full"]["niah_number"], streaming["vs_full"]["niah_number"]
    assert worse["high"] < 0 and worse["b_only"] == 30 and worse["p_value"] < 1e-6  # worse, shown
    assert same["low"] <= 0 <= same["high"] and same["p_value"] == 1.0  # one miss: no difference shown
    assert "vs_full" in full and not full["vs_full"] and len(h2o["cases"]) == 60
    assert h2o["streaming"] == "streaming_20%" and "vs_streaming" not in streaming and "vs_streaming" not in full
    against = h2o["vs_streaming"]["niah_number"]  # 30 misses against StreamingLLM's one failure
    assert against["high"] < 0 and (against["a_only"], against["b_only"]) == (0, 29) and "all" not in h2o["vs_full"]
    md = report.markdown(results, configs)
    assert "| h2o_20% | 50.0 [" in md and "-50.0 [" in md and " *" in md
    assert "against StreamingLLM at the same budget" in md and "| h2o_20% | -48.3 [" in md
    paths = report.save(tmp_path, "h2o-vllm eval --scenarios ruler", {}, items, answers, results, configs)
    assert paths["ruler_png"].stat().st_size > 1000
    assert '"expected": ["1000000"]' in paths["answers"].read_text()


def test_the_papers_scoring_takes_no_prefix_cache_hit_from_another_configuration():
    """Its decisions depend on which prompt rows run, so its requests carry a cache salt; those whose
    hits the server caps to change nothing do not."""
    from h2o_vllm.evaluation.configs import EvalConfig

    paper = EvalConfig.of("h2o", 0.2)
    _, fields = paper.request_fields("m", "xargs")
    assert fields["cache_salt"] == "h2o-vllm-eval-h2o_20%" and fields["vllm_xargs"]["h2o_prompt_window"] == 0
    assert paper.request_fields("m", "alias")[1] == {"cache_salt": "h2o-vllm-eval-h2o_20%"}
    for budget in (0.1, "20%", 4096):  # what vLLM accepts as a salt: no '/', '@', backslash or NUL, <= 128
        salt = EvalConfig.of("h2o_mean", budget).cache_salt
        assert salt and not set(salt) & set("/@\\\0") and len(salt) <= 128
    for family in ("full", "h2o_window8_max", "streaming", "keynorm", "h2o_chunked"):
        config = EvalConfig.of(family) if family == "full" else EvalConfig.of(family, 0.2)
        assert "cache_salt" not in config.request_fields("m", "xargs")[1], family


def test_ruler_comparisons_cover_every_task_together_and_match_streaming_by_prefill():
    from h2o_vllm.evaluation import report
    from h2o_vllm.evaluation.client import Answer
    from h2o_vllm.evaluation.configs import eval_configs
    from h2o_vllm.evaluation.scenarios import Item

    items = [
        Item("ruler", f"{task}/1024/s{s}", 24, prompt="..", group=f"{task} 1K", meta={"task": task, "expected": ["7"]})
        for task in ("niah_number", "niah_uuid")
        for s in range(20)
    ]
    configs = eval_configs(["h2o_window8_max", "streaming", "h2o_window8_max_chunked", "streaming_chunked"], [0.2])
    assert report.streaming_of(configs) == {
        "h2o_20%_window8_max": "streaming_20%",
        "h2o_20%_window8_max_chunked": "streaming_20%_chunked",
    }
    answers = [
        Answer(c.name, "ruler", i.key, "7" if c.policy != "streaming" or n % 2 else "no")
        for c in configs
        for n, i in enumerate(items)
    ]
    results = report.score(items, answers, configs, tokenizer=None)
    ours = results["h2o_20%_window8_max"]["ruler"]
    assert set(ours["vs_streaming"]) == {"niah_number", "niah_uuid", "all"} and ours["vs_streaming"]["all"]["n"] == 40
    assert ours["vs_streaming"]["all"]["estimate"] == 0.5 and ours["vs_streaming"]["all"]["low"] > 0
    assert ours["vs_full"]["all"]["estimate"] == 0.0 and ours["vs_full"]["all"]["n"] == 40
    md = report.markdown(results, configs)
    assert "| configuration | niah_number | niah_uuid | all |" in md
