"""How the server stops: SIGTERM when idle, with requests in flight, during start-up; and when
its engine dies (patches/server_lifecycle.py).

Each test starts its own server (on the tiny random model: weights do not matter here) because
each one ends it. A stop must leave no process of the server's session behind.
"""

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from h2o_vllm.local_server import ServerProcess

pytestmark = pytest.mark.integration
GRACE = 8  # --shutdown-timeout in the in-flight test: seconds in-flight requests may still run
STOP_SLACK = 10  # what the issue allows beyond the grace period
MODEL = "tiny"


def session_processes(sid: int) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {proc.info['name']}")
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def tiny_server(tiny_model_dir, tmp_path, *args) -> ServerProcess:
    args = ["--model", str(tiny_model_dir), "--served-model-name", MODEL, "--enforce-eager", *args]
    return ServerProcess([*args, "--max-model-len", "8192"], log_path=tmp_path / "server.log")


def start(tiny_model_dir, tmp_path, *args) -> ServerProcess:
    return tiny_server(tiny_model_dir, tmp_path, *args).start()


def wait_for_exit(server: ServerProcess, within: float, since: float | None = None) -> tuple[int, float]:
    """(exit code, seconds taken) of the server's main process; fails if it outlives ``within``.

    Both count from ``since`` (the signal's ``time.monotonic()``) when given, else from now: a
    test that does more after the signal must not charge that time to the server."""
    t0 = time.monotonic() if since is None else since
    try:
        code = server.proc.wait(max(0.0, within - (time.monotonic() - t0)))
    except Exception:
        pytest.fail(f"server still running {within:.0f} s after the signal; log: {server.log_path}")
    return code, time.monotonic() - t0


def assert_nothing_left(sid: int, within: float = 3.0) -> None:
    """No process of the server's session left (Python's resource tracker may take a moment)."""
    deadline = time.monotonic() + within
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the server left behind: {left}"


def stream(base_url: str, max_tokens: int, record: dict) -> None:
    """A streamed completion; ``record`` gets 'started' once the first token arrived, then the
    finish reason and the number of tokens streamed.

    Tokens are counted from vLLM's usage on every chunk, not from chunks: a server that falls
    behind its client merges several tokens into one chunk."""
    body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": max_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True}
    body |= {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    tokens, finish = 0, None
    try:
        with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as resp:
            record["status"] = resp.status_code
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                for choice in chunk["choices"]:
                    record["started"] = True
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        record["error"] = repr(exc)
    record |= {"finish": finish, "tokens": tokens}


def wait_started(*records: dict, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.get("started") for r in records):
        assert time.monotonic() < deadline, f"requests did not start: {records}"
        time.sleep(0.05)


def test_sigterm_when_idle_stops_everything_and_exits_0(tiny_model_dir, tmp_path):
    server = start(tiny_model_dir, tmp_path)  # the default grace period (20 s)
    sid = os.getsid(server.proc.pid)
    assert len(session_processes(sid)) >= 3  # API server, engine core, worker
    server.proc.send_signal(signal.SIGTERM)  # to the main process only, as docker stop does
    code, took = wait_for_exit(server, 20 + STOP_SLACK)
    assert code == 0
    assert_nothing_left(sid)
    server.stop()


def test_sigterm_in_flight_drains_refuses_new_requests_and_exits_0(tiny_model_dir, tmp_path):
    server = start(tiny_model_dir, tmp_path, "--shutdown-timeout", str(GRACE))
    sid = os.getsid(server.proc.pid)
    short, long = {}, {}
    threads = [
        threading.Thread(target=stream, args=(server.base_url, 400, short)),  # about a second
        threading.Thread(target=stream, args=(server.base_url, 8000, long)),  # far beyond the grace
    ]
    for t in threads:
        t.start()
    wait_started(short, long)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    late = httpx.post(
        server.base_url + "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
        timeout=30,
    )
    assert late.status_code == 503, late.text  # not admitted while draining
    assert "shutting down" in late.json()["error"]["message"]
    code, took = wait_for_exit(server, GRACE + STOP_SLACK, since=signalled)
    for t in threads:
        t.join(30)
    assert code == 0
    assert short["finish"] == "length" and short["tokens"] == 400, short  # finished within the grace
    assert long["finish"] == "abort" and 0 < long["tokens"] < 8000, long  # aborted at its end
    assert took >= GRACE - 1  # the long request was given the grace period, counted from the signal
    assert_nothing_left(sid)
    server.stop()


def test_sigterm_during_start_up_stops_it(tiny_model_dir, tmp_path):
    server = tiny_server(tiny_model_dir, tmp_path).launch()  # the signal comes while the engine starts
    sid = os.getsid(server.proc.pid)
    deadline = time.monotonic() + 300
    while not any("EngineCore" in p for p in session_processes(sid)):
        assert server.proc.poll() is None and time.monotonic() < deadline, "no engine core started"
        time.sleep(0.2)
    server.proc.send_signal(signal.SIGTERM)
    code, _ = wait_for_exit(server, STOP_SLACK + 10)
    assert code == 0
    assert_nothing_left(sid)  # including a worker the engine core spawned while being stopped
    assert not server.healthy()
    server.stop()


def test_a_killed_worker_gives_503_and_5xx_and_a_nonzero_exit(tiny_model_dir, tmp_path):
    server = start(tiny_model_dir, tmp_path)
    sid = os.getsid(server.proc.pid)
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "Worker" in p.name()]
    assert workers, "no worker process found"
    waiting = {}

    def wait_for_completion():
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 8000, "ignore_eos": True}
        try:
            waiting["status"] = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).status_code
        except httpx.HTTPError as exc:
            waiting["status"] = repr(exc)

    client = threading.Thread(target=wait_for_completion)
    client.start()
    time.sleep(1.0)
    workers[0].kill()
    t0 = time.monotonic()
    health = None
    while time.monotonic() - t0 < 30 and (health := server_health(server)) != 503:
        time.sleep(0.1)
    assert health == 503, f"/health never answered 503 after the worker died (last: {health})"
    client.join(60)
    assert isinstance(waiting.get("status"), int) and waiting["status"] >= 500, waiting
    code, _ = wait_for_exit(server, 30)
    assert code != 0
    assert_nothing_left(sid)
    server.stop()


def server_health(server: ServerProcess):
    try:
        return httpx.get(server.base_url + "/health", timeout=2).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__
