"""vLLM general plugin: the one hook through which h2o-vllm enters every vLLM process.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in the
API server, in the engine core and in every worker process, once per process
(and it must stay harmless if called again). Set ``H2O_VLLM_PLUGIN_TRACE`` to a
file path to have each process append one JSON line saying where registration
ran; the tests use it to prove the plugin reaches every process that needs it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys

from h2o_vllm.patches.process_role import caller_role

TRACE_ENV = "H2O_VLLM_PLUGIN_TRACE"

_registered_in_pid: int | None = None
logger = logging.getLogger("vllm.h2o_vllm")  # under "vllm" so vLLM's log handler prints it


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
    role, module = caller_role()
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
