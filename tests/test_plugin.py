"""The plugin is registered with vLLM and records where it ran when asked to."""

import importlib.metadata
import json
import os

from h2o_vllm import plugin


def test_entry_point_is_registered_for_vllm():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "h2o_vllm.plugin:register" for ep in eps)


def test_register_is_idempotent_and_traces_once_per_process(monkeypatch, tmp_path):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(plugin.TRACE_ENV, str(trace))
    monkeypatch.setattr(plugin, "_registered_in_pid", None)
    plugin.register()
    plugin.register()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["pid"] == os.getpid() and records[0]["role"] == "direct"


def test_vllm_loader_call_is_attributed_to_its_caller(monkeypatch, tmp_path):
    """Called through vLLM's own loader from a vLLM module, the trace names that module's role."""
    import vllm.plugins

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(plugin.TRACE_ENV, str(trace))
    monkeypatch.setenv("VLLM_PLUGINS", "h2o")  # only our plugin
    for module, role in [("vllm.v1.engine.core", "engine_core"), ("vllm.v1.worker.worker_base", "worker")]:
        monkeypatch.setattr(plugin, "_registered_in_pid", None)
        monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
        # Run the call as if it sat in that vLLM module.
        exec("load_general_plugins()", {"__name__": module, "load_general_plugins": vllm.plugins.load_general_plugins})
        record = json.loads(trace.read_text().splitlines()[-1])
        assert (record["role"], record["caller"], record["pid"]) == (role, module, os.getpid())
