"""The fused scoring operator (``csrc/score.cpp``): built with the machine's g++, loaded into torch.

``torch.ops.h2o_vllm.score_layer`` does one layer's scoring for every scored
request of a step in one call (see the C++ file for what it computes). It is
compiled for the CPU it runs on (``-march=native``: AVX-512, AVX2 or SSE on x86-64,
NEON on aarch64) into ``$H2O_VLLM_CACHE/kernels/<hash>/`` (default
``~/.cache/h2o-vllm``); the hash covers the source, the flags, torch's version and
(for ``native``) the CPU's feature flags, so a copied cache or a container image built
elsewhere rebuilds instead of crashing. ``scripts/setup.sh`` builds it once; a worker that
finds no build compiles it (a few seconds to a minute). Where that fails (no
compiler, a compiler error, unsupported dtype) :func:`load` logs why once, with the
compiler's first error line, and returns False: the PyTorch path in ``scoring.py`` (``TorchScorer``)
scores instead, with the same results.

    python -m h2o_vllm.engine.fused     # build (or find) it and say where it is and for what

``H2O_VLLM_FUSED_SCORING=0`` turns it off (to compare the two paths);
``H2O_VLLM_FUSED_MARCH`` builds it for another ``-march`` than ``native`` (a lower
target such as ``x86-64-v3`` runs on any CPU that has it). :func:`load_variant` builds
and loads one more copy for a given target under its own operator namespace, so a
test compares several targets in one process.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from h2o_vllm import cpu

logger = logging.getLogger("vllm.h2o_vllm.fused")  # under "vllm" so vLLM's log handler prints it

SOURCE = Path(__file__).with_name("csrc") / "score.cpp"
FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-DNDEBUG"]
NAMESPACE = "h2o_vllm"  # torch.ops.h2o_vllm.score_layer
ENV_SWITCH = "H2O_VLLM_FUSED_SCORING"
ENV_MARCH = "H2O_VLLM_FUSED_MARCH"


class BuildError(RuntimeError):
    """The compiler refused the source; ``str()`` is its first error line."""


def _cpu_flags() -> str:
    return cpu.flags_line()


def _abi_flag() -> str:
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def march() -> str:
    """The ``-march`` the operator is built for (``native`` unless ``H2O_VLLM_FUSED_MARCH`` says)."""
    return os.environ.get(ENV_MARCH, "native")


# x86-64 micro-architecture levels and the /proc/cpuinfo flags each needs (on top of the level below).
X86_LEVELS = {
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def runnable_targets() -> list[str]:
    """The ``-march`` targets whose code this CPU runs: each x86-64 level it has, then ``native``."""
    flags = set(_cpu_flags().split(":", 1)[-1].split())  # (through _cpu_flags: tests replace it)
    targets, needed = [], set()
    if platform.machine() in ("x86_64", "AMD64"):
        for level, more in X86_LEVELS.items():
            needed |= more
            if needed <= flags:
                targets.append(level)
    elif platform.machine() == "aarch64":
        targets.append("armv8-a")
    return [*targets, "native"]


def variant_namespace(target: str) -> str:
    """The operator namespace of a build for ``target`` beside the default one (``x86-64-v3``: ``h2o_vllm_x86_64_v3``)."""
    return f"{NAMESPACE}_{re.sub(r'[^0-9A-Za-z]', '_', target)}"


def compile_command(
    output: Path, target: str, namespace: str = NAMESPACE, compiler: str = "g++", link: bool = True
) -> list[str]:
    """The compiler's command line; ``link=False`` compiles an object only (a cross-compile check)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cmd = [compiler, *FLAGS, f"-march={target}", _abi_flag(), f"-DH2O_OPS_NAMESPACE={namespace}"]
    cmd += [f"-I{p}" for p in include_paths()]
    if not link:
        return [*cmd, "-c", str(SOURCE), "-o", str(output)]
    cmd += ["-shared", str(SOURCE), "-o", str(output)]
    for p in library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    return [*cmd, "-lc10", "-ltorch_cpu", "-ltorch"]


def first_error(stderr: str) -> str:
    """The compiler's first error line (``file:line:col: error: ...``), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in (": error:", ": fatal error:", "error"):
        for line in lines:
            if marker in line:
                return line
    return lines[-1] if lines else "no output"


def run_compiler(cmd: list[str]) -> None:
    """Run ``cmd``; :class:`BuildError` with the first error line (and the command's exit) if it fails."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} not found (install g++)") from e
    if result.returncode != 0:
        raise BuildError(f"{cmd[0]} exited {result.returncode}: {first_error(result.stderr)}")


def library_path(target: str | None = None, namespace: str = NAMESPACE) -> Path:
    """Where the build for this source, target, namespace and torch lives; for ``native``, also this CPU's
    (a build for a named target such as ``x86-64-v3`` is the same on every CPU that runs it)."""
    target = target or march()
    key = hashlib.sha256()
    flags = " ".join([*FLAGS, f"-march={target}", namespace])
    cpu_part = _cpu_flags() if target == "native" else ""
    for part in (SOURCE.read_bytes(), flags.encode(), torch.__version__.encode(), cpu_part.encode()):
        key.update(part)
    cache = Path(os.environ.get("H2O_VLLM_CACHE", Path.home() / ".cache" / "h2o-vllm"))
    return cache / "kernels" / key.hexdigest()[:16] / "h2o_score.so"


def build(path: Path, target: str | None = None, namespace: str = NAMESPACE) -> None:
    """Compile ``SOURCE`` into ``path`` (atomically; concurrent builders wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        run_compiler(compile_command(tmp, target or march(), namespace))
        tmp.replace(path)


def _load_library(target: str, namespace: str) -> Path:
    if target in X86_LEVELS and target not in runnable_targets():
        raise BuildError(
            f"this CPU cannot run code for -march={target} (it lacks some of {sorted(X86_LEVELS[target])})"
        )
    path = library_path(target, namespace)
    if not path.exists():
        logger.info("H2O: compiling the fused scoring operator (-march=%s) into %s", target, path)
        build(path, target, namespace)
    torch.ops.load_library(str(path))
    return path


@functools.cache
def load() -> bool:
    """Make ``torch.ops.h2o_vllm.score_layer`` available; False (logged once, with why) where it cannot be."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("H2O fused scoring off (%s=0): scoring with PyTorch operators", ENV_SWITCH)
        return False
    try:
        path = _load_library(march(), NAMESPACE)
        logger.info("H2O scores with the fused operator (built for %s) %s", describe(), path)
        return True
    except Exception as e:  # any failure means the PyTorch path, never a stopped engine
        logger.warning("H2O fused scoring unavailable (%s); scoring with PyTorch operators (slower)", e)
        return False


def describe(namespace: str = NAMESPACE) -> str:
    """What the loaded build's vector code uses, as compiled (e.g. ``x86-64 AVX-512, AVX512-BF16``)."""
    return getattr(torch.ops, namespace).target()


@functools.cache
def load_variant(target: str) -> Callable:
    """Build (or find) and load the operator for ``-march=target`` under its own namespace; its ``score_layer``.

    Raises :class:`BuildError` where it does not compile. Only run what the CPU can
    (a build for a higher target than this CPU dies of an illegal instruction).
    """
    namespace = variant_namespace(target)
    _load_library(target, namespace)
    return getattr(torch.ops, namespace).score_layer


def operator() -> Callable:
    """The default build's ``score_layer`` (after :func:`load` returned True)."""
    return torch.ops.h2o_vllm.score_layer


def attend_operator() -> Callable:
    """The default build's ``attend_layer``: ``score_layer`` and the scored rows' attention output."""
    return torch.ops.h2o_vllm.attend_layer


def main() -> int:
    """Build (or find) the operator for this CPU; print where and for what, or the compiler's first error."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = _load_library(march(), NAMESPACE)
    except Exception as e:
        print(f"fused scoring operator not built: {e}", file=sys.stderr)
        return 1
    print(f"fused scoring operator: {path} (built for {describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
