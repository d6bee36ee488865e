"""What the integration modules share: a module's server, reading its h2o_vllm:* metrics and waiting
for it to drain. (Their ``client`` fixture is in conftest.py.)"""

import contextlib
import time
from collections.abc import Iterator, Sequence

from h2o_vllm.local_server import ServerProcess


@contextlib.contextmanager
def serve(tmp_path_factory, name: str, args: Sequence[str] = (), **kwargs) -> Iterator[ServerProcess]:
    """``h2o-vllm serve args`` on a free loopback port, healthy, its log in a new folder ``name``;
    stopped on exit (a module's ``server`` fixture yields it). ``kwargs``: ``ServerProcess``'s."""
    logs = tmp_path_factory.mktemp(name)
    with ServerProcess(args, log_path=logs / "server.log", **kwargs) as proc:
        yield proc


def chat(client, model: str, content: str, max_tokens: int) -> dict:
    """The assistant's message for one greedy user turn (the request must succeed)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    resp = client.post("/v1/chat/completions", json={**body, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]


def metrics(client, prefix: str = "h2o_vllm:") -> dict:
    """Series whose names start with ``prefix`` (ours by default) as {name or name{labels}: value}."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def vllm_total(client, name: str) -> float:
    """A vLLM series summed over its labels (e.g. ``vllm:prefix_cache_hits_total``, one per model name)."""
    return sum(v for k, v in metrics(client, "vllm:").items() if k.split("{")[0] == name)


def wait_until_idle(client, timeout=60.0) -> dict:
    """Poll /metrics until no request runs and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(client)
        running = sum(v for k, v in m.items() if k.startswith("h2o_vllm:running_requests"))
        if running == 0 and m.get("h2o_vllm:kv_free_blocks") == m.get("h2o_vllm:kv_total_blocks"):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: {m}")
        time.sleep(0.5)
