"""benchmarks/parallel.py: the command lines of each layout's nodes, and how a run is reported (fast: no engine)."""

import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def parallel():
    with benchmark_script("parallel") as module:
        yield module


def test_one_process_layouts_are_one_node(parallel):
    for name, args in parallel.LAYOUTS.items():
        assert parallel.node_args(name, 29621) == [args]


def test_tensor_parallel_nodes_as_the_doc_starts_them(parallel):
    # docs/parallelism.md, "Multi-node"
    both = ["-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "29621"]
    assert parallel.node_args("tp2-nodes", 29621) == [
        [*both, "--node-rank", "0"],
        [*both, "--node-rank", "1", "--headless"],
    ]


def test_data_parallel_nodes_as_the_doc_starts_them(parallel):
    both = ["-dp", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1"]
    both += ["--data-parallel-rpc-port", "29622"]
    assert parallel.node_args("dp2-nodes", 29622) == [both, [*both, "--headless", "--data-parallel-start-rank", "1"]]


def test_each_node_gets_its_own_share_of_the_cpus(parallel):
    assert parallel.node_cpus(2, cpus={0, 1}) == ["0", "1"]
    assert parallel.node_cpus(2, cpus=range(16)) == ["0-7", "8-15"]


def test_node_servers_bound_apart_with_their_own_log_and_snapshots(parallel, tmp_path):
    from h2o_vllm.metrics import METRICS_FILE_ENV
    from h2o_vllm.serve import BIND_ENV

    model = ["--model", "m"]
    (single,) = parallel.servers("single", model, tmp_path, tmp_path / "snap")
    assert single.log_path == tmp_path / "single.log" and single.args[4:] == model  # after --host, --port
    node0, node1 = parallel.servers("dp2-nodes", model, tmp_path, tmp_path / "snap")
    assert [node0.env[BIND_ENV], node1.env[BIND_ENV]] == parallel.node_cpus(2)
    assert [node0.log_path, node1.log_path] == [tmp_path / "dp2-nodes.node0.log", tmp_path / "dp2-nodes.node1.log"]
    assert node0.env[METRICS_FILE_ENV] != node1.env[METRICS_FILE_ENV]
    assert "--headless" in node1.args and "--headless" not in node0.args
    port = node0.args[node0.args.index("--data-parallel-rpc-port") + 1]
    assert node1.args[node1.args.index("--data-parallel-rpc-port") + 1] == port


def test_report_adds_up_the_nodes_and_says_how_they_stopped(parallel):
    tokens = [[1, 2], [3, 4]]
    common = {"startup_s": 60.0, "wall_s": 2.0, "output_tok_s": 2.0, "rss_mib": 100, "tokens": tokens}
    rows = [
        {"layout": "single", **common, "evicted_blocks": 34, "exit_codes": [0], "left_behind": []},
        {"layout": "dp2-nodes", **common, "evicted_blocks": 34, "evicted_by_node": [17, 17], "matches_single": True}
        | {"exit_codes": [0, 0], "left_behind": []},
        {"layout": "tp2-nodes", **common, "evicted_blocks": 34, "evicted_by_node": [34, 0], "matches_single": True}
        | {"exit_codes": [0, None], "left_behind": ["node 1: 42 python"]},
    ]
    settings = {"model": "m", "requests": 2, "min_len": 400, "max_len": 900, "new": 8}
    text = parallel.report(rows, settings)
    assert "| dp2-nodes | 60.0 | 2.0 | 2.0 | 1.00 | 100 | 34 (17 + 17) | yes | yes |" in text
    assert (
        "| tp2-nodes | 60.0 | 2.0 | 2.0 | 1.00 | 100 | 34 (34 + 0) | yes | **no**: exit codes [0, None], 1 processes left |"
        in text
    )
    assert "node 1 `--headless`" in text
    assert [parallel.stopped_cleanly(r) for r in rows] == [True, True, False]
    assert parallel.stopped_cleanly({"layout": "tp2", "refused": "9 heads"})
