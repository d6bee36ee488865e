"""The fused scoring operator (``csrc/score.cpp``): built with the machine's g++, loaded into torch.

``torch.ops.h2o_vllm.score_layer`` does one layer's scoring for every scored
request of a step in one call (see the C++ file for what it computes). It is
compiled for the CPU it runs on (``-march=native``) into
``$H2O_VLLM_CACHE/kernels/<hash>/`` (default ``~/.cache/h2o-vllm``); the hash
covers the source, the flags, torch's version and the CPU's feature flags, so a
copied cache or a container image built elsewhere rebuilds instead of crashing.
``scripts/setup.sh`` builds it once; a worker that finds no build compiles it
(a few seconds to a minute). Where that fails (no compiler, unsupported dtype)
:func:`load` logs why once and returns False: the PyTorch path in
``scoring.py`` scores instead, with the same results.

    python -m h2o_vllm.engine.fused     # build (or find) it and say where it is

``H2O_VLLM_FUSED_SCORING=0`` turns it off (to compare the two paths).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

logger = logging.getLogger("vllm.h2o_vllm.fused")  # under "vllm" so vLLM's log handler prints it

SOURCE = Path(__file__).with_name("csrc") / "score.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-DNDEBUG"]
ENV_SWITCH = "H2O_VLLM_FUSED_SCORING"


def _cpu_flags() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line
    return ""


def _abi_flag() -> str:
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def library_path() -> Path:
    """Where the build for this source, torch and CPU lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), torch.__version__.encode(), _cpu_flags().encode()):
        key.update(part)
    cache = Path(os.environ.get("H2O_VLLM_CACHE", Path.home() / ".cache" / "h2o-vllm"))
    return cache / "kernels" / key.hexdigest()[:16] / "h2o_score.so"


def build(target: Path) -> None:
    """Compile ``SOURCE`` into ``target`` (atomically; concurrent builders wait for each other)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", *FLAGS, _abi_flag(), str(SOURCE), "-o", str(tmp)]
        cmd += [f"-I{p}" for p in include_paths()]
        for p in library_paths():
            cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
        cmd += ["-lc10", "-ltorch_cpu", "-ltorch"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed ({result.returncode}): {result.stderr[-2000:]}")
        tmp.replace(target)


@functools.cache
def load() -> bool:
    """Make ``torch.ops.h2o_vllm.score_layer`` available; False (logged once) where it cannot be."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("H2O fused scoring off (%s=0): scoring with PyTorch operators", ENV_SWITCH)
        return False
    try:
        target = library_path()
        if not target.exists():
            logger.info("H2O: compiling the fused scoring operator into %s", target)
            build(target)
        torch.ops.load_library(str(target))
        logger.info("H2O scores with the fused operator %s", target)
        return True
    except Exception as e:  # any failure means the PyTorch path, never a stopped engine
        logger.warning("H2O fused scoring unavailable (%s); scoring with PyTorch operators (slower)", e)
        return False


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not load():
        print("fused scoring operator: unavailable (see the warning above); the PyTorch path will be used")
        return 1
    print(f"fused scoring operator: {library_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
