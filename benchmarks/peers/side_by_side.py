"""h2o-vllm and OpenVINO GenAI on load.py kv's workload, in one table and one plot.

    python benchmarks/peers/side_by_side.py OURS.json THEIRS.json [--out DIR]

OURS.json is what ``python benchmarks/load.py kv`` wrote (h2o-vllm servers over HTTP), THEIRS.json
what ``python benchmarks/peers/openvino.py`` wrote (OpenVINO GenAI's pipeline in process), made one
after the other on the same machine. Writes DIR/side-by-side.{json,md,png} (default DIR: the folder
of THEIRS.json): every row of both, each against its own engine's full cache ("x vanilla": h2o-vllm
rows against the vanilla row with the same ``+`` suffixes) and against OpenVINO's eviction, with
the commit and CPU of each run. Refuses runs of different workloads or CPUs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: report.py

from report import Run, cpu_summary, git_commit, pyplot  # noqa: E402

OV_PREFIX = "openvino:"
WORKLOAD_KEYS = ("num_prompts", "input_len", "output_len", "pool_blocks")


def workload(ours: dict, theirs: dict) -> dict:
    """The workload both ran; SystemExit where they differ (prompts, lengths, pool, CPU)."""
    settings = theirs["settings"]
    differ = [k for k in WORKLOAD_KEYS if ours.get(k) != settings.get(k)]
    if differ:
        raise SystemExit(
            f"not the same workload: {', '.join(f'{k} {ours.get(k)} != {settings.get(k)}' for k in differ)}"
        )
    if ours["cpu"] != theirs["cpu"]:
        raise SystemExit(f"not the same CPU: {ours['cpu']!r} and {theirs['cpu']!r}")
    return {k: settings[k] for k in WORKLOAD_KEYS}


def suffixes(config: str) -> str:
    """``+bind=0-1`` of ``h2o_20%+bind=0-1``: the server settings a row shares with its vanilla row."""
    return config[config.index("+") :] if "+" in config else ""


def rows_of(ours: dict, theirs: dict) -> list[dict]:
    """Every row of both runs: engine, configuration, tok/s against its own vanilla and OpenVINO's eviction."""
    ov = {r["config"].removeprefix(OV_PREFIX): r for r in theirs["rows"]}
    ov_evicting = next((r for name, r in ov.items() if name != "vanilla"), None)
    vanilla = {suffixes(r["config"]): r for r in ours["rows"] if r["config"].split("+")[0] == "vanilla"}
    out = []
    for engine, rows in (("OpenVINO GenAI", theirs["rows"]), ("h2o-vllm", ours["rows"])):
        for r in rows:
            own = ov.get("vanilla") if engine != "h2o-vllm" else vanilla.get(suffixes(r["config"]))
            out.append(
                {
                    "engine": engine,
                    "config": r["config"].removeprefix(OV_PREFIX),
                    "output_tok_s": r["output_tok_s"],
                    "x_vanilla": r["output_tok_s"] / own["output_tok_s"] if own else None,
                    "x_openvino_eviction": r["output_tok_s"] / ov_evicting["output_tok_s"] if ov_evicting else None,
                    "max_running": r["max_running"],
                    **{k: r.get(k) for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")},
                    "eviction": r.get("eviction"),
                }
            )
    return out


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| engine | config | output tok/s | x its vanilla | x OpenVINO eviction | max running "
        "| TTFT p50/p99 ms | TPOT p50/p99 ms |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['config']} | {r['output_tok_s']:.1f} | {_ratio(r['x_vanilla'])} "
            f"| {_ratio(r['x_openvino_eviction'])} | {r['max_running']} "
            f"| {r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], work: dict, cpu: str, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = ["tab:orange" if r["engine"] != "h2o-vllm" else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["output_tok_s"] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['engine']}: {r['config']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        ax.text(r["output_tok_s"], i, f" {r['output_tok_s']:.1f}", va="center", fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_title(
        f"{work['num_prompts']} x {work['input_len']} tokens, {work['output_len']} new, pool "
        f"{work['pool_blocks']} blocks of 32\n{cpu}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ours", type=Path, help="load.py kv's JSON")
    parser.add_argument("theirs", type=Path, help="peers/openvino.py's JSON")
    parser.add_argument("--out", type=Path, help="default: THEIRS.json's folder")
    args = parser.parse_args(argv)
    ours, theirs = (json.loads(p.read_text()) for p in (args.ours, args.theirs))
    work = workload(ours, theirs)
    rows = rows_of(ours, theirs)
    out = args.out or args.theirs.parent
    intro = (
        f"h2o-vllm (load.py kv: one `h2o-vllm serve` per row, `vllm bench serve` over loopback HTTP) and "
        f"OpenVINO GenAI {theirs['versions'].get('openvino-genai')} (ContinuousBatchingPipeline in process, "
        "token ids in and out) on the same workload and pool, one after the other on one machine. "
        f"{work['num_prompts']} prompts of {work['input_len']} random tokens, {work['output_len']} new, "
        f"greedy, EOS ignored, all at once; {work['pool_blocks']} KV blocks of 32 tokens."
    )
    records = [
        {k: ours[k] for k in ("command", "commit", "cpu")},
        {k: theirs[k] for k in ("command", "commit", "cpu")},
    ]
    command = ["python", "benchmarks/peers/side_by_side.py", *(sys.argv[1:] if argv is None else argv)]
    run = Run(shlex.join(command), git_commit(), cpu_summary())
    data = {"workload": work, "runs": records, "rows": rows}
    text = run.write(
        out, "side-by-side", data, intro + "\n\n" + table(rows), records=[run.record(), *records],
        plot=lambda path: plot(rows, work, ours["cpu"], path),
    )  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
