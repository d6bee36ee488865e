"""Soak: a served H2O engine under moderate mixed load for a long time, watched for leaks.

One ``h2o-vllm serve`` (the default model and settings, a loopback port) gets
``--concurrency`` clients for ``--minutes``: each sends one request after another, a mix
of policies (the server default, ``@h2o-0.2``, ``@streaming-0.2``, ``@full``, key-norm
through ``vllm_xargs``), completions and chats, streamed or not, prompts of 50 to 1,500
words of essay text, 16 to 256 new tokens, and one request in ten leaves mid-stream.
Every ``--interval`` seconds a sampler records the resident memory (RSS) of the API
server, the engine core and the worker processes, and the KV pool's use and the requests
running (``/metrics``: H2O's free blocks, and vLLM's own gauges, which also exist with
``--serve-args --no-h2o --policies default`` for a vanilla comparison). At the end the clients stop, the pool must be
full again, and the server is stopped with SIGTERM (it must exit 0).

Verdict: for each process, the mean RSS over the last ``--window`` minutes against the
mean over the ``--window`` minutes after the warm-up (``--warmup``): growth under 5%;
zero errors; the pool full at the end.

    python benchmarks/soak.py --minutes 30 --out results/soak

Writes OUT/soak.json (every sample, the settings, the verdict), OUT/soak.md and
OUT/soak.png (memory and the pool's use over time).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from report import Run, pyplot

from h2o_vllm.assets import DEFAULT_SERVED_NAME as MODEL
from h2o_vllm.local_server import ServerProcess

POLICIES = {
    "default": (MODEL, None),  # the server's default policy (vLLM's full cache with --no-h2o)
    "h2o_20%": (f"{MODEL}@h2o-0.2", None),
    "streaming_20%": (f"{MODEL}@streaming-0.2", None),
    "full": (f"{MODEL}@full", None),
    "keynorm_20%": (MODEL, {"h2o_policy": "keynorm", "h2o_budget": 0.2}),
}
ROLES = ("api_server", "engine_core", "worker")
GROWTH_LIMIT = 0.05


def process_roles(pid: int) -> dict[str, psutil.Process]:
    """The server's processes by role: the API server (``pid``), VLLM::EngineCore, VLLM::Worker."""
    main = psutil.Process(pid)
    roles = {"api_server": main}
    for child in main.children(recursive=True):
        name = child.name()
        if "EngineCore" in name:
            roles["engine_core"] = child
        elif "Worker" in name:
            roles["worker"] = child
    return roles


def server_metrics(client: httpx.Client) -> dict[str, float]:
    """H2O's series and vLLM's, each summed over its labels."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("h2o_vllm:", "vllm:")):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


class Load:
    """``concurrency`` client threads sending mixed requests until stopped."""

    def __init__(self, base_url: str, words: list[str], concurrency: int, seed: int, policies: list[str]):
        self.base_url, self.words, self.concurrency, self.seed = base_url, words, concurrency, seed
        self.policies = policies
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(concurrency)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(600)

    def request(self, rng: random.Random) -> dict:
        policy = rng.choice(self.policies)
        model, xargs = POLICIES[policy]
        start = rng.randrange(0, len(self.words) - 1600)
        text = " ".join(self.words[start : start + rng.choice([50, 200, 600, 1500])])
        body = {"model": model, "max_tokens": rng.choice([16, 64, 128, 256]), "temperature": rng.choice([0, 0.8])}
        if rng.random() < 0.5:
            body["prompt"] = text + "\n\nIn one sentence, the passage says"
            path = "/v1/completions"
        else:
            body["messages"] = [{"role": "user", "content": text + "\n\nSummarise this passage."}]
            path = "/v1/chat/completions"
        if xargs:
            body["vllm_xargs"] = xargs
        return {"policy": policy, "path": path, "body": body, "stream": rng.random() < 0.5, "leave": rng.random() < 0.1}

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(base_url=self.base_url, timeout=600) as http:
            while not self.stop.is_set():
                req = self.request(rng)
                try:
                    outcome = self.send(http, req)
                except httpx.HTTPError as exc:
                    outcome = f"error: {exc!r}"
                with self.lock:
                    self.counts[req["policy"], outcome.split(":")[0]] += 1
                    if outcome.startswith("error"):
                        self.errors.append(f"{req['policy']} {req['path']}: {outcome}")

    @staticmethod
    def send(http: httpx.Client, req: dict) -> str:
        body = dict(req["body"], stream=req["stream"] or req["leave"])
        if not body["stream"]:
            resp = http.post(req["path"], json=body)
            return "ok" if resp.status_code == 200 else f"error: {resp.status_code} {resp.text[:200]}"
        with http.stream("POST", req["path"], json=body) as resp:
            if resp.status_code != 200:
                return f"error: {resp.status_code}"
            for i, line in enumerate(resp.iter_lines()):
                if req["leave"] and i >= 4:
                    return "left"  # the client goes away mid-stream; the server must free its KV
                if line.startswith('data: {"error'):
                    return f"error: {line[:200]}"
        return "ok"


def sample(t0: float, roles: dict[str, psutil.Process], client: httpx.Client, load: Load) -> dict:
    row = {"t_min": round((time.monotonic() - t0) / 60, 3)}
    for role in ROLES:
        proc = roles.get(role)
        row[f"rss_mib_{role}"] = round(proc.memory_info().rss / 2**20, 1) if proc else None
    m = server_metrics(client)
    row["kv_usage"] = m.get("vllm:kv_cache_usage_perc")  # vLLM's: also without H2O
    row["kv_free_blocks"] = m.get("h2o_vllm:kv_free_blocks")
    row["kv_total_blocks"] = m.get("h2o_vllm:kv_total_blocks")
    row["running"] = m.get("vllm:num_requests_running", 0.0)
    with load.lock:
        row["requests_done"] = sum(load.counts.values())
        row["errors"] = len(load.errors)
    return row


def pool_full(row: dict) -> bool:
    if row["kv_total_blocks"] is not None:
        return row["kv_free_blocks"] == row["kv_total_blocks"]
    return row["kv_usage"] == 0.0  # vanilla vLLM (--no-h2o): its own usage gauge


def growth(samples: list[dict], role: str, warmup: float, window: float) -> dict:
    """Mean RSS over [warmup, warmup + window) against the last ``window`` minutes."""
    key = f"rss_mib_{role}"
    end = samples[-1]["t_min"]
    early = [s[key] for s in samples if warmup <= s["t_min"] < warmup + window and s[key] is not None]
    late = [s[key] for s in samples if s["t_min"] >= end - window and s[key] is not None]
    if not early or not late:
        return {"early_mib": None, "late_mib": None, "growth": None}
    a, b = sum(early) / len(early), sum(late) / len(late)
    return {"early_mib": round(a, 1), "late_mib": round(b, 1), "growth": round(b / a - 1, 4)}


def plot(samples: list[dict], verdict: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    t = [s["t_min"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for role in ROLES:
        ax1.plot(t, [s[f"rss_mib_{role}"] for s in samples], label=role.replace("_", " "))
    ax1.axvspan(verdict["warmup_min"], verdict["warmup_min"] + verdict["window_min"], color="0.9", label="compared")
    ax1.axvspan(t[-1] - verdict["window_min"], t[-1], color="0.9")
    ax1.set_ylabel("resident memory (MiB)")
    ax1.set_title(
        f"Soak: {verdict['requests']} mixed requests, {verdict['errors']} errors; "
        + ", ".join(f"{r.replace('_', ' ')} {verdict['growth'][r]['growth']:+.1%}" for r in ROLES)
    )
    ax1.legend(loc="center right")
    ax2.plot(t, [100 * (s["kv_usage"] or 0.0) for s in samples], label="KV pool in use (vLLM's gauge)")
    ax2.set_ylabel("KV pool in use (%)")
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("minutes")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes before memory is compared")
    parser.add_argument("--window", type=float, default=5.0, help="minutes averaged at each end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/soak"))
    parser.add_argument("--serve-args", default="", help="more h2o-vllm serve arguments")
    parser.add_argument(
        "--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="the mix (--no-h2o: full)"
    )
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="the server's environment")
    args = parser.parse_args(argv)
    if args.minutes < args.warmup + 2 * args.window:
        parser.error("--minutes must cover --warmup plus two --window")
    run = Run.start(__file__, argv)
    from h2o_vllm.datasets import essays_text

    args.out.mkdir(parents=True, exist_ok=True)
    words = essays_text().split()
    env = dict(item.split("=", 1) for item in args.env)
    server = ServerProcess(args.serve_args.split(), env=env, log_path=args.out / "server.log")
    print(f"[soak] starting {' '.join(server.command)}", flush=True)
    server.start()
    samples: list[dict] = []
    try:
        roles = process_roles(server.proc.pid)
        print(f"[soak] processes: { {r: p.pid for r, p in roles.items()} }", flush=True)
        load = Load(server.base_url, words, args.concurrency, args.seed, args.policies)
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            t0 = time.monotonic()
            load.start()
            while time.monotonic() - t0 < args.minutes * 60:
                samples.append(sample(t0, roles, client, load))
                s = samples[-1]
                print(
                    f"[soak] {s['t_min']:6.1f} min  done {s['requests_done']:5d}  errors {s['errors']}  "
                    f"running {s['running']:.0f}  free {s['kv_free_blocks']}/{s['kv_total_blocks']}  "
                    f"usage {s['kv_usage']:.3f}  " + "  ".join(f"{r} {s[f'rss_mib_{r}']} MiB" for r in ROLES),
                    flush=True,
                )
                time.sleep(args.interval)
            print("[soak] stopping the clients", flush=True)
            load.finish()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                final = sample(t0, roles, client, load)
                if final["running"] == 0 and pool_full(final):
                    break
                time.sleep(1)
            samples.append(final)
        server.proc.send_signal(signal.SIGTERM)
        exit_code = server.proc.wait(120)
    finally:
        server.stop()
    verdict = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "warmup_min": args.warmup,
        "window_min": args.window,
        "requests": samples[-1]["requests_done"],
        "errors": samples[-1]["errors"],
        "outcomes": {f"{p} {o}": n for (p, o), n in sorted(load.counts.items())},
        "error_examples": load.errors[:10],
        "pool_full_at_end": pool_full(samples[-1]),
        "exit_code_after_sigterm": exit_code,
        "growth": {r: growth(samples[:-1], r, args.warmup, args.window) for r in ROLES},
    }
    verdict["memory_flat"] = all(
        g["growth"] is not None and g["growth"] < GROWTH_LIMIT for g in verdict["growth"].values()
    )
    verdict["passed"] = (
        verdict["memory_flat"] and verdict["errors"] == 0 and verdict["pool_full_at_end"] and exit_code == 0
    )
    rows = [
        f"| {r.replace('_', ' ')} | {g['early_mib']} | {g['late_mib']} | {g['growth']:+.1%} |"
        for r, g in verdict["growth"].items()
    ]
    body = (
        f"{verdict['requests']} requests in {args.minutes:g} min at concurrency {args.concurrency}, "
        f"{verdict['errors']} errors; pool full at the end: {verdict['pool_full_at_end']}; "
        f"exit code after SIGTERM: {exit_code}.\n\n"
        f"| process | RSS, minutes {args.warmup:g}-{args.warmup + args.window:g} (MiB) | "
        f"RSS, last {args.window:g} min (MiB) | growth |\n|---|---|---|---|\n" + "\n".join(rows)
    )
    data = {"verdict": verdict, "samples": samples}
    run.write(args.out, "soak", data, body, plot=lambda png: plot(samples, verdict, png))
    print(json.dumps(verdict, indent=1), flush=True)
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
