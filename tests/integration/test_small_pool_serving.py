"""Served with a KV pool smaller than one full-length request: long prompts compressed while they
prefill run; requests that could never fit get a 400 that says why, and nothing is left behind.

One server: ``--max-model-len 8192`` on 64 blocks of 32 tokens (2,048 tokens), prefill chunks of
512 tokens, ``--h2o-prefill chunked --h2o-budget 1024``.
"""

import pytest

from h2o_vllm.assets import DEFAULT_SERVED_NAME as MODEL

from .helpers import metrics, serve, wait_until_idle

pytestmark = pytest.mark.integration
POOL = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    args = ["--enforce-eager", "--max-model-len", "8192", "--num-gpu-blocks-override", str(POOL + 1)]
    args += ["--max-num-batched-tokens", "512", "--h2o-prefill", "chunked", "--h2o-budget", "1024"]
    with serve(tmp_path_factory, "small-pool-server", args) as proc:
        yield proc


@pytest.fixture(scope="module")
def long_prompt(essay_ids):
    """6,000 tokens of essay text, as token ids."""
    return essay_ids[5000:11000]


def completion(client, prompt, max_tokens=16, **xargs):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    return client.post("/v1/completions", json=body)


def test_a_prompt_three_times_the_pool_is_served(client, long_prompt):
    before = metrics(client)
    assert before["h2o_vllm:kv_total_blocks"] == POOL
    resp = completion(client, long_prompt)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == len(long_prompt) > 2 * POOL * 32
    assert resp.json()["choices"][0]["text"].strip()
    after = wait_until_idle(client)
    assert after["h2o_vllm:evicted_blocks_total"] - before.get("h2o_vllm:evicted_blocks_total", 0) > 100


@pytest.mark.parametrize(
    "xargs, param, says",
    [
        ({"h2o_policy": "none"}, "max_tokens", "a full cache"),
        ({"h2o_prefill": "whole"}, "h2o_prefill", "prefilled whole"),
        ({"h2o_budget": 4000}, "h2o_budget", "budget 4000 tokens"),
    ],
)
def test_requests_that_can_never_fit_get_a_400_that_says_why(client, long_prompt, xargs, param, says):
    resp = completion(client, long_prompt, **xargs)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and says in error["message"] and "whole KV cache (64 blocks" in error["message"]
    assert client.get("/health").status_code == 200
    idle = wait_until_idle(client)
    assert idle["h2o_vllm:kv_free_blocks"] == POOL
    # The same settings on a prompt that fits are served.
    assert completion(client, long_prompt[:1500], max_tokens=4, **xargs).status_code == 200
