"""Merge ``h2o-vllm eval`` runs per model, measure their run-to-run noise, and compare configurations.

    python benchmarks/eval_compare.py results/eval-qwen-a results/eval-qwen-b ... \\
        --baseline h2o --candidates h2o_window8 h2o_window8_max keynorm --out results/defaults

Each run is a folder with the ``eval.json`` that ``h2o-vllm eval`` wrote. Runs are grouped by
the model they evaluated. A configuration (family and budget) evaluated in several runs of one
model shows the mean of its runs, and its runs' spread is the noise: for each metric, the
largest difference between two runs of one configuration, over every configuration run more
than once (the full cache included). A candidate is *better* or *worse* than the baseline on a
metric and budget when the difference is larger than that noise, else *within noise*.

Prefix caching (vLLM's default) changes what H2O scoring every prompt row decides: a request
that takes H prompt tokens from the cache scores only the rows after them, as with a prompt
window of N - H rows (see ``Footprint.max_prefix_hit``), and an evaluation runs every
prompt once per configuration, so most prompts hit. Such configurations are taken only from
runs whose server had prefix caching off (``--serve-args "... --no-enable-prefix-caching"``);
every other configuration decides the same with and without hits and is taken from any run.

Writes OUT/compare.md (tables per model, the noise, the verdicts) and OUT/compare.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

from report import Run

# (metric in eval.json, label, higher is better)
METRICS = [
    ("needle_accuracy", "needle: pass keys found (%)", 1),
    ("fidelity_rouge_l", "fidelity: ROUGE-L against the full cache", 3),
    ("fidelity_matched_tokens", "fidelity: tokens equal to the full cache's before the first divergence", 1),
    ("summary_rouge_l", "summary: ROUGE-L against the full cache's summary", 3),
]


def load_runs(folders: list[Path]) -> dict[str, list[dict]]:
    """{model: [eval.json of each run]}."""
    runs = defaultdict(list)
    for folder in folders:
        data = json.loads((folder / "eval.json").read_text())
        data["folder"] = str(folder)
        runs[data["settings"]["model"] or "default model"].append(data)
    return dict(runs)


def budget_label(entry: dict) -> str:
    if entry["budget"] is None:
        return "all"
    return f"{entry['budget']:.0%}" if entry["budget_tokens"] is None else str(entry["budget_tokens"])


def prefix_caching_on(run: dict) -> bool:
    """Whether the run's server cached prefixes (a server the run did not start: assume it did)."""
    settings = run["settings"]
    return settings.get("base_url") is not None or "--no-enable-prefix-caching" not in settings.get("serve_args", "")


def hits_change_decisions(family: str) -> bool:
    """Whether a prefix-cache hit changes what ``family`` decides: H2O scoring every prompt row."""
    from h2o_vllm.evaluation.configs import EvalConfig

    if family == "full":
        return False
    config = EvalConfig.of(family, 0.5).named.config
    return config.needs_scores and config.prompt_window is None


def merge(runs: list[dict]) -> tuple[dict, dict]:
    """({(family, budget): {metric: [values, one per run]}}, {metric: noise})."""
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for entry in run["results"].values():
            if prefix_caching_on(run) and hits_change_decisions(entry["policy"]):
                continue
            key = (entry["policy"], budget_label(entry))
            for metric, _, _ in METRICS:
                value = entry.get(metric)
                if value is not None:
                    values[key][metric].append(float(value))
    noise = {}
    for metric, _, _ in METRICS:
        spreads = [
            abs(a - b)
            for per_metric in values.values()
            for a, b in itertools.combinations(per_metric.get(metric, []), 2)
        ]
        noise[metric] = {"noise": max(spreads) if spreads else None, "pairs": len(spreads)}
    return values, noise


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def verdict(diff: float, noise: float | None) -> str:
    if noise is None:
        return "no noise measured"
    if diff > noise:
        return "better"
    if diff < -noise:
        return "worse"
    return "within noise"


def compare(values, noise, baseline: str, candidates: list[str]) -> list[dict]:
    rows = []
    budgets = sorted({b for (f, b) in values if f == baseline}, key=lambda b: float(b.rstrip("%")))
    for candidate in candidates:
        for metric, _, _ in METRICS:
            for budget in budgets:
                base = mean(values.get((baseline, budget), {}).get(metric, []))
                cand = mean(values.get((candidate, budget), {}).get(metric, []))
                if base is None or cand is None:
                    continue
                diff = cand - base
                rows.append(
                    dict(
                        candidate=candidate,
                        metric=metric,
                        budget=budget,
                        baseline=base,
                        value=cand,
                        diff=diff,
                        noise=noise[metric]["noise"],
                        verdict=verdict(diff, noise[metric]["noise"]),
                    )
                )
    return rows


def fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(model: str, runs: list[dict], values, noise, rows, baseline: str) -> str:
    lines = [f"## {model}", "", "Runs: " + ", ".join(f"`{r['folder']}`" for r in runs), ""]
    families = list(dict.fromkeys(f for (f, _) in values))
    budgets = sorted({b for (_, b) in values if b != "all"}, key=lambda b: float(b.rstrip("%")))
    for metric, label, digits in METRICS:
        lines += [f"**{label}** (mean over runs; runs in brackets where more than one)", ""]
        lines += ["| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        for family in families:
            cells = []
            for budget in budgets if family != "full" else ["all"] * len(budgets):
                xs = values.get((family, budget), {}).get(metric, [])
                cell = fmt(mean(xs), digits if digits > 1 else 1)
                if len(xs) > 1:
                    cell += f" ({', '.join(fmt(x, digits if digits > 1 else 1) for x in xs)})"
                cells.append(cell)
            if family == "full" and metric != "needle_accuracy":
                continue  # the reference of the other metrics
            lines.append(f"| {family if family != 'full' else 'full cache'} | " + " | ".join(cells) + " |")
        n = noise[metric]
        lines += [
            "",
            f"Noise: {fmt(n['noise'], digits if digits > 1 else 1)} (largest difference between two runs of one "
            f"configuration, over {n['pairs']} pairs)",
            "",
        ]
    lines += [f"**Against `{baseline}`** (difference, and whether it exceeds the noise)", ""]
    lines += [
        "| candidate | metric | budget | baseline | candidate | difference | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        digits = dict((m, d) for m, _, d in METRICS)[r["metric"]]
        digits = digits if digits > 1 else 1
        lines.append(
            f"| {r['candidate']} | {r['metric']} | {r['budget']} | {fmt(r['baseline'], digits)} | "
            f"{fmt(r['value'], digits)} | {r['diff']:+.{digits}f} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="folders of h2o-vllm eval runs")
    p.add_argument("--baseline", default="h2o", help="the family the candidates are compared with")
    p.add_argument("--candidates", nargs="+", default=["h2o_window8", "h2o_window8_max", "keynorm"])
    p.add_argument("--out", type=Path, default=Path("results/defaults"))
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "eval.json").is_file()]
    if missing:
        print(f"eval_compare.py: no eval.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    run = Run.start(__file__, argv)
    report, summary = [], {}
    for model, runs in load_runs(args.runs).items():
        values, noise = merge(runs)
        rows = compare(values, noise, args.baseline, args.candidates)
        report.append(markdown(model, runs, values, noise, rows, args.baseline))
        summary[model] = {
            "runs": [r["folder"] for r in runs],
            "noise": noise,
            "values": {f"{f} {b}": dict(v) for (f, b), v in values.items()},
            "comparison": rows,
        }
    print(run.write(args.out, "compare", {"models": summary}, "\n".join(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
