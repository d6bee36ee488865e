"""benchmarks/load.py: what a configuration name's ``+`` suffixes ask of the server (fast: no server)."""

import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def load():
    with benchmark_script("load") as module:
        yield module


def test_suffixes_become_server_flags_and_environment(load):
    base, flags, env = load.modifiers("h2o_20%+no-prefix-caching+bind=0-1+march=x86-64-v3")
    assert base == "h2o_20%"
    assert flags == ["--no-enable-prefix-caching"]
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "H2O_VLLM_FUSED_MARCH": "x86-64-v3"}
    assert load.modifiers("vanilla") == ("vanilla", [], {})
    assert load.modifiers("streaming_20%+pytorch-scoring")[2] == {"H2O_VLLM_FUSED_SCORING": "0"}
    assert load.modifiers("vanilla+reserve=1+dtype=float32") == (
        "vanilla",
        ["--dtype", "float32"],
        {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
    )


def test_an_unknown_suffix_is_refused(load):
    with pytest.raises(SystemExit, match=r"\+fast"):
        load.modifiers("h2o_20%+fast")
