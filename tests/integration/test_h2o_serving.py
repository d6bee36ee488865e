"""The served product under load and abuse: per-request H2O controls, aliases, /metrics,
client disconnects, 200 mixed requests at concurrency 32 (with prefix caching on, vLLM's
default, and shared prefixes), chats sharing a system prompt, and bad input.

One server for the module, with a KV pool small enough that eviction matters
(``--num-gpu-blocks-override``) and no compile (``--enforce-eager``) to start fast.
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from h2o_vllm.assets import DEFAULT_SERVED_NAME as MODEL

from .helpers import metrics, serve, vllm_total, wait_until_idle

pytestmark = pytest.mark.integration
MAX_MODEL_LEN = 4096
POOL_BLOCKS = 1200


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    args = [
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override",
        str(POOL_BLOCKS),
        "--h2o-budget",
        "0.5",
    ]
    with serve(tmp_path_factory, "h2o-server", args) as proc:
        yield proc


@pytest.fixture(scope="module")
def essay_words():
    from h2o_vllm.datasets import essays_text

    return essays_text().split()


def completion(client, prompt, max_tokens=16, model=MODEL, timeout=None, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/completions", json=body, **({"timeout": timeout} if timeout else {}))


def test_per_request_budget_evicts_and_is_counted(client, essay_words):
    before = metrics(client)
    resp = completion(client, " ".join(essay_words[:900]), max_tokens=64, vllm_xargs={"h2o_budget": 0.2})
    assert resp.status_code == 200, resp.text
    after = wait_until_idle(client)
    assert after["h2o_vllm:evicted_blocks_total"] > before.get("h2o_vllm:evicted_blocks_total", 0)
    assert after['h2o_vllm:requests_total{policy="h2o"}'] > before.get('h2o_vllm:requests_total{policy="h2o"}', 0)


def test_alias_selects_the_policy(client, essay_words):
    before = metrics(client).get('h2o_vllm:requests_total{policy="streaming"}', 0)
    resp = completion(client, " ".join(essay_words[:600]), model=f"{MODEL}@streaming-0.2")
    assert resp.status_code == 200, resp.text
    assert metrics(client)['h2o_vllm:requests_total{policy="streaming"}'] == before + 1


def test_resident_blocks_stay_below_a_full_cache_while_running(client, essay_words):
    prompt = " ".join(essay_words[:1500])
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(completion, client, prompt, 400, vllm_xargs={"h2o_budget": 0.2}) for _ in range(4)]
        seen = []
        while not all(f.done() for f in futures):
            m = metrics(client)
            if m.get("h2o_vllm:full_cache_kv_blocks", 0) > 0:
                seen.append((m["h2o_vllm:resident_kv_blocks"], m["h2o_vllm:full_cache_kv_blocks"]))
            time.sleep(0.3)
    assert all(f.result().status_code == 200 for f in futures)
    assert seen and min(r / f for r, f in seen) < 0.4  # 20% budget (plus sinks, recent, the open block)
    wait_until_idle(client)


def test_client_disconnect_mid_stream_frees_its_blocks(client, essay_words):
    body = {
        "model": MODEL,
        "prompt": " ".join(essay_words[:800]),
        "max_tokens": 3000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "vllm_xargs": {"h2o_budget": 0.3},
    }
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 20:
                break
        during = metrics(client)
    # Leaving the block closed the connection mid-stream; vLLM aborts the request.
    assert during["h2o_vllm:resident_kv_blocks"] > 0
    idle = wait_until_idle(client, timeout=30)
    assert idle["h2o_vllm:resident_kv_blocks"] == 0


def test_200_mixed_requests_at_concurrency_32(client, essay_words):
    rng = random.Random(0)
    choices = [
        {"vllm_xargs": {"h2o_policy": "h2o", "h2o_budget": 0.2}},
        {"vllm_xargs": {"h2o_policy": "h2o", "h2o_budget": 128, "h2o_prompt_window": 32}},
        {"vllm_xargs": {"h2o_policy": "streaming", "h2o_budget": "10%"}},
        {"vllm_xargs": {"h2o_policy": "none"}},
        {"model": f"{MODEL}@h2o-0.5"},
        {},
    ]

    preamble = essay_words[:300]  # one request in three starts with it: prefix-cache hits, shared blocks
    hits_before = vllm_total(client, "vllm:prefix_cache_hits_total")

    def one(i):
        start = rng.randrange(0, len(essay_words) - 800)
        words = essay_words[start : start + rng.choice([40, 150, 400, 700])]
        if i % 3 == 0:
            words = preamble + words[:100]
        kwargs = dict(choices[i % len(choices)])
        model = kwargs.pop("model", MODEL)
        # 32 at once on 2 cores: on a slow CPU (an AVX2 EPYC) one answer took longer than the client's 300 s.
        max_tokens = rng.choice([8, 24, 48])
        return completion(client, " ".join(words), max_tokens=max_tokens, model=model, timeout=1200, **kwargs)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(200)))
    errors = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not errors, errors[:3]
    assert all(r.json()["choices"][0]["text"] for r in responses)
    idle = wait_until_idle(client)
    assert idle["h2o_vllm:kv_free_blocks"] == idle["h2o_vllm:kv_total_blocks"] == POOL_BLOCKS - 1
    assert idle["h2o_vllm:resident_kv_blocks"] == idle["h2o_vllm:shared_kv_blocks"] == 0
    assert vllm_total(client, "vllm:prefix_cache_hits_total") > hits_before + 50 * 256


def test_chats_sharing_a_system_prompt_hit_the_cache_and_evict_shared_blocks(client, essay_words):
    """vLLM's prefix-cache metrics count the hits; ours count evicted blocks another chat still held."""
    system = " ".join(essay_words[1000:1600])
    before = metrics(client)
    hits_before = vllm_total(client, "vllm:prefix_cache_hits_total")

    def one(i):
        body = {
            "model": MODEL,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: why?"}],
            "max_tokens": 24,
            "temperature": 0,
            "vllm_xargs": {"h2o_budget": 0.2, "h2o_prompt_window": 16},
        }
        return client.post("/v1/chat/completions", json=body)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(24)))
    assert [r.status_code for r in responses] == [200] * 24, responses[0].text[:200]
    idle = wait_until_idle(client)
    assert vllm_total(client, "vllm:prefix_cache_hits_total") - hits_before > 20 * 600
    shared = idle["h2o_vllm:evicted_shared_blocks_total"] - before.get("h2o_vllm:evicted_shared_blocks_total", 0)
    evicted = idle["h2o_vllm:evicted_blocks_total"] - before["h2o_vllm:evicted_blocks_total"]
    assert 0 < shared < evicted
    assert idle["h2o_vllm:kv_free_blocks"] == idle["h2o_vllm:kv_total_blocks"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"vllm_xargs": {"h2o_budget": 0}}, "h2o_budget"),
        ({"vllm_xargs": {"h2o_budget": -5}}, "h2o_budget"),
        ({"vllm_xargs": {"h2o_budget": "nan"}}, "h2o_budget"),
        ({"vllm_xargs": {"h2o_budget": 10 * MAX_MODEL_LEN}}, "h2o_budget"),
        ({"vllm_xargs": {"h2o_budget": 1.5}}, "h2o_budget"),
        ({"vllm_xargs": {"h2o_policy": "lru"}}, "h2o_policy"),
        ({"vllm_xargs": {"h2o_sink": -1}}, "h2o_sink"),
        ({"vllm_xargs": {"h2o_budgte": 0.2}}, "h2o_budgte"),
        ({"vllm_xargs": {"h2o_budget": ["0.2"]}}, "h2o_budget"),
        ({"h2o_budget": 0.2}, "h2o_budget"),  # outside vllm_xargs vLLM would ignore it
        ({"h2o_policy": "streaming", "vllm_xargs": {"h2o_budget": 0.2}}, "h2o_policy"),
        ({"model": f"{MODEL}@h2o-0"}, "model"),
        ({"max_tokens": 10**9}, None),
        ({"prompt": "word " * (MAX_MODEL_LEN + 100)}, None),
    ],
)
def test_bad_input_gets_a_4xx_and_the_server_stays_healthy(client, body, param):
    request = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, **body}
    resp = client.post("/v1/completions", json=request)
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert client.get("/health").status_code == 200
    assert completion(client, "The capital of France is", max_tokens=4).status_code == 200


def test_malformed_json_gets_a_4xx(client):
    resp = client.post(
        "/v1/completions", content=b'{"model": "smollm2-135m", "prompt": ', headers={"Content-Type": "application/json"}
    )
    assert 400 <= resp.status_code < 500
    assert client.get("/health").status_code == 200
