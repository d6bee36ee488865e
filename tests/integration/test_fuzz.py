"""API fuzzing with schemathesis against the server's own OpenAPI schema (``/openapi.json``).

``/v1/completions`` and ``/v1/chat/completions``, valid and invalid bodies (schemathesis'
positive and negative modes), with ``vllm_xargs`` carrying every ``h2o_*`` setting as any
JSON type (tests/integration/fuzz_schema.py). A fixed number of cases, derandomized, on
the tiny model with ``--max-model-len 512`` over loopback. Checked for every case: no 5xx;
an H2O setting that is refused names itself in ``param``; ``h2o_*`` fields outside
``vllm_xargs`` and unknown ``h2o_`` keys are refused. Afterwards the server is healthy and
every KV block is free.
"""

import collections
import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from h2o_vllm.local_server import ServerProcess

from .fuzz_schema import PATHS, TOP_LEVEL_KEYS, UNKNOWN_KEY, narrowed
from .helpers import wait_until_idle

pytestmark = pytest.mark.integration
CASES_PER_MODE = 100  # per path and generation mode: 400 cases in all


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    logs = tmp_path_factory.mktemp("fuzz-server")
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--enforce-eager", "--max-model-len", "512"]
    with ServerProcess(args, log_path=logs / "server.log") as proc:
        yield proc


def h2o_problems(body, response) -> list[str]:
    """What is wrong with the answer to ``body`` beyond a 5xx, from H2O's point of view."""
    problems = []
    if not isinstance(body, dict):
        return problems
    error = {}
    if response.status_code >= 400:
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
    message = error.get("message") or ""
    if response.status_code == 400 and message.startswith("h2o_"):
        named = message.split(":", 1)[0]
        if error.get("param") != named:
            problems.append(f"refused {named} but param is {error.get('param')!r}")
    top_level = [k for k in TOP_LEVEL_KEYS if k in body]
    xargs = body.get("vllm_xargs")
    if response.status_code == 200 and top_level:
        problems.append(f"accepted top-level {top_level}")
    if response.status_code == 200 and isinstance(xargs, dict) and UNKNOWN_KEY in xargs:
        problems.append(f"accepted unknown {UNKNOWN_KEY}")
    return problems


def fuzz(operation, mode, base_url, session, statuses, failures) -> None:
    """Send CASES_PER_MODE cases of ``operation`` in ``mode``; count statuses, collect failures."""
    path = operation.path

    @settings(
        max_examples=CASES_PER_MODE,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base_url, session=session, timeout=120)
        statuses[(path, mode.value, response.status_code)] += 1
        problems = h2o_problems(case.body, response)
        if response.status_code >= 500:
            problems.append(f"{response.status_code}: {response.text[:300]}")
        if problems:
            failures.append({"path": path, "mode": mode.value, "body": case.body, "problems": problems})

    run()


def test_fuzzing_the_openai_endpoints_finds_no_5xx(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        openapi = client.get("/openapi.json").json()
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
    schema = schemathesis.openapi.from_dict(narrowed(openapi, names))
    session = requests.Session()
    statuses = collections.Counter()
    failures = []
    for path in PATHS:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(schema[path]["POST"], mode, server.base_url, session, statuses, failures)
    print(json.dumps({" ".join(map(str, k)): v for k, v in sorted(statuses.items(), key=str)}, indent=1))
    assert sum(statuses.values()) == len(PATHS) * 2 * CASES_PER_MODE
    assert not failures, json.dumps(failures[:5], default=str, indent=1)
    assert any(code == 200 for (_, _, code) in statuses), "no case was served at all"
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        idle = wait_until_idle(client)
        assert idle["h2o_vllm:kv_free_blocks"] == idle["h2o_vllm:kv_total_blocks"] > 0
