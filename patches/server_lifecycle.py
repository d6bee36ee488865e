"""Seam: how ``h2o-vllm serve`` stops, on a signal or when its engine dies.

vLLM 0.32 already drains on SIGTERM/SIGINT once the HTTP server runs
(``vllm/entrypoints/launchers/launcher.py``: ``serve_http`` calls
``EngineClient.shutdown(timeout=vllm_config.shutdown_timeout)``; the engine core
finishes in-flight requests for up to ``--shutdown-timeout`` seconds and is then
stopped, by force if it still works). ``h2o-vllm serve`` sets a grace period by default
(``serve.DEFAULT_SHUTDOWN_TIMEOUT``) and closes these gaps, each measured against
``--no-h2o`` and found to be vLLM's own behaviour:

- **Signals during start-up.** ``run_server`` (vllm/entrypoints/launchers/api_server/
  entry.py) installs ``_interrupt_init``, which raises ``KeyboardInterrupt`` in the main
  thread; while that thread waits for the engine core's handshake the exception is
  swallowed and the server starts anyway (a SIGTERM 15-25 s into start-up was ignored
  for minutes). We wrap ``entry.setup_server`` (called right after that handler is
  installed) to install :func:`_stop_during_startup` instead: a thread stops every
  child process (SIGTERM, then SIGKILL after ``CHILD_EXIT_TIMEOUT_S``) and the server
  exits 0. Once uvicorn runs, vLLM's loop handler replaces ours. A worker the engine core
  spawns while it is being stopped would outlive it (vLLM's workers watch their parent
  only once their model is loaded): the server is made a child subreaper
  (Linux ``PR_SET_CHILD_SUBREAPER``), so such an orphan becomes its child and gets SIGTERM
  as soon as it appears; whatever is left when ``CHILD_EXIT_TIMEOUT_S`` is up in all is
  killed (a worker forked during start-up may ignore SIGTERM), and the main thread,
  whose engine handshake fails meanwhile, leaves the exit to the stopping thread.
- **The drain itself.** vLLM's drain runs in the engine core and ends by killing it:
  requests still running at the deadline get a 500 ("EngineCore encountered an issue")
  and the server stops with the engine's teardown cut short; meanwhile the engine core
  answers each new request with an abort (a 200, ``finish_reason: abort``).
  ``AsyncLLM.shutdown`` (vllm/v1/engine/async_llm.py; vLLM calls it from a thread with
  ``timeout=--shutdown-timeout``) is wrapped to drain in the API server first: wait
  for the requests in flight up to the grace period (``AsyncLLM.output_processor``:
  ``has_unfinished_requests()``, ``request_states``, vllm/v1/engine/output_processor.py),
  abort those left with ``AsyncLLM.abort``, on the loop of ``AsyncLLM.output_handler``
  (their clients get what was generated, ``finish_reason: abort``; the engine core
  frees their KV), then let vLLM stop an idle engine
  (``ENGINE_STOP_TIMEOUT_S``). ``AsyncLLM.check_admission`` (called for every generate
  request) refuses new requests with 503 from the signal on, as vLLM's own queue
  limits do (``GracefulHTTPError``), so a load balancer retries them elsewhere.
- **Engine death.** When the engine core or a worker dies, vLLM answers 5xx and its
  ``terminate_if_errored`` (launcher.py, also imported by
  vllm/entrypoints/serve/exception_handling/handlers/vllm_error.py) stops the HTTP
  server within a second, and the process exits 0, so a container runtime sees a
  clean stop and may not restart it. We wrap it in both modules: the death is
  recorded, ``/health`` answers 503 for ``ENGINE_DEATH_LINGER_S`` seconds (vLLM's own
  health route: the engine client is errored), then the server stops and
  ``h2o-vllm serve`` exits 1 (:func:`engine_died`).
- **Before vLLM starts** (model preparation, imports) :func:`handle_signals_before_start`
  makes SIGTERM exit 0; without a handler the process dies by the signal (status 143)
  or, as a container's PID 1, ignores it.
- **Nothing left behind.** :func:`reap_children` waits (bounded) for the engine core
  and worker processes after vLLM returns, and for the orphans they leave, so none
  outlives the server.

Only the ``h2o-vllm serve`` process installs this and becomes a subreaper
(``serve.serve``); the engine core and workers keep vLLM's own signal handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from http import HTTPStatus

from h2o_vllm.patches.versions import is_supported_vllm

logger = logging.getLogger("vllm.h2o_vllm.lifecycle")

# How long /health answers 503 after the engine died before the server stops.
ENGINE_DEATH_LINGER_ENV = "H2O_VLLM_ENGINE_DEATH_LINGER"
ENGINE_DEATH_LINGER_S = 5.0
# How long a child process may take to exit after SIGTERM before it is killed.
CHILD_EXIT_TIMEOUT_S = 10.0
# Sweeps of killing once the reap's time is up: the children, then the orphans the killed ones
# left (see above); and how often a reap looks for new processes meanwhile.
REAP_ROUNDS = 3
REAP_POLL_S = 0.2
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# Once the drain is over: how long the abort may take, and the engine core's teardown
# (its workers stop in 2-5 s here) before vLLM kills it.
ABORT_TIMEOUT_S = 5.0
ENGINE_STOP_TIMEOUT_S = 8.0
# Python's resource tracker exits by itself once its parent is gone (and ignores SIGTERM).
_RESOURCE_TRACKER = "multiprocessing.resource_tracker"
_MARK = "_h2o_vllm_wrapped"


class _State:
    draining = False
    engine_died = False
    stopping: threading.Thread | None = None  # the thread stopping a server still starting


STATE = _State()


def engine_died() -> bool:
    """True once the engine core or a worker died while this server ran."""
    return STATE.engine_died


def _children():
    import psutil

    procs = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if _RESOURCE_TRACKER not in " ".join(proc.cmdline()):
                procs.append(proc)
        except psutil.Error:
            continue
    return procs


def reap_children(timeout: float = CHILD_EXIT_TIMEOUT_S, terminate: bool = False) -> list[int]:
    """Wait up to ``timeout`` s in all for this process's descendants to exit, then kill those
    left. ``terminate`` sends them SIGTERM first; a process that appears meanwhile, or is
    orphaned meanwhile (it becomes this process's child, :func:`become_subreaper`), gets SIGTERM
    at once. After the deadline, what the kills orphan is killed too (``REAP_ROUNDS`` sweeps),
    so the whole reap takes about ``timeout`` s, however many generations stop late. The pids
    seen."""
    import psutil

    me = os.getpid()
    parents: dict[int, int] = {}  # pid -> its parent when first seen
    deadline = time.monotonic() + timeout
    first, sweeps = True, 0
    while procs := _children():
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                parent = proc.ppid()
                new = proc.pid not in parents
                orphaned = not new and parent == me and parents[proc.pid] != me
                parents.setdefault(proc.pid, parent)
                if (new and (terminate or not first)) or orphaned:
                    proc.send_signal(signal.SIGTERM)
        first = False
        left = deadline - time.monotonic()
        if left > 0:
            psutil.wait_procs(procs, timeout=min(left, REAP_POLL_S))
            continue
        for proc in procs:
            logger.warning("[h2o-vllm] process %d did not exit within %.0f s: killing it", proc.pid, timeout)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        sweeps += 1
        if sweeps >= REAP_ROUNDS:
            break
    return list(parents)


def become_subreaper() -> bool:
    """Make descendants orphaned by their parent's death (a worker whose engine core was
    killed) children of this process, so :func:`reap_children` finds them; False where the
    system has no such setting (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _exit_before_start(signum, frame) -> None:
    raise SystemExit(0)  # nothing started yet (Python ignores SIGTERM as a container's PID 1)


def handle_signals_before_start() -> None:
    """Exit 0 on SIGTERM/SIGINT until vLLM starts (call first thing: model preparation and
    vLLM's imports take seconds)."""
    signal.signal(signal.SIGTERM, _exit_before_start)
    signal.signal(signal.SIGINT, _exit_before_start)


def _stop_during_startup(signum, frame) -> None:
    """A signal before the HTTP server runs: stop the children from a thread (the main
    thread may be blocked in the engine handshake) and exit 0."""

    def stop() -> None:
        logger.warning("[h2o-vllm] %s during start-up: stopping the engine and exiting", signal.Signals(signum).name)
        reap_children(terminate=True)
        logging.shutdown()
        os._exit(0)

    if STATE.stopping is None:
        STATE.stopping = threading.Thread(target=stop, name="h2o-vllm-startup-stop", daemon=True)
        STATE.stopping.start()


def exit_if_stopping() -> None:
    """Called when vLLM's start-up failed: if a signal is stopping the server, leave the exit
    (status 0, once every child is gone) to the stopping thread; otherwise return."""
    if STATE.stopping is not None:
        STATE.stopping.join()


def _wrap_setup_server(entry) -> None:
    original = entry.setup_server
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def setup_server(*args, **kwargs):
        result = original(*args, **kwargs)
        signal.signal(signal.SIGTERM, _stop_during_startup)
        signal.signal(signal.SIGINT, _stop_during_startup)
        return result

    setattr(setup_server, _MARK, True)
    entry.setup_server = setup_server


def _drain(engine, timeout: float) -> None:
    """Wait up to ``timeout`` s for the requests in flight, then abort the rest (each client gets
    its output so far with ``finish_reason: abort``; the engine core frees their KV)."""
    processor = engine.output_processor
    deadline = time.monotonic() + timeout
    if processor.has_unfinished_requests():
        logger.info("[h2o-vllm] draining %d request(s) for up to %.0f s", len(processor.request_states), timeout)
    while processor.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = list(processor.request_states)
    handler = getattr(engine, "output_handler", None)
    if not left or handler is None:
        return
    logger.warning("[h2o-vllm] grace period over: aborting %d request(s)", len(left))
    # On the event loop, as for a client that went away; the abort reaches the engine core
    # before the SIGTERM that vLLM's shutdown sends next.
    future = asyncio.run_coroutine_threadsafe(engine.abort(left, internal=True), handler.get_loop())
    future.result(ABORT_TIMEOUT_S)


def _wrap_admission(async_llm_cls) -> None:
    from vllm.exceptions import GracefulHTTPError

    original_shutdown = async_llm_cls.shutdown
    if getattr(original_shutdown, _MARK, False):
        return

    @functools.wraps(original_shutdown)
    def shutdown(self, timeout: float | None = None):
        # vLLM calls this from a thread when SIGTERM/SIGINT arrives, with --shutdown-timeout.
        if not STATE.draining and timeout and not self.errored:  # a dead engine finishes nothing
            STATE.draining = True
            logger.info("[h2o-vllm] shutting down: new requests get 503 while in-flight ones finish")
            _drain(self, timeout)
            timeout = ENGINE_STOP_TIMEOUT_S  # no work left: the engine core only tears down
        STATE.draining = True
        return original_shutdown(self, timeout=timeout)

    original_check = async_llm_cls.check_admission

    @functools.wraps(original_check)
    def check_admission(self, *args, **kwargs):
        if STATE.draining:
            raise GracefulHTTPError(
                "The server is shutting down and accepts no new requests; retry on another instance.",
                HTTPStatus.SERVICE_UNAVAILABLE,
            )
        return original_check(self, *args, **kwargs)

    for fn in (shutdown, check_admission):
        setattr(fn, _MARK, True)
    async_llm_cls.shutdown = shutdown
    async_llm_cls.check_admission = check_admission


def _linger() -> float:
    value = os.environ.get(ENGINE_DEATH_LINGER_ENV, "")
    return float(value) if value else ENGINE_DEATH_LINGER_S


def _wrap_terminate_if_errored(launcher, vllm_error) -> None:
    import vllm.envs as envs

    original = launcher.terminate_if_errored
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def terminate_if_errored(server, engine):
        dead = engine.errored and not engine.is_running
        if not dead or STATE.draining or envs.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH:
            return original(server, engine)
        if STATE.engine_died:
            return None
        STATE.engine_died = True
        linger = _linger()
        logger.error(
            "[h2o-vllm] the engine died: /health answers 503 for %.0f s, then the server exits with status 1", linger
        )
        asyncio.get_running_loop().call_later(linger, original, server, engine)
        return None

    setattr(terminate_if_errored, _MARK, True)
    launcher.terminate_if_errored = terminate_if_errored
    vllm_error.terminate_if_errored = terminate_if_errored


def install() -> bool:
    """Install the behaviours above in this (API server) process; False on an unsupported vLLM."""
    if not is_supported_vllm():
        return False
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error
    from vllm.v1.engine.async_llm import AsyncLLM

    _wrap_setup_server(entry)
    _wrap_admission(AsyncLLM)
    _wrap_terminate_if_errored(launcher, vllm_error)
    return True
