"""H2O's Prometheus series, next to vLLM's own on ``/metrics``.

The counters live in the scheduler (engine core process) and ``/metrics`` is
served by the API server process. The scheduler writes a small JSON snapshot
(at most every ``MIN_INTERVAL_S`` while busy, and at once when it goes idle) to
``$H2O_VLLM_METRICS_FILE``; a collector in the API server reads it at scrape
time. ``h2o-vllm serve`` sets the variable.

With data parallelism (``-dp N``) each engine core has its own scheduler and
writes its own file (engine 0 the named one, engine ``i`` a sibling
``metrics.engine<i>.json``); every series below is the sum over the engines, and
``h2o_vllm:engine_evicted_blocks_total{engine}`` tells them apart (vLLM's own
series carry the same ``engine`` label). Engines on other nodes (``--headless``)
write on their own node and are not counted.

Series (all prefixed ``h2o_vllm:``):
    evicted_blocks_total               counter  KV blocks evicted (each request's references dropped)
    evicted_shared_blocks_total        counter  of which another request also held (a shared prefix):
                                                evicting them freed no memory
    requests_total{policy}             counter  requests admitted, by policy
    running_requests{policy}           gauge    requests running now, by policy
    resident_kv_blocks                 gauge    distinct KV blocks running requests hold now
    shared_kv_blocks                   gauge    of which more than one request holds (prefix caching)
    full_cache_kv_blocks               gauge    KV blocks they would hold without eviction (per request)
    kv_free_blocks / kv_total_blocks   gauge    the engines' KV pools (free includes blocks that only the
                                                prefix cache keeps, as vLLM counts them)
    engine_evicted_blocks_total{engine} counter evicted_blocks_total of each data-parallel engine

vLLM's own ``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits`` count the hits the
H2O scheduler lets a request take (see ``Footprint.max_prefix_hit``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

METRICS_FILE_ENV = "H2O_VLLM_METRICS_FILE"
MIN_INTERVAL_S = 0.2
PREFIX = "h2o_vllm:"


class SnapshotWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.last_write = 0.0

    def due(self) -> bool:
        """Whether the last write is old enough for another (callers skip building a snapshot if not)."""
        return time.monotonic() - self.last_write >= MIN_INTERVAL_S

    def write(self, snapshot: dict) -> None:
        self.last_write = time.monotonic()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(snapshot))
        os.replace(tmp, self.path)  # readers never see half a file


def engine_file(path: str | os.PathLike, engine: int) -> Path:
    """The snapshot file of data-parallel engine ``engine`` (engine 0's is ``path`` itself)."""
    path = Path(path)
    return path if engine == 0 else path.with_name(f"{path.stem}.engine{engine}{path.suffix}")


def writer_from_env(engine: int = 0) -> SnapshotWriter | None:
    path = os.environ.get(METRICS_FILE_ENV)
    return SnapshotWriter(engine_file(path, engine)) if path else None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sum_snapshots(snapshots: list[dict]) -> dict:
    """The engines' snapshots added up: numbers summed, per-policy counts summed per policy."""
    total: dict = {}
    for snap in snapshots:
        for key, value in snap.items():
            if isinstance(value, dict):
                into = total.setdefault(key, {})
                for label, n in value.items():
                    into[label] = into.get(label, 0) + n
            elif isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    return total


class H2OCollector:
    """prometheus_client collector over the schedulers' latest snapshots (one per engine)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read_engines(self) -> dict[int, dict]:
        """Each engine's latest snapshot, by data-parallel engine index."""
        found = {0: _read(self.path)}
        prefix = f"{self.path.stem}.engine"
        for path in self.path.parent.glob(f"{prefix}*{self.path.suffix}"):
            index = path.name[len(prefix) : -len(self.path.suffix) or None]
            if index.isdigit():
                found[int(index)] = _read(path)
        return {engine: snap for engine, snap in sorted(found.items()) if snap is not None}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engines = self.read_engines()
        snap = sum_snapshots(list(engines.values()))
        for key, help_text in (
            ("evicted_blocks", "KV blocks evicted by H2O"),
            ("evicted_shared_blocks", "Evicted KV blocks another request also held (no memory freed)"),
        ):
            counter = CounterMetricFamily(PREFIX + key, help_text)
            counter.add_metric([], snap.get(key, 0))
            yield counter
        requests = CounterMetricFamily(PREFIX + "requests", "Requests admitted, by eviction policy", labels=["policy"])
        for policy, n in sorted(snap.get("requests_by_policy", {}).items()):
            requests.add_metric([policy], n)
        yield requests
        running = GaugeMetricFamily(
            PREFIX + "running_requests", "Requests running now, by eviction policy", labels=["policy"]
        )
        for policy, n in sorted(snap.get("running_by_policy", {}).items()):
            running.add_metric([policy], n)
        yield running
        for key, help_text in (
            ("resident_kv_blocks", "Distinct KV blocks held by running requests now"),
            ("shared_kv_blocks", "KV blocks more than one running request holds (prefix caching)"),
            ("full_cache_kv_blocks", "KV blocks running requests would hold without eviction"),
            ("kv_free_blocks", "Free blocks in the engine's KV pool"),
            ("kv_total_blocks", "Blocks in the engine's KV pool"),
        ):
            gauge = GaugeMetricFamily(PREFIX + key, help_text)
            gauge.add_metric([], snap.get(key, 0))
            yield gauge
        per_engine = CounterMetricFamily(
            PREFIX + "engine_evicted_blocks", "KV blocks evicted by H2O, by data-parallel engine", labels=["engine"]
        )
        for engine, engine_snap in engines.items():
            per_engine.add_metric([str(engine)], engine_snap.get("evicted_blocks", 0))
        yield per_engine


_registered: set[str] = set()


def register_collector() -> bool:
    """Add the collector to prometheus_client's default registry (the one vLLM's /metrics serves)."""
    path = os.environ.get(METRICS_FILE_ENV)
    if not path or path in _registered:
        return False
    from prometheus_client import REGISTRY

    REGISTRY.register(H2OCollector(path))
    _registered.add(path)
    return True
