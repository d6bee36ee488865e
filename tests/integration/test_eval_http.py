"""``h2o-vllm eval`` and lm-evaluation-harness against a real server, policies chosen per request.

One server for the module (the default model, eager, aliases on). Each test checks on
the server's own /metrics that the requests really ran under the policies asked for.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from h2o_vllm.assets import DEFAULT_SERVED_NAME as MODEL
from h2o_vllm.local_server import ServerProcess

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("eval-server")
    with ServerProcess(["--enforce-eager", "--max-model-len", "2048"], log_path=logs / "server.log") as proc:
        yield proc


def h2o_counts(server) -> dict:
    """requests_total by policy, and evicted blocks, from /metrics."""
    out = {}
    for line in httpx.get(server.base_url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("h2o_vllm:requests_total{") or line.startswith("h2o_vllm:evicted_blocks_total "):
            name, value = line.rsplit(" ", 1)
            out[name.split('policy="')[1].rstrip('"}') if "policy" in name else "evicted"] = float(value)
    return out


def delta(server, before: dict, settle: float = 1.0, timeout: float = 20.0) -> dict:
    """What changed since ``before``, read once /metrics stopped changing (the engine writes it a bit later)."""
    deadline = time.monotonic() + timeout
    last, since = h2o_counts(server), time.monotonic()
    while time.monotonic() - since < settle and time.monotonic() < deadline:
        time.sleep(0.2)
        now = h2o_counts(server)
        if now != last:
            last, since = now, time.monotonic()
    return {k: last.get(k, 0.0) - before.get(k, 0.0) for k in last if last.get(k, 0.0) != before.get(k, 0.0)}


def run_eval(server, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "h2o_vllm.cli", "eval", "--base-url", server.base_url, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_eval_runs_every_scenario_under_each_policy(server, tmp_path):
    before = h2o_counts(server)
    proc = run_eval(
        server,
        tmp_path,
        "--lengths",
        "512",
        "1024",
        "--depths",
        "0.5",
        "--samples",
        "1",
        "--fidelity-prompts",
        "2",
        "--fidelity-prompt-tokens",
        "256",
        "--fidelity-new-tokens",
        "64",
        "--summaries",
        "1",
        "--summary-essay-tokens",
        "512",
        "--summary-new-tokens",
        "32",
        "--budgets",
        "0.2",
        "--concurrency",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[eval] 25/25 requests, 0 failed" in proc.stderr  # progress lines
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert list(results) == ["full", "streaming_20%", "h2o_20%", "h2o_20%_window8", "h2o_20%_window8_max"]
    for name, r in results.items():
        assert r["failed"] == 0 and r["samples"] == {"needle": 2, "fidelity": 2, "summary": 1}, name
        assert 0.0 <= r["fidelity_rouge_l"] <= 1.0 and 0 <= r["fidelity_matched_tokens"] <= 64
    assert results["full"]["fidelity_matched_tokens"] == 64 and results["full"]["summary_rouge_l"] == 1.0
    # 5 items per configuration: full -> none, streaming -> streaming, the three h2o ones -> h2o.
    changed = delta(server, before)
    assert changed.get("none") == 5 and changed.get("streaming") == 5 and changed.get("h2o") == 15, changed
    assert changed.get("evicted", 0) > 0
    table = (tmp_path / "eval.md").read_text()
    assert (
        "| h2o_window8 |" in table
        and "| h2o_window8_max |" in table
        and "Produced by:" in table
        and (tmp_path / "eval.png").exists()
    )
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 25


def test_ruler_tasks_report_intervals_and_paired_comparisons(server, tmp_path):
    before = h2o_counts(server)
    proc = run_eval(
        server,
        tmp_path,
        "--scenarios",
        "ruler",
        "--ruler-tasks",
        "niah_number",
        "vt",
        "--ruler-lengths",
        "1024",
        "--ruler-samples",
        "2",
        "--policies",
        "h2o",
        "h2o_window8_max",
        "--budgets",
        "0.2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert list(results) == ["full", "h2o_20%", "h2o_20%_window8_max"]
    for name, r in results.items():
        ruler = r["ruler"]
        assert set(ruler["tasks"]) == {"niah_number", "vt"} and len(ruler["cases"]) == 4, name
        for cell in ruler["tasks"].values():
            assert cell["n"] == 2 and 0.0 <= cell["low"] <= cell["estimate"] <= cell["high"] <= 1.0
        assert bool(ruler["vs_full"]) == (name != "full")
    changed = delta(server, before)
    assert changed.get("none") == 4 and changed.get("h2o") == 8, changed
    table = (tmp_path / "eval.md").read_text()
    assert "RULER-style tasks" in table and "niah_number (n=2)" in table and (tmp_path / "ruler.png").exists()


def test_eval_selects_policies_through_model_aliases(server, tmp_path):
    before = h2o_counts(server)
    proc = run_eval(
        server,
        tmp_path,
        "--select",
        "alias",
        "--scenarios",
        "needle",
        "--lengths",
        "512",
        "--depths",
        "0.3",
        "0.7",
        "--samples",
        "1",
        "--policies",
        "streaming",
        "h2o",
        "--budgets",
        "0.1",
        "0.5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(results) == {"full", "streaming_10%", "streaming_50%", "h2o_10%", "h2o_50%"}
    assert all(r["failed"] == 0 for r in results.values())
    changed = delta(server, before)
    assert changed.get("none") == 2 and changed.get("streaming") == 4 and changed.get("h2o") == 4, changed


def test_lm_evaluation_harness_local_completions_through_an_alias(server, default_model_dir, tmp_path):
    docs = (ROOT / "serving/lm_eval/h2o_passkey.jsonl").read_text().splitlines()
    before = h2o_counts(server)
    model_args = (
        f"model={MODEL}@h2o-0.2,base_url={server.base_url}/v1/completions,tokenizer_backend=None,"
        "tokenized_requests=False,num_concurrent=4,max_retries=1"
    )
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--include_path",
        "serving/lm_eval",
        "--tasks",
        "h2o_passkey",
        "--output_path",
        str(tmp_path),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_file = next(tmp_path.rglob("results_*.json"))
    result = json.loads(result_file.read_text())
    assert result["n-samples"]["h2o_passkey"]["effective"] == len(docs) == 10
    accuracy = result["results"]["h2o_passkey"]["exact_match,first-number"]
    assert 0.0 <= accuracy <= 1.0
    changed = delta(server, before)
    assert changed.get("h2o") == len(docs) and set(changed) <= {"h2o", "evicted"}, changed


def test_helm_deployments_name_served_aliases_and_their_request_shape_works(server):
    """serving/helm/prod_env: every deployment's served name is served, and a request shaped like
    its HELM client's (crfm-helm 0.5.16: VLLMChatClient's chat path, OpenAILegacyCompletionsClient's
    completions path) runs under that alias's policy. benchmarks/helm.py runs HELM itself."""
    import yaml

    deployments = yaml.safe_load((ROOT / "serving/helm/prod_env/model_deployments.yaml").read_text())[
        "model_deployments"
    ]
    metadata = yaml.safe_load((ROOT / "serving/helm/prod_env/model_metadata.yaml").read_text())["models"]
    assert {d["model_name"] for d in deployments} == {m["name"] for m in metadata}
    served = {m["id"] for m in httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]}
    expected_policy = {"full": "none", "h2o": "h2o", "streaming": "streaming"}
    sampling = {"temperature": 0.0, "top_p": 1, "n": 1, "max_tokens": 8, "presence_penalty": 0, "frequency_penalty": 0}
    for deployment in deployments:
        spec = deployment["client_spec"]
        if spec["class_name"] == "helm.clients.vllm_client.VLLMChatClient":
            name = spec["args"]["vllm_model_name"]
            path = "/v1/chat/completions"
            body = {"model": name, "messages": [{"role": "user", "content": "Name a colour."}], "stop": None}
        else:
            assert spec["class_name"] == "helm.clients.openai_client.OpenAILegacyCompletionsClient"
            name = spec["args"]["openai_model_name"]
            path = "/v1/completions"
            body = {
                "model": name,
                "prompt": "Colours: red, green,",
                "stop": ["\n"],
                "best_of": 1,
                "logprobs": 1,
                "echo": False,
            }
        assert name in served, name
        before = h2o_counts(server)
        reply = httpx.post(server.base_url + path, json={**body, **sampling}, timeout=120)
        assert reply.status_code == 200, reply.text
        policy = expected_policy[name.split("@")[1].split("-")[0]]
        assert delta(server, before).get(policy) == 1, name
