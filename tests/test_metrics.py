"""H2O's /metrics series: one snapshot file per data-parallel engine, added up at scrape time."""

from prometheus_client import CollectorRegistry, generate_latest

from h2o_vllm import metrics


def snapshot(evicted, free, total, policies):
    return {
        "evicted_blocks": evicted,
        "evicted_shared_blocks": 1,
        "requests_by_policy": policies,
        "running_by_policy": {},
        "resident_kv_blocks": total - free,
        "shared_kv_blocks": 0,
        "full_cache_kv_blocks": 0,
        "kv_free_blocks": free,
        "kv_total_blocks": total,
    }


def scrape(path) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(metrics.H2OCollector(path))
    lines = generate_latest(registry).decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}


def test_each_engine_writes_its_own_file_and_the_series_add_them_up(tmp_path, monkeypatch):
    base = tmp_path / "metrics.json"
    monkeypatch.setenv(metrics.METRICS_FILE_ENV, str(base))
    metrics.writer_from_env(0).write(snapshot(10, 60, 64, {"h2o": 3, "none": 1}))
    metrics.writer_from_env(1).write(snapshot(5, 64, 64, {"h2o": 2, "streaming": 4}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.engine1.json", "metrics.json"]

    got = scrape(base)
    assert got["h2o_vllm:evicted_blocks_total"] == 15
    assert got["h2o_vllm:evicted_shared_blocks_total"] == 2
    assert got['h2o_vllm:requests_total{policy="h2o"}'] == 5
    assert got['h2o_vllm:requests_total{policy="none"}'] == 1
    assert got['h2o_vllm:requests_total{policy="streaming"}'] == 4
    assert got["h2o_vllm:kv_free_blocks"] == 124 and got["h2o_vllm:kv_total_blocks"] == 128
    assert got["h2o_vllm:resident_kv_blocks"] == 4
    assert got['h2o_vllm:engine_evicted_blocks_total{engine="0"}'] == 10
    assert got['h2o_vllm:engine_evicted_blocks_total{engine="1"}'] == 5


def test_one_engine_keeps_the_named_file_and_unreadable_files_are_skipped(tmp_path):
    base = tmp_path / "metrics.json"
    metrics.SnapshotWriter(base).write(snapshot(7, 30, 32, {"h2o": 1}))
    (tmp_path / "metrics.engine2.json").write_text("{half a fi")  # being replaced, or corrupt
    (tmp_path / "metrics.engineX.json").write_text("{}")  # not an engine's file
    got = scrape(base)
    assert got["h2o_vllm:evicted_blocks_total"] == 7
    assert [k for k in got if k.startswith("h2o_vllm:engine_evicted")] == [
        'h2o_vllm:engine_evicted_blocks_total{engine="0"}'
    ]
    assert scrape(tmp_path / "absent.json")["h2o_vllm:evicted_blocks_total"] == 0
