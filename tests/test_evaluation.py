"""The pieces of ``h2o-vllm eval`` without a server: scores, requests, configurations, tables."""

import json

import pytest

from h2o_vllm import aliases
from h2o_vllm.engine.settings import ENGINE_DEFAULTS
from h2o_vllm.evaluation import metrics, report, scenarios
from h2o_vllm.evaluation.client import Answer, request_body, server_root
from h2o_vllm.evaluation.configs import EvalConfig, EvalConfigError, eval_configs
from h2o_vllm.evaluation.run import main as eval_main
from h2o_vllm.policy import Budget
from h2o_vllm.settings import for_request


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def corpus():
    from h2o_vllm.datasets import essays_text

    return essays_text()


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" = the cat on mat (4): P = R = 4/6.
    assert metrics.rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert metrics.rouge_l("a b c", "a b c") == 1.0
    assert metrics.rouge_l("x y", "a b") == 0.0
    assert metrics.rouge_l("", "") == 1.0 and metrics.rouge_l("", "a") == 0.0


def test_rouge_l_equals_google_rouge_score():
    from rouge_score import rouge_scorer  # comes with lm-eval, in the test extra

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("Startups grow fast; most of them die.", "Most startups die, and the rest grow fast!"),
        ("It's 2024: we wrote 3 essays.", "we wrote three essays in 2024"),
        ("Hello, World", "world hello hello"),
    ]
    for cand, ref in pairs:
        assert metrics.rouge_l(cand, ref) == pytest.approx(scorer.score(ref, cand)["rougeL"].fmeasure)


def test_passkey_and_prefix():
    assert metrics.passkey_found(" 48213. Remember it.", "48213")
    assert not metrics.passkey_found(" 4821 3", "48213") and not metrics.passkey_found(" none", "48213")
    assert not metrics.passkey_found(" 482130", "48213")
    assert metrics.matched_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2 and metrics.matched_prefix([1], [1, 2]) == 1


def test_needle_items_hide_one_key_at_the_asked_depth(tokenizer, corpus):
    items = scenarios.needle_items(tokenizer, corpus, [512, 1024], [0.1, 0.9], samples=2)
    again = scenarios.needle_items(tokenizer, corpus, [512, 1024], [0.1, 0.9], samples=2)
    assert items == again and len(items) == 8 and len({i.key for i in items}) == 8
    assert len({i.answer for i in items}) == 8
    for item in items:
        length, depth = item.meta["length"], item.meta["depth"]
        assert abs(item.prompt_tokens - length) <= 8, (item.key, item.prompt_tokens)
        assert item.prompt.endswith(scenarios.NEEDLE_QUESTION) and item.prompt.count(item.answer) == 2
        where = item.prompt.index(scenarios.NEEDLE.format(key=item.answer))
        assert abs(where / len(item.prompt) - depth) < 0.1
        assert item.group == f"{length // 1024}K" if length >= 1024 else item.group == str(length)
    with pytest.raises(ValueError, match="depth"):
        scenarios.needle_items(tokenizer, corpus, [512], [1.5], samples=1)
    with pytest.raises(ValueError, match="does not fit"):
        scenarios.needle_items(tokenizer, corpus, [20], [0.5], samples=1)


def test_fidelity_and_summary_items(tokenizer, corpus):
    from h2o_vllm.datasets import essays_dir

    fid = scenarios.fidelity_items(tokenizer, corpus, prompts=3, prompt_tokens=256, new_tokens=64)
    assert [i.key for i in fid] == ["p0", "p1", "p2"] and len({i.prompt for i in fid}) == 3
    assert all(abs(i.prompt_tokens - 256) <= 4 and i.ignore_eos and i.max_tokens == 64 for i in fid)
    essays = [(f.stem, f.read_text()) for f in sorted(essays_dir().glob("*.txt"))]
    summ = scenarios.summary_items(tokenizer, essays, count=2, essay_tokens=1024, new_tokens=32)
    assert len(summ) == 2 and all(i.messages[0]["content"].startswith(scenarios.SUMMARY_INSTRUCTION) for i in summ)
    with pytest.raises(ValueError, match="essays have"):
        scenarios.summary_items(tokenizer, essays, count=2, essay_tokens=10**6, new_tokens=32)


def test_configs_select_policy_per_request():
    configs = eval_configs(["streaming", "h2o", "h2o-window", "h2o-window-max", "h2o-mean"], [0.1, 0.2], window=16)
    assert [c.name for c in configs] == [
        "full",
        "streaming_10%",
        "streaming_20%",
        "h2o_10%",
        "h2o_20%",
        "h2o_10%_window16",
        "h2o_20%_window16",
        "h2o_10%_window16_max",
        "h2o_20%_window16_max",
        "h2o_10%_mean",
        "h2o_20%_mean",
    ]
    assert configs[0].xargs() == {"h2o_policy": "none"}
    assert configs[1].xargs() == {"h2o_policy": "streaming", "h2o_budget": 0.1, "h2o_prefill": "whole"}
    h2o = {"h2o_policy": "h2o", "h2o_budget": 0.2, "h2o_score_norm": "sum", "h2o_prefill": "whole"}
    assert configs[4].xargs() == {**h2o, "h2o_prompt_window": 0, "h2o_score_reduce": "sum"}
    assert configs[6].xargs() == {**h2o, "h2o_prompt_window": 16, "h2o_score_reduce": "sum"}
    assert configs[8].xargs() == {**h2o, "h2o_prompt_window": 16, "h2o_score_reduce": "max"}
    assert configs[10].xargs() == {**h2o, "h2o_prompt_window": 0, "h2o_score_reduce": "sum", "h2o_score_norm": "mean"}
    for c in configs[3:]:  # the server accepts every field the configurations send
        for_request(ENGINE_DEFAULTS, c.xargs())
    with pytest.raises(EvalConfigError, match="no model-name alias"):
        configs[8].alias("m")
    with pytest.raises(EvalConfigError, match="no model-name alias"):
        configs[10].alias("m")
    assert configs[4].request_fields("m", "alias") == ("m@h2o-0.2", {"cache_salt": "h2o-vllm-eval-h2o_20%"})
    assert configs[0].request_fields("m", "alias") == ("m@full", {})
    assert configs[2].request_fields("m", "xargs") == (
        "m",
        {"vllm_xargs": {"h2o_policy": "streaming", "h2o_budget": 0.2, "h2o_prefill": "whole"}},
    )
    with pytest.raises(EvalConfigError, match="alias"):
        configs[6].alias("m")
    for bad in [dict(family="lru", budget=0.2), dict(family="h2o_20%", budget=0.2)]:
        with pytest.raises(EvalConfigError):
            EvalConfig.of(**bad)


@pytest.mark.parametrize("budget", [None, 1.5, "1.5", 1.0, "1", "100%", 0, "0", -0.2, "-3", "abc", "nan", True])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(EvalConfigError, match="budget"):
        EvalConfig.of("h2o", budget)


def test_token_budgets():
    configs = eval_configs(["streaming", "h2o_window8_max"], ["1024", "20%", 0.2, 256, Budget(tokens=64)])
    assert [c.name for c in configs] == [  # 20% and 0.2 are one configuration
        "full",
        "streaming_1024",
        "streaming_20%",
        "streaming_256",
        "streaming_64",
        "h2o_1024_window8_max",
        "h2o_20%_window8_max",
        "h2o_256_window8_max",
        "h2o_64_window8_max",
    ]
    assert configs[0].budget is None
    assert configs[1].budget == Budget(tokens=1024) and configs[2].budget == Budget(fraction=0.2)
    assert configs[1].policy == "streaming" and configs[5].policy == "h2o_window8_max"
    assert configs[1].xargs() == {"h2o_policy": "streaming", "h2o_budget": 1024, "h2o_prefill": "whole"}
    assert configs[5].xargs() == {
        "h2o_policy": "h2o",
        "h2o_budget": 1024,
        "h2o_prompt_window": 8,
        "h2o_score_norm": "sum",
        "h2o_score_reduce": "max",
        "h2o_prefill": "whole",
    }
    for c in configs[1:]:
        assert for_request(ENGINE_DEFAULTS, c.xargs()).budget == c.budget


def test_token_budgets_have_model_name_aliases():
    """The alias the evaluation asks for is one the server reads as the same budget (if it lists it)."""
    for budget, suffix in [("1024", "h2o-1024"), ("20%", "h2o-0.2"), (0.125, "h2o-0.125")]:
        config = EvalConfig.of("h2o", budget)
        assert config.alias("m") == f"m@{suffix}"
        model, args = aliases.split_alias(config.alias("m"))
        assert model == "m" and args == {"h2o_policy": "h2o", "h2o_budget": config.xargs()["h2o_budget"]}
    assert aliases.split_alias(EvalConfig.of("streaming", 256).alias("m"))[1]["h2o_budget"] == 256
    with pytest.raises(EvalConfigError, match="no model-name alias"):
        EvalConfig.of("h2o_window8", 1024).alias("m")


def test_chunked_families_send_their_prefill():
    configs = eval_configs(["h2o_chunked", "h2o_window8_max", "h2o_window8_max_chunked", "streaming_chunked"], [1024])
    by_name = {c.name: c for c in configs}
    assert list(by_name) == [
        "full",
        "h2o_1024_chunked",
        "h2o_1024_window8_max",
        "h2o_1024_window8_max_chunked",
        "streaming_1024_chunked",
    ]
    assert [c.policy for c in configs[1:]] == [  # distinct table rows
        "h2o_chunked",
        "h2o_window8_max",
        "h2o_window8_max_chunked",
        "streaming_chunked",
    ]
    assert by_name["h2o_1024_window8_max_chunked"].xargs() == {
        "h2o_policy": "h2o",
        "h2o_budget": 1024,
        "h2o_prompt_window": 8,
        "h2o_score_norm": "sum",
        "h2o_score_reduce": "max",
        "h2o_prefill": "chunked",
    }
    assert by_name["h2o_1024_window8_max"].xargs()["h2o_prefill"] == "whole"  # never the server's default
    assert by_name["streaming_1024_chunked"].xargs() == {
        "h2o_policy": "streaming",
        "h2o_budget": 1024,
        "h2o_prefill": "chunked",
    }
    assert by_name["full"].xargs() == {"h2o_policy": "none"}
    chunked_server = ENGINE_DEFAULTS.replace(prefill="chunked")
    for c in configs[1:]:
        expected = "chunked" if c.policy.endswith("_chunked") else "whole"
        assert for_request(chunked_server, c.xargs()).prefill == expected, c.name
    with pytest.raises(EvalConfigError, match="no model-name alias"):
        by_name["h2o_1024_chunked"].alias("m")


def test_server_root_accepts_the_openai_base_url_too():
    assert server_root("http://127.0.0.1:8000") == server_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"


def test_request_bodies():
    chat = scenarios.Item("summary", "a", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    path, body = request_body(chat, "m", {"vllm_xargs": {"h2o_policy": "none"}})
    assert path == "/v1/chat/completions" and body["messages"] == chat.messages and body["temperature"] == 0.0
    assert "ignore_eos" not in body and body["vllm_xargs"] == {"h2o_policy": "none"}
    text = scenarios.Item("fidelity", "p0", max_tokens=8, prompt="Once", ignore_eos=True)
    path, body = request_body(text, "m", {})
    assert path == "/v1/completions" and body["prompt"] == "Once" and body["ignore_eos"] is True


def test_scores_and_tables(tokenizer, tmp_path):
    items = [
        scenarios.Item("needle", "n0", 8, prompt="..", answer="11111", group="1K"),
        scenarios.Item("needle", "n1", 8, prompt="..", answer="22222", group="2K"),
        scenarios.Item("fidelity", "p0", 8, prompt="..", ignore_eos=True),
        scenarios.Item("summary", "s0", 8, messages=[]),
    ]
    configs = eval_configs(["h2o"], [0.2])
    answers = [
        Answer("full", "needle", "n0", " 11111."),
        Answer("full", "needle", "n1", " 22222"),
        Answer("full", "fidelity", "p0", " the cat sat on the mat"),
        Answer("full", "summary", "s0", "a b c d"),
        Answer("h2o_20%", "needle", "n0", " 11111"),
        Answer("h2o_20%", "needle", "n1", None, "HTTP 500: boom"),
        Answer("h2o_20%", "fidelity", "p0", " the cat sat on a mat"),
        Answer("h2o_20%", "summary", "s0", "a b x y"),
    ]
    results = report.score(items, answers, configs, tokenizer)
    full, h2o = results["full"], results["h2o_20%"]
    assert full["needle_accuracy"] == 100.0 and h2o["needle_accuracy"] == 50.0
    assert h2o["needle_accuracy_by_length"] == {"1K": 100.0, "2K": 0.0} and h2o["failed"] == 1
    assert full["fidelity_rouge_l"] == 1.0 and h2o["fidelity_rouge_l"] == pytest.approx(5 / 6)
    same = metrics.matched_prefix(
        tokenizer(" the cat sat on the mat")["input_ids"], tokenizer(" the cat sat on a mat")["input_ids"]
    )
    assert h2o["fidelity_matched_tokens"] == same == 4
    assert h2o["summary_rouge_l"] == pytest.approx(0.5)
    md = report.markdown(results, configs)
    assert "| policy | 20% |" in md
    assert "| full cache | 100.0 [34.2, 100.0] |" in md and "| h2o | 50.0 [9.5, 90.5] |" in md and "h2o_20% 1" in md
    assert h2o["intervals"]["needle_accuracy"]["n"] == 2 and h2o["cases"]["needle_accuracy"] == {"n0": 1.0, "n1": 0.0}
    assert "| h2o | 0.833 [0.833, 0.833] |" in md  # one prompt: the bootstrap has nothing to resample
    paths = report.save(tmp_path, "h2o-vllm eval --test", {}, items, answers, results, configs)
    saved = json.loads(paths["json"].read_text())
    assert saved["command"] == "h2o-vllm eval --test" and saved["results"]["h2o_20%"]["needle_accuracy"] == 50.0
    assert saved["results"]["h2o_20%"]["budget"] == 0.2 and saved["results"]["h2o_20%"]["budget_tokens"] is None
    assert saved["results"]["full"]["budget"] is None and saved["results"]["full"]["budget_tokens"] is None
    assert len(paths["answers"].read_text().splitlines()) == len(answers)
    assert paths["png"].stat().st_size > 1000


def test_tables_order_fractions_then_token_budgets(tmp_path):
    items = [scenarios.Item("needle", "n0", 8, prompt="..", answer="11111", group="1K")]
    configs = eval_configs(["h2o", "h2o_chunked"], ["1024", "0.5", "256", "10%"])
    answers = [Answer(c.name, "needle", "n0", " 99999" if c.name.startswith("h2o_256") else " 11111") for c in configs]
    results = report.score(items, answers, configs, tokenizer=None)  # needle only: no re-tokenizing
    md = report.markdown(results, configs)
    assert "| policy | 10% | 50% | 256 tokens | 1024 tokens |" in md
    yes, no = "100.0 [20.7, 100.0]", "0.0 [0.0, 79.3]"  # one pass key each: Wilson intervals
    assert f"| full cache | {yes} | {yes} | {yes} | {yes} |" in md
    assert f"| h2o | {yes} | {yes} | {no} | {yes} |" in md and f"| h2o_chunked | {yes} | {yes} | {no} | {yes} |" in md
    paths = report.save(tmp_path, "h2o-vllm eval --test", {}, items, answers, results, configs)
    saved = json.loads(paths["json"].read_text())["results"]
    assert saved["h2o_1024_chunked"]["budget"] is None and saved["h2o_1024_chunked"]["budget_tokens"] == 1024
    assert saved["h2o_10%_chunked"]["budget"] == 0.1 and saved["h2o_10%_chunked"]["budget_tokens"] is None
    assert saved["h2o_256"]["policy"] == "h2o" and saved["h2o_256_chunked"]["policy"] == "h2o_chunked"
    assert paths["png"].stat().st_size > 1000  # token budgets at labelled positions


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "1.5"], "budget"),
        (["--budgets", "0.2", "1"], "full cache"),  # 1 is the whole sequence
        (["--budgets", "0"], "budget"),
        (["--budgets", "12.5"], "token count"),
        (["--budgets", "lots"], "budget"),
        (["--select", "alias", "--policies", "h2o_chunked", "--budgets", "1024"], "alias"),
        (["--samples", "0"], "--samples"),
        (["--select", "alias"], "alias"),  # h2o-window is in the default policies and has no alias
    ],
)
def test_bad_arguments_stop_before_any_request(argv, message, capsys):
    assert eval_main(argv + ["--base-url", "http://127.0.0.1:9"]) == 2
    assert message in capsys.readouterr().err


def test_lm_eval_task_data_is_the_needle_scenario(tokenizer):
    """serving/lm_eval/h2o_passkey.jsonl is what make_passkey.py writes today (regenerate it if this fails)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_passkey", root / "serving/lm_eval/make_passkey.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = [json.loads(line) for line in (root / "serving/lm_eval/h2o_passkey.jsonl").read_text().splitlines()]
    assert committed == module.documents(tokenizer) and len(committed) == 10


def test_unreachable_server_fails_every_request_and_says_so(tmp_path, capsys):
    argv = [
        "--base-url",
        "http://127.0.0.1:9",
        "--scenarios",
        "needle",
        "--lengths",
        "512",
        "--depths",
        "0.5",
        "--samples",
        "1",
        "--policies",
        "h2o",
        "--budgets",
        "0.2",
        "--out",
        str(tmp_path),
    ]
    assert eval_main(argv) == 1
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert results["full"]["failed"] == 1 and results["h2o_20%"]["failed"] == 1
    assert "2 failed" in capsys.readouterr().err


def test_an_items_other_configurations_follow_its_first_request():
    """The full cache's request of an item finishes before the item's other configurations start
    (so they take its prompt from the prefix cache); salted configurations follow too; answers
    come back in the jobs' order."""
    import asyncio
    import threading

    from aiohttp import web

    from h2o_vllm.evaluation.client import item_groups, run_requests

    log = []

    async def complete(request):
        body = await request.json()
        config = body.get("cache_salt") or json.dumps(body.get("vllm_xargs", {}), sort_keys=True)
        log.append(("start", body["prompt"], config, len(log)))
        await asyncio.sleep(0.05)
        log.append(("end", body["prompt"], config, len(log)))
        reply = {"choices": [{"text": f"{body['prompt']}|{config}"}], "usage": {"completion_tokens": 1}}
        return web.json_response(reply)

    started = threading.Event()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app)

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        serve.port = site._server.sockets[0].getsockname()[1]
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        configs = eval_configs(["h2o", "streaming", "h2o_window8_max"], ["0.2"])
        assert [c.cache_salt is not None for c in configs] == [False, True, False, False]
        items = [scenarios.Item("needle", f"k{i}", max_tokens=1, prompt=f"p{i}") for i in range(5)]
        jobs = [(c, i) for c in configs for i in items]  # configuration-major, as the eval builds them
        groups = item_groups(jobs)
        assert [[jobs[j][1].key for j in g] for g in groups] == [[f"k{i}"] * 4 for i in range(5)]
        assert all(jobs[g[0]][0].name == "full" and jobs[g[-1]][0].cache_salt for g in groups)
        answers = run_requests(f"http://127.0.0.1:{serve.port}", jobs, "m", concurrency=3)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
    assert [a.config for a in answers] == [c.name for c, _ in jobs]
    assert [a.key for a in answers] == [i.key for _, i in jobs]
    assert all(a.error is None and a.text.startswith(i.prompt + "|") for a, (_, i) in zip(answers, jobs))
    full = json.dumps(configs[0].xargs(), sort_keys=True)
    for item in items:
        events = [e for e in log if e[1] == item.prompt]
        leader_end = next(e[3] for e in events if e[0] == "end" and e[2] == full)
        assert len(events) == 8
        assert all(e[3] > leader_end for e in events if e[0] == "start" and e[2] != full)
    assert max(sum(1 if e[0] == "start" else -1 for e in log[: i + 1]) for i in range(len(log))) <= 3


def test_rescore_scores_saved_answers_again_without_a_request(tmp_path, capsys):
    argv = ["--base-url", "http://127.0.0.1:9", "--scenarios", "needle", "--lengths", "512", "--depths", "0.5"]
    argv += ["--samples", "2", "--policies", "streaming", "--budgets", "0.2", "--out", str(tmp_path)]
    assert eval_main(argv) == 1  # every request failed: nothing listens on port 9
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    found = []
    for line in lines:  # answer the first pass key under both configurations
        row = json.loads(line)
        if row["key"] == json.loads(lines[0])["key"]:
            row.update(text=f" {row['expected']}.", error=None)
        found.append(json.dumps(row))
    (tmp_path / "answers.jsonl").write_text("\n".join(found) + "\n")
    before = json.loads((tmp_path / "eval.json").read_text())
    assert eval_main(["--rescore", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "eval.json").read_text())
    assert after["command"] == before["command"] and after["settings"]["wall_s"] == before["settings"]["wall_s"]
    assert after["results"]["full"]["needle_accuracy"] == after["results"]["streaming_20%"]["needle_accuracy"] == 50.0
    assert (
        after["results"]["full"]["failed"] == 1
        and "| full cache | 50.0 [9.5, 90.5] |" in (tmp_path / "eval.md").read_text()
    )
    (tmp_path / "answers.jsonl").write_text("\n".join(found[:-1]) + "\n")
    assert eval_main(["--rescore", str(tmp_path)]) == 2
    assert "not the saved run's requests" in capsys.readouterr().err
    assert eval_main(["--rescore", str(tmp_path / "missing")]) == 2


def test_fidelity_with_intervals_and_against_streaming_on_the_same_prompts():
    items = [scenarios.Item("fidelity", f"p{k}", 8, prompt="..", ignore_eos=True) for k in range(30)]
    configs = eval_configs(["h2o_window8_max", "streaming"], [0.2])
    answers = [Answer("full", "fidelity", i.key, "a b c d e f g h") for i in items]
    answers += [Answer("h2o_20%_window8_max", "fidelity", i.key, "a b c d e f g h") for i in items]
    answers += [
        Answer("streaming_20%", "fidelity", i.key, "a b c d x y z w" if k % 2 else "a b c d e f g h")
        for k, i in enumerate(items)
    ]
    results = report.score(items, answers, configs, tokenizer=lambda text: {"input_ids": text.split()})
    ours, theirs = results["h2o_20%_window8_max"], results["streaming_20%"]
    assert ours["fidelity_rouge_l"] == 1.0 and theirs["fidelity_rouge_l"] == pytest.approx(0.75)
    low, high = theirs["intervals"]["fidelity_rouge_l"]["low"], theirs["intervals"]["fidelity_rouge_l"]["high"]
    assert 0.6 < low < 0.75 < high < 0.9 and theirs["intervals"]["fidelity_rouge_l"]["method"] == "bootstrap"
    better = ours["vs_streaming"]["fidelity_rouge_l"]
    assert ours["streaming"] == "streaming_20%" and better["estimate"] == pytest.approx(0.25) and better["low"] > 0
    assert "vs_streaming" not in theirs and "vs_streaming" not in results["full"]
    md = report.markdown(results, configs)
    assert "Against StreamingLLM at the same budget" in md and "| h2o_20%_window8_max | +0.250 [" in md
