"""The fused scoring operator built for every CPU target, not only the one it runs on.

Each x86-64 level this CPU can run (v2: SSE4.2, v3: AVX2, v4: AVX-512; code for a
lower level runs on a higher CPU) and ``-march=native`` is built, loaded beside the
others under its own operator namespace, and checked against the PyTorch path on
every dtype, page layout and block size; aarch64 (NEON) is cross-compiled as a check
that it builds (Debian's ``g++-aarch64-linux-gnu``, installed by ``setup.sh --test``).
"""

import shutil

import pytest
from scoring_cases import CASE_IDS, OPERATOR_CASES, assert_fused_equals_pytorch

from h2o_vllm.engine import fused

TARGETS = fused.runnable_targets()
# What each build's vector code must say it uses (the register width is chosen per target).
EXPECTED = {"x86-64-v2": "SSE4.2", "x86-64-v3": "AVX2 FMA", "x86-64-v4": "AVX-512 FMA", "armv8-a": "NEON"}


def test_this_cpu_runs_at_least_one_x86_level_or_is_arm():
    assert len(TARGETS) >= 2, f"no target below native found for this CPU: {TARGETS}"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_builds_and_says_what_it_uses(target):
    fused.load_variant(target)
    described = fused.describe(fused.variant_namespace(target))
    assert described.startswith(("x86-64", "aarch64")), described
    if target in EXPECTED:
        assert EXPECTED[target] in described, described
    if target == "x86-64-v3":
        assert "AVX-512" not in described and "256-bit" in described
    if target == "x86-64-v4":
        assert "512-bit" in described


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype,page_dtype,layout,block_size", OPERATOR_CASES, ids=CASE_IDS)
def test_each_target_equals_the_pytorch_path(target, dtype, page_dtype, layout, block_size):
    assert_fused_equals_pytorch(dtype, page_dtype, layout, block_size, op=fused.load_variant(target))


def test_aarch64_cross_build_compiles_with_neon(tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-g++")
    assert compiler, "aarch64-linux-gnu-g++ missing: apt-get install g++-aarch64-linux-gnu (setup.sh --test does)"
    obj = tmp_path / "score.o"
    fused.run_compiler(fused.compile_command(obj, "armv8-a", compiler=compiler, link=False))
    data = obj.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183  # EM_AARCH64
    assert b" NEON" in data  # the NEON branch of the vector width was compiled


def test_a_compiler_error_is_reported_by_its_first_error_line(tmp_path, monkeypatch):
    bad = tmp_path / "bad.cpp"
    bad.write_text("int main() { return undefined_name; }\n")
    monkeypatch.setattr(fused, "SOURCE", bad)
    with pytest.raises(fused.BuildError, match=r"bad\.cpp:1:\d+: error: .undefined_name. was not declared"):
        fused.build(tmp_path / "out" / "lib.so", "native", "h2o_vllm_bad")


def test_a_missing_compiler_is_named(tmp_path):
    with pytest.raises(fused.BuildError, match="no-such-g\\+\\+ not found"):
        fused.run_compiler(["no-such-g++", "-c", "x.cpp"])


def test_another_cpu_gets_another_native_build_and_the_same_build_for_a_named_target(monkeypatch):
    """A native build made on one CPU is not loaded on another (the key has the CPU's flags); a build
    for a named x86-64 level is the same file on every CPU that runs it, and refused on one that cannot."""
    here, v2_here = fused.library_path(), fused.library_path("x86-64-v2")
    monkeypatch.setattr(fused, "_cpu_flags", lambda: "flags\t\t: fpu sse sse2")
    elsewhere = fused.library_path()
    assert elsewhere != here and elsewhere.parent.parent == here.parent.parent
    assert fused.library_path("x86-64-v2") == v2_here
    monkeypatch.setenv(fused.ENV_MARCH, "x86-64-v3")
    assert fused.library_path() not in (here, elsewhere)
    with pytest.raises(fused.BuildError, match="cannot run code for -march=x86-64-v3"):
        fused._load_library("x86-64-v3", "h2o_vllm_never_loaded")


LOAD_IN_A_FRESH_PROCESS = """
import logging, sys
from h2o_vllm import cpu
if sys.argv[1] == "other-cpu":
    cpu.flags_line = lambda: "flags\\t\\t: fpu sse sse2 avx avx2 fma"
from h2o_vllm.engine import fused
logging.basicConfig(level=logging.INFO, format="%(message)s")
print("loaded" if fused.load() else "not loaded", fused.library_path())
"""


def test_a_build_made_on_another_cpu_is_not_loaded(tmp_path):
    """As a container image built on one CPU and started on another: the cache holds this CPU's
    build; a process that sees other CPU flags does not load it but compiles its own (here with
    no compiler on PATH, so it logs why and H2O scores with PyTorch operators; no crash)."""
    import os
    import shutil
    import subprocess
    import sys

    assert fused.load()
    image_cache = tmp_path / "cache"
    env = {**os.environ, "H2O_VLLM_CACHE": str(image_cache)}
    built_here = image_cache / fused.library_path().relative_to(fused.library_path().parents[2])
    built_here.parent.mkdir(parents=True)
    shutil.copy(fused.library_path(), built_here)  # what setup.sh left in the image on this CPU

    def start(cpu, path):
        run = subprocess.run(
            [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, cpu],
            env={**env, "PATH": path},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout + run.stderr

    no_compiler = tmp_path / "bin"
    no_compiler.mkdir()
    same = start("same-cpu", str(no_compiler))  # no compiler needed: the image's build is this CPU's
    assert f"loaded {built_here}" in same and "compiling" not in same
    other = start("other-cpu", str(no_compiler))
    assert "compiling the fused scoring operator (-march=native)" in other
    assert "H2O fused scoring unavailable (g++ not found (install g++)); scoring with PyTorch operators" in other
    assert "not loaded" in other and str(built_here) not in other
