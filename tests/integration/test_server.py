"""The README's serve command, for real: the default model behind vLLM's OpenAI server on loopback.

One server for the whole module. It is started exactly as users start it
(``h2o-vllm serve``, no model named), only on a free port.
"""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import httpx
import pytest

from h2o_vllm import plugin
from h2o_vllm.assets import DEFAULT_SERVED_NAME
from h2o_vllm.testing import ServerProcess

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server")
    trace = logs / "plugin.jsonl"
    proc = ServerProcess(env={plugin.TRACE_ENV: str(trace)}, log_path=logs / "server.log")
    with proc:
        proc.trace_path = trace
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


def test_health_and_models(client):
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [DEFAULT_SERVED_NAME]


def test_completion_is_generated_by_smollm2(client):
    body = {"model": DEFAULT_SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    # SmolLM2-135M-Instruct knows this one; random weights would not.
    assert "Paris" in choice["text"]


def test_chat_completion_uses_the_chat_template(client):
    body = {
        "model": DEFAULT_SERVED_NAME,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    message = resp.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and "Paris" in message["content"]


def test_streaming_completion(client):
    body = {"model": DEFAULT_SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 12,
            "temperature": 0, "stream": True}
    chunks = []
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    texts = [json.loads(c)["choices"][0]["text"] for c in chunks[:-1] if json.loads(c)["choices"]]
    assert len(texts) >= 2 and "".join(texts).strip()


def test_plugin_registered_in_every_vllm_process(server):
    records = [json.loads(line) for line in server.trace_path.read_text().splitlines()]
    roles = {r["role"]: r for r in records}
    assert {"frontend", "engine_core", "worker"} <= set(roles), records
    frontend, core, worker = roles["frontend"], roles["engine_core"], roles["worker"]
    assert frontend["pid"] == server.proc.pid  # the API server is the process we started
    assert core["ppid"] == frontend["pid"] and worker["ppid"] == core["pid"]
    assert len({frontend["pid"], core["pid"], worker["pid"]}) == 3


def test_readme_curl_example_works(server):
    """The README's curl command, run against this server."""
    match = re.search(r"```bash\n(curl [^`]*?/v1/completions.*?)```", README.read_text(), re.S)
    assert match, "README has no curl example for /v1/completions"
    command = match.group(1).replace("\\\n", " ").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout)["choices"][0]["text"].strip()
