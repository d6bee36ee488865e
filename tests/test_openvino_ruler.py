"""benchmarks/peers/openvino_ruler.py without OpenVINO: the cases it asks, the budgets it gives
OpenVINO per length, how it reads OpenVINO's tokens, and the committed comparison against its answers."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from benchmark_scripts import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "peers" / "ruler-openvino"


@pytest.fixture(scope="module")
def script():
    with benchmark_script("peers/openvino_ruler") as module:
        yield module


@pytest.fixture(scope="module")
def peer(script):
    return script.peer_module()


def case(key, length, max_tokens=24, expected=("1234567",)):
    meta = {"length": length, "expected": list(expected)}
    return SimpleNamespace(key=key, max_tokens=max_tokens, meta=meta, prompt_tokens=length)


def test_needs_an_h2o_vllm_run(script, capsys, tmp_path):
    with pytest.raises(SystemExit):
        script.parse_args([])
    assert "--h2o-vllm DIR is required" in capsys.readouterr().err
    args = script.parse_args(["--h2o-vllm", str(tmp_path / "h2o-vllm")])
    assert args.out == tmp_path and args.configs == ["full", "h2o_20%_window8", "h2o_20%"]
    assert args.against == ["h2o_20%_window8_max"] and not args.rescore


def test_one_pipeline_per_configuration_and_length_with_that_length_s_budget(script, peer):
    items = [case(f"k{n}/{s}", n) for n in (1024, 4096) for s in range(3)]
    runs = script.openvino_runs(["full", "h2o_20%", "h2o_20%_window8"], items, peer.eviction_budget)
    assert [(r["config"], r["length"]) for r in runs] == [
        ("full", 1024),
        ("full", 4096),
        ("h2o_20%", 1024),
        ("h2o_20%", 4096),
        ("h2o_20%_window8", 1024),
        ("h2o_20%_window8", 4096),
    ]
    assert runs[0]["eviction"] is None and [c["key"] for c in runs[1]["cases"]] == ["k4096/0", "k4096/1", "k4096/2"]
    short, long = runs[2]["eviction"], runs[3]["eviction"]
    assert short == peer.eviction_budget("h2o_20%", 1024, 24)  # what h2o-vllm keeps of 1,048 tokens
    assert long["max_cache_size"] > short["max_cache_size"]
    assert short["snapkv_window_size"] == 1048 and runs[4]["eviction"]["snapkv_window_size"] == 8


def test_refuses_answers_of_other_cases(script):
    items = [case("a", 1024), case("b", 1024)]
    script.check_same_cases(items, [{"key": "a", "prompt_tokens": 1024}, {"key": "b", "prompt_tokens": 1024}])
    with pytest.raises(ValueError, match="not the ones drawn here"):
        script.check_same_cases(items, [{"key": "a", "prompt_tokens": 1024}])
    with pytest.raises(ValueError, match="differ in length"):
        script.check_same_cases(items, [{"key": "a", "prompt_tokens": 1024}, {"key": "b", "prompt_tokens": 1000}])


def test_refuses_a_run_without_ruler_cases(script, tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"settings": {"scenarios": ["needle"]}}))
    (tmp_path / "answers.jsonl").write_text("")
    with pytest.raises(ValueError, match="not a run of RULER-style cases"):
        script.saved_run(tmp_path)


def test_stops_where_vllm_stops(script, tmp_path):
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert script.stop_tokens(tmp_path, tokenizer) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert script.stop_tokens(tmp_path, tokenizer) == [2, 7]


def test_openvino_tokens_become_eval_answers(script, default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    ids = tokenizer(" 1234567.")["input_ids"]
    stop = tokenizer.eos_token_id
    raw = [
        {"config": "h2o_20%", "key": "a", "ids": [*ids, stop], "status": "FINISHED"},
        {"config": "h2o_20%", "key": "b", "ids": ids, "status": "DROPPED_BY_PIPELINE"},
    ]
    got = script.ov_answers(raw, [case("a", 1024), case("b", 1024)], tokenizer, [stop])
    assert got[0]["config"] == "openvino:h2o_20%" and got[0]["text"] == " 1234567." and got[0]["error"] is None
    assert got[0]["completion_tokens"] == len(ids) + 1  # as vLLM counts: the EOS is generated
    assert got[1]["text"] is None and "DROPPED" in got[1]["error"]
    scores = script.case_scores([case("a", 1024), case("b", 1024)], got)
    assert scores == {"openvino:h2o_20%": {"a": 1.0, "b": 0.0}}


def test_comparisons_are_paired_on_the_same_cases(script):
    items = [case(f"c{i}", 1024 if i < 20 else 2048) for i in range(40)]
    right = {i.key: 1.0 for i in items}
    scores = {
        "full": right,
        "h2o_20%": {k: float(n % 2) for n, k in enumerate(right)},
        "streaming_20%": {k: 0.0 for k in right},
        "openvino:full": right,
        "openvino:h2o_20%": {k: 1.0 for k in right},
    }
    scores["h2o_20%_window8_max"] = {k: 1.0 for k in right}
    result = script.compare(items, scores, ["full", "h2o_20%"], ["h2o_20%_window8_max"])
    assert result["lengths"] == [1024, 2048]
    assert result["rates"]["h2o_20%"]["all"]["estimate"] == 0.5 and result["rates"]["h2o_20%"]["1024"]["n"] == 20
    pairs = result["pairs"]
    assert pairs["openvino:full - full"]["estimate"] == 0.0
    assert pairs["openvino:h2o_20% - h2o_20%"]["estimate"] == 0.5
    assert (pairs["openvino:h2o_20% - h2o_20%"]["a_only"], pairs["openvino:h2o_20% - h2o_20%"]["b_only"]) == (20, 0)
    assert pairs["h2o_20% - streaming_20%"]["low"] > 0
    assert pairs["openvino:h2o_20% - h2o_20%_window8_max"]["estimate"] == 0.0
    text = script.tables(result, len(items))
    assert "| openvino:h2o_20% - h2o_20% | +50.0 [" in text and "* | 20/0 |" in text
    assert "| openvino:full - full | +0.0 [+0.0, +0.0] | 0/0 | 1 |" in text


def test_committed_comparison_is_its_answers(script, default_model_dir):
    """The committed ruler.json is what the committed answers of both engines say, on the cases this
    script draws again."""
    from transformers import AutoTokenizer

    from h2o_vllm.datasets import essays_text

    saved = json.loads((COMMITTED / "ruler.json").read_text())
    settings, answers = script.saved_run(COMMITTED / "h2o-vllm")
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    items = script.draw_cases(settings, tokenizer, essays_text())
    script.check_same_cases(items, answers)
    theirs = [json.loads(line) for line in (COMMITTED / "openvino-answers.jsonl").open()]
    script.check_same_cases(items, [a for a in theirs if a["config"] == "openvino:full"])
    configs = [r["config"] for r in saved["openvino_runs"]]
    scores = script.case_scores(items, answers + theirs)
    result = script.compare(items, scores, list(dict.fromkeys(configs)), saved["against"])
    assert result["rates"] == saved["rates"]
    assert result["pairs"] == saved["pairs"]
