"""benchmarks/peers/openvino.py without OpenVINO: its arguments, the budget it gives OpenVINO, its table."""

from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def peer():
    # Loaded as bench_peers/openvino, not "openvino" (OpenVINO's own package).
    with benchmark_script("peers/openvino") as module:
        yield module


def test_defaults_are_load_py_kv(peer):
    args = peer.parse_args([])
    assert (args.num_prompts, args.input_len, args.output_len, args.pool_blocks) == (16, 1024, 512, 96)
    assert args.configs == ["vanilla", "h2o_20%"]
    assert args.kv_cache_precision == "bf16"
    assert args.out == peer.ROOT / "results" / "peers" / "openvino"
    assert args.name == "kv"
    assert args.venv == peer.ROOT / ".venv-openvino"
    assert args.evictions["vanilla"] is None


def test_h2o_20_percent_of_1536_tokens(peer):
    """h2o-vllm keeps 9 blocks of a 1,536-token sequence at 20%: 1 sink block, 5 recent, 3 heavy hitters."""
    eviction = peer.parse_args([]).evictions["h2o_20%"]
    assert (eviction["start_size"], eviction["recent_size"], eviction["max_cache_size"]) == (32, 160, 288)
    assert eviction["aggregation_mode"] == "SUM"
    assert eviction["snapkv_window_size"] == 1536  # every prompt row scores (and the first token, as OpenVINO counts)
    assert eviction["apply_rotation"] is False
    assert eviction["clamped"] is False
    assert peer.describe_eviction(eviction) == "start 32 / recent 160 / max 288 SUM"


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("h2o_10%", (32, 64, 128)), ("h2o_50%", (32, 384, 768)), ("h2o_512", (32, 256, 512))],
)
def test_other_budgets(peer, name, sizes):
    eviction = peer.eviction_budget(name, 1024, 512)
    assert (eviction["start_size"], eviction["recent_size"], eviction["max_cache_size"]) == sizes


@pytest.mark.parametrize("budget", ["1%", "5%", "20%", "35%", "80%", "100%", "64", "300"])
@pytest.mark.parametrize("lengths", [(64, 8), (256, 8), (1024, 512), (4000, 96)])
def test_budget_is_always_valid_for_openvino(peer, budget, lengths):
    """Block multiples, start and recent non-zero, max above start + recent: what CacheEvictionConfig asserts."""
    e = peer.eviction_budget(f"h2o_{budget}", *lengths)
    sizes = (e["start_size"], e["recent_size"], e["max_cache_size"])
    assert all(s > 0 and s % peer.BLOCK == 0 for s in sizes)
    assert e["max_cache_size"] > e["start_size"] + e["recent_size"]


def test_options_that_map(peer):
    assert peer.eviction_budget("h2o_20%_mean", 1024, 512)["aggregation_mode"] == "NORM_SUM"
    assert peer.eviction_budget("h2o_20%_window8", 1024, 512)["snapkv_window_size"] == 8
    assert peer.eviction_budget("full", 1024, 512) is None


def test_smoke(peer):
    args = peer.parse_args(["--smoke"])
    assert (args.num_prompts, args.input_len, args.output_len) == (2, 64, 8)
    assert args.pool_blocks == 4  # load.py's pool: two full requests
    assert args.out == peer.ROOT / "results" / "tmp" / "peers" / "openvino-smoke"
    assert args.name == "kv-smoke"
    small = args.evictions["h2o_20%"]
    assert small["clamped"] is True
    assert (small["start_size"], small["recent_size"], small["max_cache_size"]) == (32, 32, 96)
    given = peer.parse_args(["--smoke", "--input-len", "256", "--pool-blocks", "96", "--out", "/tmp/x"])
    assert (given.num_prompts, given.input_len, given.output_len, given.pool_blocks) == (2, 256, 8, 96)
    assert given.out == Path("/tmp/x")


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ("streaming_20%", "policy streaming"),
        ("h2o_20%_window8_max", "score_reduce=max"),
        ("h2o_20%_chunked", "prefill=chunked"),
        ("bogus", "must start with"),
    ],
)
def test_refuses_what_openvino_cannot_run(peer, capsys, config, says):
    with pytest.raises(SystemExit) as exc:
        peer.parse_args(["--configs", "vanilla", config])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_bad_numbers(peer):
    for argv in (["--num-prompts", "0"], ["--pool-blocks", "0"]):
        with pytest.raises(SystemExit):
            peer.parse_args(argv)


def test_torch_index(peer, tmp_path):
    assert peer.torch_index_args(None, [str(tmp_path)]) == ["--extra-index-url", peer.TORCH_CPU_INDEX]
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert peer.torch_index_args(None, [str(tmp_path / "missing"), str(tmp_path)]) == []
    assert peer.torch_index_args("auto", [str(tmp_path)]) == []
    assert peer.torch_index_args("none", []) == []
    assert peer.torch_index_args("https://example.invalid/cpu", []) == [
        "--extra-index-url",
        "https://example.invalid/cpu",
    ]


def test_venv_ok(peer):
    assert peer.venv_ok({"openvino-genai": "2026.4.1.0", "optimum-intel": "2.2.0"})
    assert not peer.venv_ok({"openvino-genai": "2026.3.0.0", "optimum-intel": "2.2.0"})
    assert not peer.venv_ok({"openvino-genai": "2026.4.1.0", "optimum-intel": None})
    assert not peer.venv_ok(None)


def test_latencies_as_vllm_bench(peer):
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4]
    p50, p99 = peer.percentiles(values)
    assert p50 == pytest.approx(np.percentile(values, 50))
    assert p99 == pytest.approx(np.percentile(values, 99))
    assert peer.percentiles([]) == (None, None)
    stats = peer.latency_stats(10.0, [[10.5, 10.6, 10.8], [11.0, 11.5], []])
    assert stats["p50_ttft_ms"] == pytest.approx(750.0)  # 500 and 1000 ms
    assert stats["p50_tpot_ms"] == pytest.approx(325.0)  # 150 and 500 ms
    assert stats["p99_itl_ms"] == pytest.approx(np.percentile([100.0, 200.0, 500.0], 99))


def test_block_size_from_kv_bytes(peer):
    geometry = {"layers": 30, "kv_heads": 3, "head_dim": 64}  # SmolLM2-135M
    kv_bytes = 96 * 32 * 2 * 30 * 3 * 64 * 2  # 96 blocks of 32 tokens, K and V, bf16
    assert peer.block_size_seen(kv_bytes, 96, geometry, "bf16") == 32
    assert peer.block_size_seen(kv_bytes, 96, geometry, "u8") is None
    assert peer.block_size_seen(kv_bytes + 1, 96, geometry, "bf16") is None


def row(config, tok_s, eviction=None, **over):
    base = {
        "config": config,
        "output_tok_s": tok_s,
        "requests_s": 0.125,
        "max_running": 3,
        "peak_kv_blocks": 96,
        "mean_kv_blocks": 80.5,
        "p50_ttft_ms": 1500.4,
        "p99_ttft_ms": 9000.0,
        "p50_tpot_ms": 60.04,
        "p99_tpot_ms": 70.0,
        "p50_itl_ms": 50.0,
        "p99_itl_ms": 90.0,
        "completed": 16,
        "failed": 0,
        "wall_s": 128.04,
        "eviction": eviction,
    }
    return {**base, **over}


def test_table(peer):
    eviction = peer.eviction_budget("h2o_20%", 1024, 512)
    text = peer.table([row("openvino:vanilla", 50.0), row("openvino:h2o_20%", 75.0, eviction, p50_ttft_ms=None)])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| config | output tok/s | x vanilla | req/s | max running | peak KV blocks |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2] == (
        "| openvino:vanilla | 50.0 | 1.00 | 0.125 | 3 | 96 | 80.5 | 1500 / 9000 | 60.0 / 70.0 | 50.0 / 90.0 "
        "| 16 | 0 | 128.0 | none |"
    )
    assert "| openvino:h2o_20% | 75.0 | 1.50 |" in lines[3]
    assert "|  | 60.0 / 70.0 |" in lines[3]  # a latency it has no value for is left blank
    assert lines[3].endswith("| start 32 / recent 160 / max 288 SUM |")
    assert "| x vanilla |" in peer.table([row("openvino:h2o_20%", 75.0)])  # without vanilla: the column stays, empty


@pytest.fixture(scope="module")
def side_by_side():
    with benchmark_script("peers/side_by_side") as module:
        yield module


def _load_run(cpu="AMD EPYC, 2 CPUs"):
    row = lambda name, tok_s: {  # noqa: E731
        "config": name, "output_tok_s": tok_s, "max_running": 2, "p50_ttft_ms": 1.0, "p99_ttft_ms": 2.0,
        "p50_tpot_ms": 3.0, "p99_tpot_ms": 4.0,
    }  # fmt: skip
    ours = {"command": "python benchmarks/load.py kv", "commit": "abc", "cpu": cpu, "num_prompts": 16,
            "input_len": 1024, "output_len": 512, "pool_blocks": 96,
            "rows": [row("vanilla", 40.0), row("h2o_20%", 100.0), row("vanilla+bind=0-1", 50.0),
                     row("h2o_20%+bind=0-1", 150.0)]}  # fmt: skip
    theirs = {"command": "python benchmarks/peers/openvino.py", "commit": "abc", "cpu": "AMD EPYC, 2 CPUs",
              "versions": {"openvino-genai": "2026.4.1"},
              "settings": {"num_prompts": 16, "input_len": 1024, "output_len": 512, "pool_blocks": 96},
              "rows": [row("openvino:vanilla", 30.0), row("openvino:h2o_20%", 120.0)]}  # fmt: skip
    return ours, theirs


def test_side_by_side_rows_against_own_vanilla_and_openvino_eviction(side_by_side):
    ours, theirs = _load_run()
    rows = {(r["engine"], r["config"]): r for r in side_by_side.rows_of(ours, theirs)}
    assert rows[("OpenVINO GenAI", "h2o_20%")]["x_vanilla"] == pytest.approx(4.0)
    assert rows[("h2o-vllm", "h2o_20%")]["x_vanilla"] == pytest.approx(2.5)  # against vanilla, not +bind
    assert rows[("h2o-vllm", "h2o_20%+bind=0-1")]["x_vanilla"] == pytest.approx(3.0)  # against vanilla+bind=0-1
    assert rows[("h2o-vllm", "h2o_20%+bind=0-1")]["x_openvino_eviction"] == pytest.approx(1.25)
    assert "| h2o-vllm | h2o_20%+bind=0-1 | 150.0 | 3.00 | 1.25 | 2 |" in side_by_side.table(list(rows.values()))


def test_side_by_side_refuses_runs_of_different_workloads_or_cpus(side_by_side):
    ours, theirs = _load_run()
    assert side_by_side.workload(ours, theirs)["pool_blocks"] == 96
    with pytest.raises(SystemExit, match="not the same CPU"):
        side_by_side.workload(*_load_run(cpu="Intel Xeon, 2 CPUs"))
    ours["pool_blocks"] = 192
    with pytest.raises(SystemExit, match="pool_blocks 192 != 96"):
        side_by_side.workload(ours, theirs)
