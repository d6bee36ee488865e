"""What every benchmark records about its run, and how it writes its results.

A benchmark starts a :class:`Run` first thing (``run = Run.start(__file__, argv)``): the
command that made the run (shell-quoted), the commit it ran at (``abc1234``, ``abc1234-dirty``
when tracked files had changes; ``None`` outside a git checkout) and the CPU (model name,
CPUs this process may use, the flags that decide which kernels run). At the end one call,
``run.write(out, name, data, body, plot=...)``, writes

- ``OUT/NAME.json``: ``{"command", "commit", "cpu", **data}`` (a list is written as it is:
  its entries carry their own records, see :func:`markdown`'s ``records``),
- ``OUT/NAME.md``: ``body``, then who produced it (:func:`produced_by`),
- ``OUT/NAME.png``: ``plot(path)``, where the benchmark draws one (:func:`pyplot`).

The benchmarks import it as ``from report import Run`` (``python benchmarks/X.py`` puts
``benchmarks/`` first on ``sys.path``). ``python benchmarks/report.py`` prints this machine's record.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# /proc/cpuinfo flags that decide which kernels run: vLLM's CPU attention and fp8 cache,
# and the -march of the fused operator (x86: AVX2, AVX-512, AMX; aarch64: NEON, SVE).
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """``python benchmarks/SCRIPT.py ARGS``, shell-quoted; ``argv`` defaults to ``sys.argv[1:]``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str | None:
    """``git rev-parse --short HEAD``, with ``-dirty`` when tracked files differ from it; None without git."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if changes else "")


def _cpuinfo() -> dict[str, str]:
    """The first value of each field of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value.strip())
    return fields


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=30, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")), None)


def lscpu(fields: Sequence[str]) -> dict[str, str]:
    """The ``fields`` that ``lscpu`` prints here, as it prints them (empty where there is no lscpu)."""
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=30, env={**os.environ, "LC_ALL": "C"}
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in fields:
            found.setdefault(key.strip(), value.strip())
    return found


def cpu_summary() -> str:
    """``AMD EPYC 9654, 2 CPUs (avx2 fma avx512f ...)``: model name, CPUs usable here, the :data:`CPU_FLAGS` it has."""
    info = _cpuinfo()
    # x86: "model name"; aarch64's /proc/cpuinfo has none, lscpu names the core.
    model = info.get("model name") or _lscpu_model() or platform.processor() or platform.machine() or "unknown CPU"
    flags = set((info.get("flags") or info.get("Features") or "").split())
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    present = " ".join(f for f in CPU_FLAGS if f in flags)
    return f"{model}, {cpus} CPUs" + (f" ({present})" if present else "")


def produced_by(records: Sequence[dict]) -> str:
    """The Markdown trailer: each record's command (once, in order), then the commits and CPUs they ran on.

    A record is ``{"command", "commit", "cpu"}``; results written before commits and CPUs were
    recorded have only ``command``, and show only that.
    """
    commands = dict.fromkeys(r["command"] for r in records if r.get("command"))
    text = "Produced by:\n\n" + "".join(f"    {c}\n" for c in commands)
    where = dict.fromkeys((r.get("commit"), r.get("cpu")) for r in records if r.get("commit") or r.get("cpu"))
    if where:
        text += (
            "\nAt "
            + "; ".join(f"commit {commit or 'unknown'} on {cpu or 'an unrecorded CPU'}" for commit, cpu in where)
            + ".\n"
        )
    return text


def markdown(body: str, records: Sequence[dict]) -> str:
    """``body``, a blank line, and :func:`produced_by` ``records``."""
    return body.rstrip("\n") + "\n\n" + produced_by(records)


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (said once) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (scripts/setup.sh installs it)")
        return None
    return plt


@dataclass(frozen=True)
class Run:
    """One benchmark run: its command, commit and CPU, recorded in everything it writes."""

    command: str
    commit: str | None
    cpu: str

    @classmethod
    def start(cls, script: str, argv: Sequence[str] | None = None) -> Run:
        """The record of this process's run of ``script`` (its ``__file__``) with ``argv`` (default ``sys.argv[1:]``)."""
        return cls(command_line(script, argv), git_commit(), cpu_summary())

    def record(self) -> dict:
        return {"command": self.command, "commit": self.commit, "cpu": self.cpu}

    def write(
        self,
        out: Path,
        name: str,
        data: dict | list,
        body: str,
        *,
        plot: Callable[[Path], object] | None = None,
        md_name: str | None = None,
        records: Sequence[dict] | None = None,
    ) -> str:
        """Write OUT/NAME.json, OUT/NAME.md (or OUT/MD_NAME) and, with ``plot``, OUT/NAME.png; return the Markdown.

        A dict ``data`` is written after this run's record; a list as it is. The Markdown is
        ``body`` and who produced it: this run, or ``records`` (one per run that made the results).
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {**self.record(), **data} if isinstance(data, dict) else data
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
        text = markdown(body, [self.record()] if records is None else records)
        (out / (md_name or f"{name}.md")).write_text(text)
        if plot is not None:
            plot(out / f"{name}.png")
        return text


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        print(json.dumps(Run.start(__file__).record(), indent=1))
