"""A local ``h2o-vllm serve`` process on loopback, used by ``h2o-vllm eval``, the load benchmark and the tests.

The server always runs on a loopback address, its start is bounded in time, and
it is stopped (with its whole process group: API server, engine core, workers)
however the caller exits: by :meth:`ServerProcess.stop` when it can, and on Linux
by the kernel when it cannot (killed, SIGKILL included), which sends the server
SIGTERM when the thread that started it ends (``PR_SET_PDEATHSIG``; start servers
from a thread that outlives them, such as the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    pass


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ``sig`` when the thread that starts it
    ends, however it ends (``prctl(PR_SET_PDEATHSIG)``); None where there is no such call.

    The setting survives the child's ``exec`` (not a set-user-ID one) and is not inherited by the
    child's own children: ``h2o-vllm serve`` stops its engine cores and workers itself on SIGTERM
    (tests/integration/test_lifecycle.py).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:  # looked up here, before the fork: the child only calls it
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0 and os.getppid() != parent:
            os.kill(os.getpid(), sig)  # the parent died before the setting took: nobody else will send it

    return preexec


class ServerProcess:
    """``h2o-vllm serve`` in a subprocess on a free loopback port."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        start_timeout: float = 900.0,
    ):
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.args = ["--host", LOOPBACK, "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "h2o_vllm.cli", "serve", *self.args]

    def launch(self) -> ServerProcess:
        """Start the process and return at once (:meth:`start` also waits until it is healthy)."""
        # Open for the server's lifetime; stop() closes it.
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # Own session and process group, so stop() reaches the engine core and workers too; and
        # SIGTERM from the kernel if this process dies without stopping it.
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        return self

    def start(self) -> ServerProcess:
        self.launch()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode} during start; log: {self.log_path}")
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise ServerFailed(f"server not healthy after {self.start_timeout:.0f} s; log: {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        # Children that outlived the API server (an engine core or worker) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
