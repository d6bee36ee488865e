"""vLLM general plugin: the one hook through which h2o-vllm enters every vLLM process.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in the
API server, in the engine core and in every worker process, once per process
(and it must stay harmless if called again). Set ``H2O_VLLM_PLUGIN_TRACE`` to a
file path to have each process append one JSON line saying where registration
ran; the tests use it to prove the plugin reaches every process that needs it.
"""

from __future__ import annotations

import inspect
import json
import logging
import multiprocessing
import os
import sys

TRACE_ENV = "H2O_VLLM_PLUGIN_TRACE"

# Which vLLM module called load_general_plugins() says which process we are in.
_CALLER_ROLES = {
    "vllm.v1.engine.core": "engine_core",
    "vllm.v1.worker.worker_base": "worker",
    "vllm.engine.arg_utils": "frontend",
    "vllm.model_executor.models.registry": "model_registry",
}

_registered_in_pid: int | None = None
logger = logging.getLogger("vllm.h2o_vllm")  # under "vllm" so vLLM's log handler prints it


def _frame_module(frame) -> str:
    """Dotted module name of a frame, also for vLLM files run as ``__main__`` subprocesses."""
    module = frame.f_globals.get("__name__", "")
    if module == "__main__":
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/vllm/" in path:
            module = "vllm." + path.rsplit("/vllm/", 1)[1].removesuffix(".py").replace("/", ".")
    return module


def _caller_role() -> tuple[str, str]:
    """(role, module) of the vLLM code that asked for the plugins."""
    for frame_info in inspect.stack()[2:]:
        module = _frame_module(frame_info.frame)
        if module.startswith(("vllm.plugins", "importlib")):
            continue
        if module.startswith("vllm"):
            return _CALLER_ROLES.get(module, "other"), module
        return "direct", module
    return "direct", ""


def _write_trace(path: str, role: str, module: str) -> None:
    record = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "role": role,
        "caller": module,
        "process_name": multiprocessing.current_process().name,
        "argv0": sys.argv[0] if sys.argv else "",
    }
    # One short O_APPEND write per process: lines from concurrent processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def register() -> None:
    """Entry point for ``vllm.general_plugins``. Idempotent within a process."""
    global _registered_in_pid
    if _registered_in_pid == os.getpid():
        return
    _registered_in_pid = os.getpid()
    role, module = _caller_role()
    trace = os.environ.get(TRACE_ENV)
    if trace:
        _write_trace(trace, role, module)
    if role not in ("engine_core", "worker"):
        # Where requests enter (API server, vllm.LLM): bad h2o_* settings fail that request
        # alone, model-name aliases become h2o_* settings, /metrics shows H2O's series.
        from h2o_vllm import metrics
        from h2o_vllm.patches import request_aliases, request_validation

        request_validation.install()
        request_aliases.install()
        metrics.register_collector()
    logger.debug("h2o-vllm plugin registered (pid %d, %s)", os.getpid(), role)
