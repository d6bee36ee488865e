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


def test_another_cpu_gets_another_build(monkeypatch):
    """A cache (or container image) made on one CPU is not loaded on another: the key has the flags."""
    here = fused.library_path()
    monkeypatch.setattr(fused, "_cpu_flags", lambda: "flags\t\t: fpu sse sse2")
    elsewhere = fused.library_path()
    assert elsewhere != here and elsewhere.parent.parent == here.parent.parent
    monkeypatch.setenv(fused.ENV_MARCH, "x86-64-v3")
    assert fused.library_path() not in (here, elsewhere)
