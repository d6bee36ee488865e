"""The README's serve command, for real: the default model behind vLLM's OpenAI server on loopback.

One server for the whole module. It is started exactly as users start it
(``h2o-vllm serve``, no model named), only on a free port.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from h2o_vllm import plugin
from h2o_vllm.assets import DEFAULT_SERVED_NAME
from h2o_vllm.local_server import ServerProcess

from .helpers import chat

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
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models[0] == DEFAULT_SERVED_NAME
    # Aliases that select a policy and budget, for clients that cannot send vllm_xargs.
    assert {
        f"{DEFAULT_SERVED_NAME}@h2o-0.2",
        f"{DEFAULT_SERVED_NAME}@streaming-0.2",
        f"{DEFAULT_SERVED_NAME}@full",
    } <= set(models)


def test_completion_is_generated_by_smollm2(client):
    body = {"model": DEFAULT_SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    # SmolLM2-135M-Instruct knows this one; random weights would not.
    assert "Paris" in choice["text"]


def test_chat_completion_uses_the_chat_template(client):
    message = chat(client, DEFAULT_SERVED_NAME, "What is the capital of France? Answer in one word.", 16)
    assert message["role"] == "assistant" and "Paris" in message["content"]


def test_streaming_completion(client):
    body = {
        "model": DEFAULT_SERVED_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    chunks = []
    with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: ") :])
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


def readme_blocks(language: str, starts_with: str) -> list[str]:
    """README code blocks of ``language`` whose first line starts with ``starts_with``."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if b.lstrip().startswith(starts_with)]


@pytest.mark.parametrize("index", range(len(readme_blocks("python", "from openai import OpenAI"))))
def test_readme_python_examples_work(server, index):
    """Every README example that talks to the server through the openai client, run as written."""
    code = readme_blocks("python", "from openai import OpenAI")[index].replace(
        "127.0.0.1:8000", f"127.0.0.1:{server.port}"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


@pytest.mark.parametrize("index", range(len(readme_blocks("bash", "curl "))))
def test_readme_curl_examples_work(server, index):
    command = (
        readme_blocks("bash", "curl ")[index].replace("\\\n", " ").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    )
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()
