"""reap_children (patches/server_lifecycle.py) stops what a killed child leaves behind.

The engine core goes on starting after SIGTERM and may spawn its worker then; killed, it leaves
that worker orphaned (vLLM's workers watch their parent only once their model is loaded). The
server is a child subreaper, so the orphan becomes its child and the next round stops it. Run
in a subprocess: the subreaper setting would stay on the test process.
"""

import subprocess
import sys
import textwrap

import psutil

SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, threading, time
    import psutil
    from h2o_vllm.patches import server_lifecycle

    if sys.argv[1] == "subreaper":
        assert server_lifecycle.become_subreaper()
    # a child that spawns a grandchild when it gets SIGTERM, and goes on
    child = subprocess.Popen([sys.executable, "-c", (
        "import signal, subprocess, sys, time\\n"
        "def spawn(*_): subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\\n"
        "    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\\n"
        "signal.signal(signal.SIGTERM, spawn)\\n"
        "print('ready', flush=True)\\n"
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    found = []

    def watch():  # the grandchild's pid, once spawned
        deadline = time.monotonic() + 30
        while not found and time.monotonic() < deadline:
            try:
                found.extend(p.pid for p in psutil.Process(child.pid).children())
            except psutil.Error:
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    reaped = server_lifecycle.reap_children(timeout=1.0, terminate=True)
    watcher.join()
    print(found[0], sorted(reaped), flush=True)
    """
)


def reap(mode: str) -> tuple[psutil.Process, list[int]]:
    """(the grandchild, the pids reap_children saw) in a process run ``mode``."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    grandchild, reaped = out.stdout.split(" ", 1)
    return psutil.Process(int(grandchild)) if psutil.pid_exists(int(grandchild)) else None, eval(reaped)


def gone(proc: psutil.Process | None) -> bool:
    try:
        return proc is None or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_orphan_of_a_killed_child_is_stopped():
    grandchild, reaped = reap("subreaper")
    assert len(reaped) == 2 and gone(grandchild)


def test_without_the_subreaper_the_orphan_is_out_of_reach():
    """What the subreaper is for: otherwise the orphan goes to init and outlives the reap."""
    grandchild, reaped = reap("plain")
    try:
        assert len(reaped) == 1 and not gone(grandchild)
    finally:
        if grandchild is not None:
            grandchild.kill()
