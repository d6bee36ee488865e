"""Parallel layouts served side by side: what tensor, pipeline and data parallelism cost on this
machine, and whether they evict and write exactly as one process does.

For each layout (``single``, ``tp2``, ``pp2``, ``dp2``) a fresh ``h2o-vllm serve`` starts on a
loopback port with the same model in float32 and the same settings (the compiled model: vLLM's CPU
runner cannot run pipeline parallelism under ``--enforce-eager``; every layout compiles alike), one
after another, never two at once. Each gets the same workload at once: ``--requests`` greedy
completions of essay text (``--min-len`` to ``--max-len`` prompt tokens, ``--new`` new tokens,
EOS ignored), alternately H2O with ``sum`` and ``max`` scores at a 25% budget, so eviction is
active. Recorded per layout: seconds to healthy, the workload's wall time and output tokens per
second, the resident memory of the server's processes after it, the blocks evicted
(``/metrics``), and every request's tokens. A layout matches when its tokens and its evicted
blocks equal ``single``'s. A layout vLLM refuses for the model (``tp2`` with 9 query heads) is
recorded with vLLM's reason. Every server is stopped with SIGTERM: it must exit 0 and leave no
process behind.

Two node processes on loopback (``tp2-nodes``, ``dp2-nodes``; docs/parallelism.md, "Multi-node"):
node 0 runs the API server, node 1 is ``--headless``, each bound to its own share of the CPUs
(one core each on 2). The blocks evicted are node 0's ``/metrics`` plus the H2O snapshots node 1's
engines write on node 1 (a data-parallel engine there is not in node 0's ``h2o_vllm:`` series).
Each node is stopped in turn, node 0 first: a headless node does not stop when node 0 does.

    python benchmarks/parallel.py                                   # the default model
    python benchmarks/parallel.py --model qwen2.5-coder-0.5b --out results/parallel-qwen
    python benchmarks/parallel.py --vanilla --layouts single,pp2,dp2 --out results/parallel-vanilla
    python benchmarks/parallel.py --model qwen2.5-coder-0.5b --layouts single,tp2,dp2,tp2-nodes,dp2-nodes \\
        --out results/parallel-nodes

Results: OUT/parallel.json, OUT/parallel.md, OUT/parallel.png; each server's log in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from report import ROOT, Run, markdown, pyplot

from h2o_vllm import assets
from h2o_vllm.local_server import LOOPBACK, ServerFailed, ServerProcess, free_port
from h2o_vllm.metrics import METRICS_FILE_ENV, H2OCollector, sum_snapshots
from h2o_vllm.serve import BIND_ENV, cpu_binding

LAYOUTS = {"single": [], "tp2": ["-tp", "2"], "pp2": ["-pp", "2"], "dp2": ["-dp", "2"]}
# Two node processes on loopback: what both take ("PORT": a free port where they meet), then each
# node's own. Node 0 runs the API server, node 1 none (--headless).
NODES = {
    "tp2-nodes": (
        ["-tp", "2", "--nnodes", "2", "--master-addr", LOOPBACK, "--master-port", "PORT"],
        [["--node-rank", "0"], ["--node-rank", "1", "--headless"]],
    ),
    "dp2-nodes": (
        ["-dp", "2", "--data-parallel-size-local", "1"]
        + ["--data-parallel-address", LOOPBACK, "--data-parallel-rpc-port", "PORT"],
        [[], ["--headless", "--data-parallel-start-rank", "1"]],
    ),
}


def node_args(name: str, port: int) -> list[list[str]]:
    """Each node's ``h2o-vllm serve`` arguments for layout ``name`` (one node for a LAYOUTS one)."""
    if name in LAYOUTS:
        return [LAYOUTS[name]]
    both, own = NODES[name]
    both = [str(port) if arg == "PORT" else arg for arg in both]
    return [both + extra for extra in own]


def node_cpus(nodes: int, cpus=None) -> list[str]:
    """Each node's ``VLLM_CPU_OMP_THREADS_BIND``: this process's CPUs split as ``h2o-vllm serve`` splits
    them per rank ("0", "1" on 2 cores)."""
    return cpu_binding(["-dp", str(nodes)], env={}, cpus=cpus, numa_nodes=1).split("|")


def servers(name: str, args: list[str], out: Path, snapshots: Path) -> list[ServerProcess]:
    """The layout's server processes, node 0 first, each node's H2O snapshots under ``snapshots``."""
    per_node = node_args(name, free_port())
    if len(per_node) == 1:
        return [ServerProcess(args + per_node[0], log_path=out / f"{name}.log")]
    return [
        ServerProcess(
            args + extra,
            env={BIND_ENV: cpus, METRICS_FILE_ENV: str(snapshots / f"node{rank}.json")},
            log_path=out / f"{name}.node{rank}.log",
        )
        for rank, (extra, cpus) in enumerate(zip(per_node, node_cpus(len(per_node)), strict=True))
    ]


def start(nodes: list[ServerProcess], timeout: float = 900.0) -> None:
    """Launch every node, node 0 last, and wait for node 0's API server; ServerFailed once any node exits."""
    for node in reversed(nodes):
        node.launch()
    deadline = time.monotonic() + timeout
    while not nodes[0].healthy():
        exited = [rank for rank, node in enumerate(nodes) if node.proc.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise ServerFailed(f"nodes {exited} exited during start" if exited else f"not healthy after {timeout} s")
        time.sleep(1.0)


def session(sid: int) -> list[psutil.Process]:
    """The live processes of a server's session (its own: API server, engine cores, workers)."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def stop(nodes: list[ServerProcess], timeout: float = 120.0) -> dict:
    """SIGTERM to each node in turn, node 0 first: each one's exit code (None: still running after
    ``timeout``) and the processes of its session still there 30 s after it exited."""
    codes, left = [], []
    for rank, node in enumerate(nodes):
        node.proc.send_signal(signal.SIGTERM)
        try:
            codes.append(node.proc.wait(timeout))
        except subprocess.TimeoutExpired:
            codes.append(None)
        deadline = time.monotonic() + 30.0  # Python's resource tracker may take a while on a busy machine
        while (found := session(node.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left += [f"node {rank}: {proc.pid} {proc.info['name']}" for proc in found]
        node.stop()  # what is left goes, and the log is closed
    return {"exit_codes": codes, "left_behind": left}


def prompts(model_dir: Path, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` slices of essay text as token ids, ``lo`` to ``hi`` tokens each."""
    from transformers import AutoTokenizer

    from h2o_vllm.datasets import essays_text

    ids = AutoTokenizer.from_pretrained(model_dir)(essays_text())["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start : start + length])
    return out


def server_rss_mib(nodes: list[ServerProcess]) -> float:
    """Resident memory of the servers' sessions: API server, engine cores, workers."""
    total = 0
    for proc in (proc for node in nodes for proc in session(node.proc.pid)):
        try:
            total += proc.memory_info().rss
        except (ProcessLookupError, psutil.Error):
            continue
    return total / 2**20


def evicted(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("h2o_vllm:evicted_blocks_total "):
            return float(line.split()[1])
    return 0.0


def snapshot_evicted(node: ServerProcess) -> float:
    """Blocks evicted by a node's engines, from the H2O snapshots they write on that node."""
    engines = H2OCollector(node.env[METRICS_FILE_ENV]).read_engines()
    return sum_snapshots(list(engines.values())).get("evicted_blocks", 0)


def refusal(log: Path) -> str:
    """The reason vLLM gave for not starting: its configuration check's message, or the last error line."""
    text = log.read_text(errors="replace").splitlines()
    checks = [line.split("Value error,", 1)[1].split(" [type=", 1)[0] for line in text if "Value error," in line]
    errors = [line.split("Error:", 1)[1] for line in text if "Error:" in line]
    found = checks or errors
    return found[-1].strip() if found else f"did not start; see {log}"


def run_layout(
    name: str, args: list[str], served: str, workload: list[list[int]], new: int, out: Path, vanilla: bool = False
) -> dict:
    snapshots = Path(tempfile.mkdtemp(prefix="h2o-parallel-"))
    nodes = servers(name, args, out, snapshots)
    t0 = time.monotonic()
    try:
        start(nodes)
    except ServerFailed as exc:  # a node exited (vLLM's reason is in its log), or node 0 never got healthy
        failed = next((node for node in nodes if node.proc.poll() is not None), None)
        reason = refusal(failed.log_path) if failed else str(exc)
        for node in nodes:
            node.stop()
        shutil.rmtree(snapshots, ignore_errors=True)
        return {"layout": name, "refused": reason}
    startup = time.monotonic() - t0
    try:
        with httpx.Client(base_url=nodes[0].base_url, timeout=1800) as client:

            def evicted_by_node() -> list[float]:  # node 0's /metrics counts only its own engines
                return [evicted(client)] + [snapshot_evicted(node) for node in nodes[1:]]

            before = evicted_by_node()

            def send(i: int) -> list[int]:
                body = {"model": served, "prompt": workload[i], "max_tokens": new, "temperature": 0}
                body |= {"ignore_eos": True, "return_token_ids": True}
                if not vanilla:
                    body["vllm_xargs"] = {"h2o_budget": 0.25, "h2o_score_reduce": "sum" if i % 2 == 0 else "max"}
                resp = client.post("/v1/completions", json=body)
                resp.raise_for_status()
                return resp.json()["choices"][0]["token_ids"]

            t1 = time.monotonic()
            with ThreadPoolExecutor(len(workload)) as pool:
                tokens = list(pool.map(send, range(len(workload))))
            wall = time.monotonic() - t1
            time.sleep(1.0)  # the idle snapshot
            by_node = [int(a - b) for a, b in zip(evicted_by_node(), before, strict=True)]
            row = {
                "layout": name,
                "startup_s": round(startup, 1),
                "wall_s": round(wall, 2),
                "output_tok_s": round(sum(len(t) for t in tokens) / wall, 1),
                "rss_mib": round(server_rss_mib(nodes)),
                "evicted_blocks": sum(by_node),
                **({"evicted_by_node": by_node} if len(nodes) > 1 else {}),
                "tokens": tokens,
            }
    finally:
        stopped = stop(nodes)
        shutil.rmtree(snapshots, ignore_errors=True)
    row |= stopped
    print(
        f"{name}: healthy in {row['startup_s']} s, workload {row['wall_s']} s, {row['output_tok_s']} tok/s, "
        f"{row['rss_mib']} MiB, {row['evicted_blocks']} blocks evicted {by_node}, SIGTERM: exit codes "
        f"{row['exit_codes']}, {len(row['left_behind'])} processes left",
        flush=True,
    )
    return row


def stopped_cleanly(row: dict) -> bool:
    return all(code == 0 for code in row.get("exit_codes", [0])) and not row.get("left_behind")


def report(rows: list[dict], settings: dict) -> str:
    base = next((r for r in rows if r["layout"] == "single" and "tokens" in r), None)
    lines = [
        f"### Parallel layouts, {settings['model']}",
        "",
        f"{settings['requests']} requests at once, {settings['min_len']}-{settings['max_len']} prompt tokens, "
        f"{settings['new']} new tokens, float32, "
        f"{'vanilla vLLM (--no-h2o), full caches' if settings.get('vanilla') else 'H2O at 25% (sum and max alternately)'}"
        f"; {os.cpu_count()} CPUs. "
        "Ratios against `single` in the same run.",
        "",
        "| layout | healthy after (s) | workload (s) | output tok/s | x single | server RSS (MiB) | evicted blocks "
        "| tokens and evictions = single | SIGTERM: exit 0, nothing left |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['layout']} | refused: {r['refused']} | | | | | | | |")
            continue
        ratio = f"{r['output_tok_s'] / base['output_tok_s']:.2f}" if base else "-"
        same = "-" if base is None or r is base else ("yes" if r["matches_single"] else "**no**")
        evicted = r["evicted_blocks"]
        if "evicted_by_node" in r:
            evicted = f"{evicted} ({' + '.join(str(n) for n in r['evicted_by_node'])})"
        clean = "-" if "exit_codes" not in r else "yes"
        if not stopped_cleanly(r):
            clean = f"**no**: exit codes {r['exit_codes']}, {len(r['left_behind'])} processes left"
        lines.append(
            f"| {r['layout']} | {r['startup_s']} | {r['wall_s']} | {r['output_tok_s']} | {ratio} | {r['rss_mib']} "
            f"| {evicted} | {same} | {clean} |"
        )
    if any(r["layout"] in NODES for r in rows):
        lines += [
            "",
            "`-nodes`: two `h2o-vllm serve` processes on loopback, node 0 with the API server, node 1 `--headless`, "
            "each bound to its own share of the CPUs; evicted blocks: node 0's `/metrics` + node 1's own H2O "
            "snapshots; stopped with SIGTERM one after the other, node 0 first. Each node's log: "
            "`LAYOUT.node0.log`, `LAYOUT.node1.log`.",
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], settings: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    ran = [r for r in rows if "refused" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(
        axes,
        ("output_tok_s", "startup_s", "rss_mib"),
        ("output tokens/s (workload)", "seconds to healthy", "server RSS (MiB)"),
        strict=True,
    ):
        ax.bar([r["layout"] for r in ran], [r[key] for r in ran], color="#4c72b0")
        ax.set_title(label)
    fig.suptitle(f"{settings['model']}: parallel layouts on {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=assets.DEFAULT_MODEL.name, choices=sorted(assets.MODELS))
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help="comma-separated, from " + ",".join([*LAYOUTS, *NODES])
    )
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=400)
    parser.add_argument("--max-len", type=int, default=900)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "parallel")
    parser.add_argument(
        "--vanilla", action="store_true", help="vanilla vLLM (--no-h2o, full caches): what the layouts cost without H2O"
    )
    parser.add_argument(
        "--replot", action="store_true", help="redraw OUT/parallel.md and .png from its JSON, run nothing"
    )
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "parallel.json").read_text())
        rows, settings = saved["layouts"], saved["settings"]
        record = {"command": settings["command"], "commit": saved.get("commit"), "cpu": saved.get("cpu")}
        (args.out / "parallel.md").write_text(markdown(report(rows, settings), [record]))
        plot(rows, settings, args.out / "parallel.png")
        return 0
    run = Run.start(__file__, argv)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS and name not in NODES]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {', '.join([*LAYOUTS, *NODES])}")
    args.out.mkdir(parents=True, exist_ok=True)

    spec = assets.model_spec(args.model)
    model_dir = assets.prepare_model(spec).path
    workload = prompts(model_dir, args.requests, args.min_len, args.max_len, args.seed)
    serve_args = ["--model", args.model, "--dtype", "float32", "--max-model-len", str(args.max_len + args.new + 64)]
    if args.vanilla:
        serve_args.append("--no-h2o")
    rows = [
        run_layout(name, serve_args, spec.name, workload, args.new, args.out, vanilla=args.vanilla) for name in layouts
    ]
    base = next((r for r in rows if r["layout"] == "single" and "tokens" in r), None)
    for r in rows:
        if base is not None and "tokens" in r:
            r["matches_single"] = r["tokens"] == base["tokens"] and r["evicted_blocks"] == base["evicted_blocks"]
    settings = {
        "model": spec.name,
        "command": run.command,  # also at the top of parallel.json, beside commit and cpu
        **{k: getattr(args, k) for k in ("requests", "min_len", "max_len", "new", "seed", "vanilla")},
        "serve_args": serve_args,
    }
    data = {"settings": settings, "layouts": rows}
    print(run.write(args.out, "parallel", data, report(rows, settings), plot=lambda png: plot(rows, settings, png)))
    mismatched = [r["layout"] for r in rows if r.get("matches_single") is False]
    if mismatched:
        print(f"layouts whose tokens or evictions differ from single: {mismatched}", file=sys.stderr)
    unclean = [r["layout"] for r in rows if not stopped_cleanly(r)]
    if unclean:
        print(f"layouts that did not exit 0 on SIGTERM, or left processes: {unclean}", file=sys.stderr)
    return 1 if mismatched or unclean else 0


if __name__ == "__main__":
    sys.exit(main())
