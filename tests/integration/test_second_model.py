"""The second model, Qwen2.5-Coder-0.5B-Instruct (Qwen2, GQA 14:2, 24 layers), served by short name.

Started as the README says (``h2o-vllm serve qwen2.5-coder-0.5b``), on a free loopback port,
without compiling (``--enforce-eager``) to start fast. One server for the module.
"""

import json

import pytest

from h2o_vllm.assets import QWEN_CODER_05B

from .helpers import chat, metrics, serve, wait_until_idle

pytestmark = pytest.mark.integration
MODEL = QWEN_CODER_05B.name


@pytest.fixture(scope="module")
def server(second_model_dir, tmp_path_factory):
    args = ["--model", MODEL, "--enforce-eager", "--max-model-len", "4096"]
    with serve(tmp_path_factory, "second-model", args) as proc:
        yield proc


@pytest.fixture(scope="module")
def essay():
    from h2o_vllm.datasets import essays_text

    return " ".join(essays_text().split()[:1500])


def completion(client, prompt, max_tokens, model=MODEL, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_served_under_its_short_name_with_aliases(client, second_model_dir):
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models[0] == MODEL
    assert {f"{MODEL}@h2o-0.2", f"{MODEL}@streaming-0.2", f"{MODEL}@full"} <= set(models)
    config = json.loads((second_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (24, 14, 2)
    assert "quantization_config" not in config


def test_chat_template_and_weights_are_the_coder_models(client):
    message = chat(client, MODEL, "Write a Python function is_prime(n) that tests primality.", 64)
    assert "def is_prime(n" in message["content"]  # random weights would not


def test_a_budget_covering_the_sequence_gives_the_full_caches_tokens(client, essay):
    prompt = essay[:4000]
    full = completion(client, prompt, 32, vllm_xargs={"h2o_policy": "none"})
    covered = completion(client, prompt, 32, vllm_xargs={"h2o_policy": "h2o", "h2o_budget": 4096})
    assert covered["choices"][0]["text"] == full["choices"][0]["text"]


def test_every_policy_evicts_and_the_pool_comes_back(client, essay):
    before = metrics(client)
    for xargs in (
        {"h2o_policy": "h2o", "h2o_budget": 0.2},
        {"h2o_policy": "h2o", "h2o_budget": 0.2, "h2o_prompt_window": 8, "h2o_score_reduce": "max"},
        {"h2o_policy": "streaming", "h2o_budget": 0.2},
    ):
        out = completion(client, essay, 48, vllm_xargs=xargs)
        assert out["usage"]["completion_tokens"] == 48
    after = wait_until_idle(client)
    # 1500 words are about 1,900 tokens: 60 blocks, of which 20% keeps 12, so each evicts dozens.
    assert after["h2o_vllm:evicted_blocks_total"] - before.get("h2o_vllm:evicted_blocks_total", 0) > 3 * 30
    assert after["h2o_vllm:kv_free_blocks"] == after["h2o_vllm:kv_total_blocks"]
