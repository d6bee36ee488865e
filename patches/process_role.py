"""Seam: which vLLM process the plugin was loaded in, told by the vLLM module that loaded it.

vLLM calls ``load_general_plugins()`` from a different module in each process;
these module names are vLLM 0.32's (``vllm/v1/engine/core.py``,
``vllm/v1/worker/worker_base.py``, ``vllm/engine/arg_utils.py``,
``vllm/model_executor/models/registry.py``).
"""

from __future__ import annotations

import inspect
import os

# Which vLLM module called load_general_plugins() says which process we are in.
_CALLER_ROLES = {
    "vllm.v1.engine.core": "engine_core",
    "vllm.v1.worker.worker_base": "worker",
    "vllm.engine.arg_utils": "frontend",
    "vllm.model_executor.models.registry": "model_registry",
}


def _frame_module(frame) -> str:
    """Dotted module name of a frame, also for vLLM files run as ``__main__`` subprocesses."""
    module = frame.f_globals.get("__name__", "")
    if module == "__main__":
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/vllm/" in path:
            module = "vllm." + path.rsplit("/vllm/", 1)[1].removesuffix(".py").replace("/", ".")
    return module


def caller_role() -> tuple[str, str]:
    """(role, module) of the vLLM code that asked for the plugins (call it from the plugin's entry point)."""
    for frame_info in inspect.stack()[2:]:
        module = _frame_module(frame_info.frame)
        if module.startswith(("vllm.plugins", "importlib")):
            continue
        if module.startswith("vllm"):
            return _CALLER_ROLES.get(module, "other"), module
        return "direct", module
    return "direct", ""
