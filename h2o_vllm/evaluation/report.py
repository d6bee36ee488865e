"""Score the answers and lay them out HELM-style: one table per metric, policy by budget."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from h2o_vllm.evaluation import intervals, ruler_report
from h2o_vllm.evaluation.client import Answer
from h2o_vllm.evaluation.configs import EvalConfig
from h2o_vllm.evaluation.metrics import matched_prefix, passkey_found, rouge_l
from h2o_vllm.evaluation.scenarios import Item
from h2o_vllm.policy import Budget

# metric -> (title, scenario, format)
METRICS = {
    "needle_accuracy": ("needle: pass key found (%)", "needle", "{:.1f}"),
    "fidelity_matched_tokens": (
        "fidelity: tokens equal to the full cache before the first divergence (mean)",
        "fidelity",
        "{:.1f}",
    ),
    "fidelity_rouge_l": ("fidelity: ROUGE-L F1 against the full-cache continuation", "fidelity", "{:.3f}"),
    "summary_rouge_l": ("summary: ROUGE-L F1 against the full-cache summary", "summary", "{:.3f}"),
}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score(items: list[Item], answers: list[Answer], configs: list[EvalConfig], tokenizer) -> dict:
    """{config name: {metric: value, ...}}; fidelity and summary are scored against ``full``; the
    RULER-style tasks under ``"ruler"`` (:mod:`h2o_vllm.evaluation.ruler_report`)."""
    by_key = {(a.config, a.scenario, a.key): a for a in answers}
    reference = {(i.scenario, i.key): by_key.get(("full", i.scenario, i.key)) for i in items}
    results = {}
    for config in configs:
        found, by_length = [], defaultdict(list)
        tokens_matched, fidelity_rouge, summary_rouge = [], [], []
        cases = {"needle_accuracy": {}, "fidelity_rouge_l": {}, "summary_rouge_l": {}}  # per item, for pairing
        failed = 0
        for item in items:
            answer = by_key.get((config.name, item.scenario, item.key))
            if answer is None:
                continue
            failed += answer.error is not None
            if item.scenario == "ruler":
                continue  # scored by ruler_report below
            if item.scenario == "needle":
                hit = 100.0 * (answer.text is not None and passkey_found(answer.text, item.answer))
                found.append(hit)
                by_length[item.group].append(hit)
                cases["needle_accuracy"][item.key] = hit / 100
                continue
            ref = reference[(item.scenario, item.key)]
            if ref is None or ref.text is None:
                continue  # no reference to compare with: left out, counted in the reference's failures
            text = answer.text or ""
            if item.scenario == "fidelity":
                tokens_matched.append(matched_prefix(tokenizer(ref.text)["input_ids"], tokenizer(text)["input_ids"]))
                fidelity_rouge.append(rouge_l(text, ref.text))
                cases["fidelity_rouge_l"][item.key] = fidelity_rouge[-1]
            else:
                summary_rouge.append(rouge_l(text, ref.text))
                cases["summary_rouge_l"][item.key] = summary_rouge[-1]
        budget = config.budget  # None for the full cache
        results[config.name] = {
            "policy": config.policy,
            "budget": None if budget is None else budget.fraction,  # a fraction of the sequence, as before
            "budget_tokens": None if budget is None else budget.tokens,  # or a token count
            "failed": failed,
            "needle_accuracy": _mean(found),
            "needle_accuracy_by_length": {k: _mean(v) for k, v in by_length.items()},
            "fidelity_matched_tokens": _mean(tokens_matched),
            "fidelity_rouge_l": _mean(fidelity_rouge),
            "summary_rouge_l": _mean(summary_rouge),
            "samples": {"needle": len(found), "fidelity": len(tokens_matched), "summary": len(summary_rouge)},
            "intervals": {m: asdict(intervals.mean_interval(list(v.values()))) for m, v in cases.items() if v},
            "cases": {m: v for m, v in cases.items() if v},
        }
    for name, baseline in streaming_of(configs).items():
        ours, theirs = results[name]["cases"], results[baseline]["cases"]
        results[name]["streaming"] = baseline
        results[name]["vs_streaming"] = {
            metric: asdict(intervals.paired_difference([v[k] for k in shared], [theirs[metric][k] for k in shared]))
            for metric, v in ours.items()
            if (shared := [k for k in v if k in theirs.get(metric, {})])
        }
    for name, ruler in ruler_report.score(items, answers, [c.name for c in configs], streaming_of(configs)).items():
        results[name]["ruler"] = ruler
    return results


def streaming_of(configs: list[EvalConfig]) -> dict[str, str]:
    """{name: the StreamingLLM configuration at the same budget and prefill} for every other evicting
    configuration that has one among ``configs``."""
    streaming = {
        (c.budget, c.named.config.prefill): c.name
        for c in configs
        if c.budget is not None and c.policy.startswith("streaming")
    }
    return {
        c.name: streaming[(c.budget, c.named.config.prefill)]
        for c in configs
        if c.budget is not None
        and not c.policy.startswith("streaming")
        and (c.budget, c.named.config.prefill) in streaming
    }


def _grid(configs: list[EvalConfig]) -> tuple[list[Budget], list[str], dict[tuple[str, Budget], str]]:
    """Budgets (columns: fractions, then token counts), policy families (rows) and the configuration of each cell."""
    budgets = sorted(
        {c.budget for c in configs if c.budget is not None},
        key=lambda b: (b.tokens is not None, b.tokens or b.fraction),
    )
    policies = list(dict.fromkeys(c.policy for c in configs if c.policy != "full"))
    return budgets, policies, {(c.policy, c.budget): c.name for c in configs}


def budget_label(budget: Budget) -> str:
    """``20%`` or ``1024 tokens``: a column header."""
    return f"{budget.fraction * 100:g}%" if budget.fraction is not None else f"{budget.tokens} tokens"


def _cell(value, fmt: str, interval: dict | None = None, scale: float = 1.0) -> str:
    """``value``, and its 95% interval when there is one: ``"66.7 [35.4, 87.9]"``."""
    if value is None:
        return "n/a"
    if interval is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(scale * interval['low'])}, {fmt.format(scale * interval['high'])}]"


def _metric_cell(result: dict | None, metric: str, fmt: str) -> str:
    if not result:
        return "n/a"
    scale = 100.0 if metric == "needle_accuracy" else 1.0
    return _cell(result.get(metric), fmt, result.get("intervals", {}).get(metric), scale)


def markdown(results: dict, configs: list[EvalConfig]) -> str:
    budgets, policies, names = _grid(configs)
    head = "| policy | " + " | ".join(budget_label(b) for b in budgets) + " |\n|---|" + "---|" * len(budgets) + "\n"
    out = []
    for metric, (title, scenario, fmt) in METRICS.items():
        if not any(r["samples"][scenario] for r in results.values()):
            continue
        rows = []
        full = results.get("full")
        if full is not None and metric.startswith("needle"):
            rows.append("| full cache | " + " | ".join(_metric_cell(full, metric, fmt) for _ in budgets) + " |")
        for policy in policies:
            cells = [_metric_cell(results.get(names.get((policy, b))), metric, fmt) for b in budgets]
            rows.append(f"| {policy} | " + " | ".join(cells) + " |")
        note = {
            "fidelity": " (the full cache is the reference: all tokens equal, ROUGE-L 1)",
            "summary": " (the full cache is the reference: ROUGE-L 1)",
        }.get(scenario, "")
        if metric in INTERVAL_METRICS:
            note += " [95% Wilson interval]" if metric == "needle_accuracy" else " [95% bootstrap interval]"
        out.append(f"**{title}**{note}\n\n{head}" + "\n".join(rows) + "\n")
    compared = {name: r["vs_streaming"] for name, r in results.items() if r.get("vs_streaming")}
    if compared:
        columns = [m for m in INTERVAL_METRICS if any(m in d for d in compared.values())]
        rows = [
            f"| {name} | " + " | ".join(_difference_cell(d.get(m), m) for m in columns) + " |"
            for name, d in compared.items()
        ]
        out.append(
            "**Against StreamingLLM at the same budget, on the same prompts: difference [95% paired "
            "bootstrap interval]**; * where the interval excludes 0 (pass keys in points)\n\n| configuration | "
            + " | ".join(columns)
            + " |\n|---|"
            + "---|" * len(columns)
            + "\n"
            + "\n".join(rows)
            + "\n"
        )
    lengths = sorted({k for r in results.values() for k in r["needle_accuracy_by_length"]}, key=_length_key)
    if lengths:
        rows = [
            f"| {name} | " + " | ".join(_cell(r["needle_accuracy_by_length"].get(k), "{:.0f}") for k in lengths) + " |"
            for name, r in results.items()
        ]
        out.append(
            "**needle by context length (% found)**\n\n| configuration | "
            + " | ".join(lengths)
            + " |\n|---|"
            + "---|" * len(lengths)
            + "\n"
            + "\n".join(rows)
            + "\n"
        )
    ruler = ruler_report.markdown({name: r["ruler"] for name, r in results.items() if "ruler" in r})
    if ruler:
        out.append(ruler)
    failed = {name: r["failed"] for name, r in results.items() if r["failed"]}
    if failed:
        out.append("Failed requests (scored as misses): " + ", ".join(f"{k} {v}" for k, v in failed.items()) + "\n")
    return "\n".join(out)


INTERVAL_METRICS = ("needle_accuracy", "fidelity_rouge_l", "summary_rouge_l")


def _difference_cell(d: dict | None, metric: str) -> str:
    if d is None:
        return "n/a"
    scale, fmt = (100.0, "{:+.1f}") if metric == "needle_accuracy" else (1.0, "{:+.3f}")
    mark = "" if d["low"] <= 0 <= d["high"] else " *"
    bounds = ", ".join(fmt.format(scale * d[k]) for k in ("low", "high"))
    return f"{fmt.format(scale * d['estimate'])} [{bounds}]{mark}"


def _length_key(label: str) -> float:
    return float(label[:-1]) * 1024 if label.endswith("K") else float(label)


def plot(results: dict, configs: list[EvalConfig], path: Path) -> Path | None:
    """One panel per metric: the metric against the budget, a line per policy, the full cache dashed.

    Fractions alone are placed at their % of the sequence; with token budgets every budget
    is a labelled position, in the tables' order.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = [m for m, (_, s, _) in METRICS.items() if any(r["samples"][s] for r in results.values())]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    budgets, policies, names = _grid(configs)
    fractions = all(b.fraction is not None for b in budgets)
    xs = [b.fraction * 100 for b in budgets] if fractions else list(range(len(budgets)))
    for ax, metric in zip(axes[0], metrics):
        for policy in policies:
            ys = [results.get(names.get((policy, b)), {}).get(metric) for b in budgets]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=policy)
        full = results.get("full", {}).get(metric)
        if full is not None and metric.startswith("needle"):
            ax.axhline(full, linestyle="--", color="gray", label="full cache")
        ax.set_title(METRICS[metric][0].split(":")[0] + ": " + metric.split("_", 1)[1].replace("_", " "), fontsize=9)
        if fractions:
            ax.set_xlabel("KV budget (% of sequence)")
        else:
            ax.set_xticks(xs, [budget_label(b) for b in budgets], fontsize=8)
            ax.set_xlabel("KV budget")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save(
    out_dir: Path,
    command: str,
    settings: dict,
    items: list[Item],
    answers: list[Answer],
    results: dict,
    configs: list[EvalConfig],
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "answers": out_dir / "answers.jsonl"}
    paths["json"].write_text(json.dumps({"command": command, "settings": settings, "results": results}, indent=1))
    paths["md"].write_text(markdown(results, configs) + f"\nProduced by:\n\n    {command}\n")
    prompts = {(i.scenario, i.key): i for i in items}
    with paths["answers"].open("w") as f:
        for a in answers:
            item = prompts[(a.scenario, a.key)]
            expected = item.answer if item.answer is not None else item.meta.get("expected")
            f.write(json.dumps({**a.__dict__, "prompt_tokens": item.prompt_tokens, "expected": expected}) + "\n")
    png = plot(results, configs, out_dir / "eval.png")
    if png:
        paths["png"] = png
    ruler_png = ruler_report.plot({n: r["ruler"] for n, r in results.items() if "ruler" in r}, out_dir / "ruler.png")
    if ruler_png:
        paths["ruler_png"] = ruler_png
    return paths
