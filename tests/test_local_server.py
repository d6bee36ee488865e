"""A server a test starts dies with the test process, however that process ends.

h2o_vllm/local_server.py starts ``h2o-vllm serve`` in its own session (so that stop() can end
its whole process group) and has the kernel send it SIGTERM when its starter dies
(``PR_SET_PDEATHSIG``): a SIGKILLed pytest leaves no server behind. tests/conftest.py turns
SIGTERM into an interrupt, so that pytest runs the fixtures' teardown before it exits. Here the
server's command is ``sleep``, started through the same ``ServerProcess.launch``, in a process
(a script, a pytest run) that is then killed.
"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).resolve().parent
SLEEPER = textwrap.dedent(
    """
    from h2o_vllm.local_server import ServerProcess


    class Sleeper(ServerProcess):
        '''A server that only sleeps, started and stopped as h2o-vllm serve is.'''

        @property
        def command(self):
            return ["sleep", "120"]
    """
)
SCRIPT = SLEEPER + textwrap.dedent(
    """
    import subprocess, sys, time

    if sys.argv[1] == "server":
        pid = Sleeper().launch().proc.pid
    else:  # the same child without the death signal, as Popen starts it by default
        pid = subprocess.Popen(["sleep", "120"], start_new_session=True).pid
    print(pid, flush=True)
    time.sleep(120)
    """
)
# A pytest run whose fixture starts a Sleeper and whose test waits to be signalled.
PYTEST_MODULE = SLEEPER + textwrap.dedent(
    """
    import faulthandler, os, signal, time
    from pathlib import Path

    import pytest

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it does (stuck_at)


    @pytest.fixture
    def server():
        proc = Sleeper().launch()
        print("server", proc.proc.pid, flush=True)
        yield proc
        proc.stop()
        Path(os.environ["TORN_DOWN"]).write_text("stopped")


    def test_waits(server):
        print("ready", flush=True)
        time.sleep(120)
    """
)


def gone(pid: int, within: float) -> bool:
    """Whether ``pid`` ends (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def kill_if_running(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).kill()


def child_of_a_killed_script(mode: str) -> int:
    """The pid of the child a script started (``mode``: how), once the script was SIGKILLed."""
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, text=True)
    try:
        child = int(script.stdout.readline())
        assert psutil.Process(child).ppid() == script.pid
    finally:
        script.kill()
        script.wait(10)
        script.stdout.close()
    return child


def test_a_server_dies_with_its_sigkilled_starter():
    child = child_of_a_killed_script("server")
    try:
        assert gone(child, within=5)
    finally:
        kill_if_running(child)


def test_without_the_death_signal_the_child_outlives_its_starter():
    """What the death signal is for: a child in its own session is out of reach of the starter's end."""
    child = child_of_a_killed_script("plain")
    try:
        assert not gone(child, within=1)
    finally:
        kill_if_running(child)


def pytest_run(tmp_path: Path, *plugins: str) -> tuple[subprocess.Popen, int]:
    """A pytest run of PYTEST_MODULE in its test (``plugins``: ``-p`` modules from tests/), and the
    pid of its server once its test runs."""
    (tmp_path / "test_sleeper.py").write_text(PYTEST_MODULE)
    args = [arg for name in plugins for arg in ("-p", name)]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "TORN_DOWN": str(tmp_path / "torn-down")}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", *args, "test_sleeper.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = None
    for line in run.stdout:
        if line.startswith("server "):
            server = int(line.split()[1])
        if line.strip() == "ready":
            return run, server
    run.kill()
    pytest.fail(f"the pytest run ended before its test ran (exit {run.wait(10)})")


def stuck_at(run: subprocess.Popen) -> str:
    """The stacks of every thread of a pytest run that does not end (faulthandler, on SIGUSR1), and
    what else it printed since SIGTERM."""
    run.send_signal(signal.SIGUSR1)
    time.sleep(2)
    run.kill()
    out, _ = run.communicate(timeout=10)
    return out[-6000:]


@pytest.mark.parametrize("plugins", [("conftest",), ()], ids=["conftest", "without-conftest"])
def test_sigterm_lets_the_fixtures_stop_their_servers(tmp_path, plugins):
    """With tests/conftest.py SIGTERM interrupts the run and the fixture stops its server; without
    it pytest dies at once, and the server goes by the death signal alone, unstopped."""
    run, server = pytest_run(tmp_path, *plugins)
    try:
        run.send_signal(signal.SIGTERM)
        try:
            run.communicate(timeout=60)  # read what it prints on the way out: a full pipe would stall it
        except subprocess.TimeoutExpired:
            pytest.fail(f"the pytest run did not exit within 60 s of SIGTERM; it was at:\n{stuck_at(run)}")
        code = run.returncode
        assert gone(server, within=5)
        torn_down = (tmp_path / "torn-down").exists()
        if plugins:
            assert torn_down and code == pytest.ExitCode.INTERRUPTED
        else:
            assert not torn_down and code == -signal.SIGTERM
    finally:
        run.kill()
        run.wait(10)
        if run.stdout and not run.stdout.closed:
            run.stdout.close()
        kill_if_running(server)
