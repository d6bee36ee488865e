"""Data parallelism served over HTTP: ``h2o-vllm serve -dp 2`` runs two engines, each with its own
H2O scheduler deciding for its own requests, behind one API server whose /metrics adds them up.

One server on the tiny random model (weights do not matter here): two engines of 48 usable blocks
each (1,536 tokens, less than one 2,048-token sequence: long prompts are compressed while they
prefill, in 512-token chunks), so the mixed load below keeps both pools busy and both evict. Its
last test stops it.
"""

import json
import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .helpers import metrics, serve, wait_until_idle
from .test_lifecycle import STOP_SLACK, assert_nothing_left, wait_for_exit

pytestmark = pytest.mark.integration
MODEL = "tiny"
ENGINES = 2
POOL = 48  # usable blocks of 32 tokens per engine
REQUESTS, CONCURRENCY = 100, 16
# What the load mixes: model-name aliases (policy and budget), settings in vllm_xargs, the full cache.
CHOICES = [
    (f"{MODEL}@h2o-0.2", {}),
    (f"{MODEL}@streaming-0.2", {}),
    (f"{MODEL}@h2o-0.5", {}),
    (MODEL, {"h2o_policy": "keynorm", "h2o_budget": 0.3}),
    (MODEL, {"h2o_policy": "h2o", "h2o_budget": 128, "h2o_score_reduce": "sum"}),
    (f"{MODEL}@full", {}),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    args = ["--model", str(tiny_model_dir), "--served-model-name", MODEL, "--enforce-eager"]
    args += ["--max-model-len", "2048", "--num-gpu-blocks-override", str(POOL + 1), "-dp", str(ENGINES)]
    args += ["--max-num-batched-tokens", "512", "--h2o-prefill", "chunked"]
    with serve(tmp_path_factory, "dp-server", args) as proc:
        yield proc


def per_engine(client, name: str) -> dict[str, float]:
    """A series summed over its labels but the engine: {engine: value}."""
    out: dict[str, float] = {}
    for key, value in metrics(client, name).items():
        if key.split("{")[0] == name:
            engine = key.split('engine="', 1)[1].split('"', 1)[0]
            out[engine] = out.get(engine, 0) + value
    return out


def send(base_url: str, i: int) -> tuple[int, int, int, str]:
    """Request ``i`` of the mix: (status, tokens asked, tokens received, what it was)."""
    rng = random.Random(i)
    model, xargs = CHOICES[i % len(CHOICES)]
    words = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "omega", "kappa"]) for _ in range(rng.randint(200, 700))
    )
    max_tokens = rng.randint(16, 96)
    chat, streamed = i % 2 == 1, i % 5 == 0
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": streamed}
    if xargs:
        body["vllm_xargs"] = xargs
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    path = "/v1/chat/completions" if chat else "/v1/completions"
    what = f"{model} {xargs} {'chat' if chat else 'completion'}{' stream' if streamed else ''}"
    if not streamed:
        resp = httpx.post(base_url + path, json=body, timeout=300)
        got = resp.json()["usage"]["completion_tokens"] if resp.status_code == 200 else 0
        return resp.status_code, max_tokens, got, what
    body["stream_options"] = {"include_usage": True}  # the last chunk carries the usage
    got = 0
    with httpx.stream("POST", base_url + path, json=body, timeout=300) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                got = usage["completion_tokens"]
        return resp.status_code, max_tokens, got, what


def test_mixed_load_runs_on_both_engines_and_both_evict(server, client):
    before = metrics(client)
    assert before["h2o_vllm:kv_total_blocks"] == ENGINES * POOL  # the engines' pools, added up
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda i: send(server.base_url, i), range(REQUESTS)))
    errors = [r for r in results if r[0] != 200]
    assert not errors, errors
    short = [r for r in results if r[2] != r[1]]
    assert not short, short  # every request got all its tokens (EOS ignored)

    idle = wait_until_idle(client)
    assert idle["h2o_vllm:kv_free_blocks"] == idle["h2o_vllm:kv_total_blocks"] == ENGINES * POOL  # pools back
    assert idle["h2o_vllm:resident_kv_blocks"] == 0
    evicted = per_engine(client, "h2o_vllm:engine_evicted_blocks_total")
    started = {e: before.get(f'h2o_vllm:engine_evicted_blocks_total{{engine="{e}"}}', 0) for e in evicted}
    assert sorted(evicted) == ["0", "1"]
    assert all(evicted[e] - started[e] > 0 for e in evicted), (evicted, started)  # both engines evicted
    total = idle["h2o_vllm:evicted_blocks_total"] - before.get("h2o_vllm:evicted_blocks_total", 0)
    assert total == sum(evicted[e] - started[e] for e in evicted)
    admitted = sum(v for k, v in idle.items() if k.startswith("h2o_vllm:requests_total{"))
    assert admitted - sum(v for k, v in before.items() if k.startswith("h2o_vllm:requests_total{")) == REQUESTS
    served = per_engine(client, "vllm:request_success_total")  # vLLM's own, labelled by engine
    assert sorted(served) == ["0", "1"] and all(n > 0 for n in served.values()), served
    assert per_engine(client, "vllm:kv_cache_usage_perc") == {"0": 0.0, "1": 0.0}


def test_a_request_is_checked_against_one_engines_pool(client):
    """The API server holds the engines' pools added up; a request runs on one engine only."""
    prompt = "alpha beta " * 900  # 1,801 tokens plus 200 new: more than 48 blocks, less than 96
    body = {"model": f"{MODEL}@full", "prompt": prompt, "max_tokens": 200}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert f"each of its {ENGINES} engines ({POOL} blocks" in resp.json()["error"]["message"]
    ok = client.post("/v1/completions", json={**body, "model": f"{MODEL}@h2o-0.2"})  # evicting, it fits
    assert ok.status_code == 200, ok.text


def test_sigterm_stops_both_engines_and_exits_0(server):
    sid = os.getsid(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    code, _ = wait_for_exit(server, 20 + STOP_SLACK)
    assert code == 0
    assert_nothing_left(sid)
