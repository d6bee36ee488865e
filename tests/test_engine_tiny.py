"""The real vLLM engine runs the tiny model, with the plugin loaded in its engine core and worker.

One engine for the whole module (engine start is the expensive part).
"""

import json
import os

import pytest
from engine_support import greedy, start_engine

from h2o_vllm import plugin

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine_run(tiny_model_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "plugin.jsonl"
    os.environ[plugin.TRACE_ENV] = str(trace)
    try:
        # vLLM's own engine core and worker processes; eager: this is about behaviour, not speed.
        with start_engine(tiny_model_dir, inprocess=False, max_model_len=512) as llm:
            outputs = llm.generate(PROMPTS, greedy(NEW_TOKENS))
            return {
                "prompt_ids": [o.prompt_token_ids for o in outputs],
                "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                "trace": [json.loads(line) for line in trace.read_text().splitlines()],
            }
    finally:
        os.environ.pop(plugin.TRACE_ENV, None)


def test_plugin_registered_in_engine_core_and_worker_processes(engine_run):
    by_role = {}
    for record in engine_run["trace"]:
        by_role.setdefault(record["role"], []).append(record)
    assert set(by_role) >= {"engine_core", "worker"}, by_role
    (core,) = by_role["engine_core"]
    (worker,) = by_role["worker"]
    assert core["pid"] != os.getpid() and worker["pid"] not in (core["pid"], os.getpid())
    assert worker["ppid"] == core["pid"]  # the worker is the engine core's child


def test_greedy_tokens_match_transformers(engine_run, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for prompt_ids, vllm_tokens in zip(engine_run["prompt_ids"], engine_run["token_ids"]):
        ids = torch.tensor([prompt_ids])
        hf = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        assert vllm_tokens == hf[0, len(prompt_ids) :].tolist()
