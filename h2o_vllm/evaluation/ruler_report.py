"""The RULER-style tasks' results: a mean per task with its 95% interval, and each configuration
against the full cache on the same cases (paired), so that "worse" or "the same" is read off
an interval, not off two means.

Per configuration (``results[name]["ruler"]``):

    tasks      {task: Interval as a dict}, over every length
    by_length  {"task length": Interval as a dict}
    overall    Interval over every case (tasks weigh by their cases)
    vs_full    {task or "all": PairedDifference as a dict}, this configuration minus the full cache
    vs_streaming  the same against StreamingLLM at the same budget and prefill (when it ran; the
               name under "streaming"), the baseline an evicting policy must beat
    cases      {case key: score}, for other paired comparisons later
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from h2o_vllm.evaluation import intervals
from h2o_vllm.evaluation.ruler import TASKS, case_score


def case_scores(items, answers, config_name: str) -> dict[str, float]:
    """{case key: score} of one configuration's RULER answers (a failed request scores 0)."""
    by_key = {a.key: a for a in answers if a.config == config_name and a.scenario == "ruler"}
    return {i.key: case_score(by_key[i.key].text, i.meta["expected"]) for i in items if i.key in by_key}


def _as_dict(value) -> dict:
    return dataclasses.asdict(value)


def _paired(got: dict, base: dict, by_task: dict) -> dict:
    """{task: PairedDifference as a dict, "all": over every task's cases} of ``got`` minus ``base``
    on the cases both answered."""
    out = {}
    for task, keys in by_task.items():
        shared = [k for k in keys if k in base]
        if shared:
            out[task] = _as_dict(intervals.paired_difference([got[k] for k in shared], [base[k] for k in shared]))
    shared = [k for k in got if k in base]
    if len(by_task) > 1 and shared:
        out["all"] = _as_dict(intervals.paired_difference([got[k] for k in shared], [base[k] for k in shared]))
    return out


def score(items, answers, config_names: list[str], streaming_of: dict[str, str] | None = None) -> dict[str, dict]:
    """{config name: its RULER results} (see the module docstring); {} when no RULER case ran.
    ``streaming_of`` names each configuration's StreamingLLM counterpart, when it ran."""
    cases = [i for i in items if i.scenario == "ruler"]
    if not cases:
        return {}
    streaming_of = streaming_of or {}
    task_of = {i.key: i.meta["task"] for i in cases}
    group_of = {i.key: i.group for i in cases}
    scores = {name: case_scores(cases, answers, name) for name in config_names}
    out = {}
    for name, got in scores.items():
        if not got:
            continue
        by_task, by_group = defaultdict(list), defaultdict(list)
        for key, value in got.items():
            by_task[task_of[key]].append(key)
            by_group[group_of[key]].append(value)
        out[name] = {
            "tasks": {t: _as_dict(intervals.mean_interval([got[k] for k in keys])) for t, keys in by_task.items()},
            "by_length": {g: _as_dict(intervals.mean_interval(v)) for g, v in by_group.items()},
            "overall": _as_dict(intervals.mean_interval(list(got.values()))),
            "vs_full": {} if name == "full" else _paired(got, scores.get("full", {}), by_task),
            "cases": got,
        }
        baseline = streaming_of.get(name)
        if baseline and scores.get(baseline):
            out[name]["streaming"] = baseline
            out[name]["vs_streaming"] = _paired(got, scores[baseline], by_task)
    return out


def _tasks(results: dict) -> list[str]:
    present = {t for r in results.values() for t in r["tasks"]}
    return [t for t in TASKS if t in present]


def _cell(d: dict | None) -> str:
    if d is None:
        return "n/a"
    return f"{100 * d['estimate']:.1f} [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def _diff_cell(d: dict | None) -> str:
    if d is None:
        return "n/a"
    mark = "" if d["low"] <= 0 <= d["high"] else " *"
    return f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark}"


def markdown(results: dict) -> str:
    """Two tables: each task's mean with its interval, and each configuration minus the full cache."""
    if not results:
        return ""
    tasks = _tasks(results)
    n = {t: max(r["tasks"][t]["n"] for r in results.values() if t in r["tasks"]) for t in tasks}
    head = "| configuration | " + " | ".join(f"{t} (n={n[t]})" for t in tasks) + " | all |\n"
    head += "|---|" + "---|" * (len(tasks) + 1) + "\n"
    rows = [
        f"| {name} | " + " | ".join(_cell(r["tasks"].get(t)) for t in tasks) + f" | {_cell(r['overall'])} |"
        for name, r in results.items()
    ]
    out = [
        "**RULER-style tasks: % of expected strings found, mean [95% interval]** (Wilson for 0/1 "
        "cases, else bootstrap)\n\n" + head + "\n".join(rows) + "\n"
    ]
    for field, title in (
        ("vs_full", "against the full cache"),
        ("vs_streaming", "against StreamingLLM at the same budget"),
    ):
        compared = {name: r[field] for name, r in results.items() if r.get(field)}
        if not compared:
            continue
        columns = tasks + (["all"] if any("all" in d for d in compared.values()) else [])
        head = "| configuration | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
        rows = [
            f"| {name} | " + " | ".join(_diff_cell(d.get(t)) for t in columns) + " |" for name, d in compared.items()
        ]
        out.append(
            f"**RULER-style tasks {title} on the same cases: difference in points "
            "[95% paired bootstrap interval]**; * where the interval excludes 0\n\n" + head + "\n".join(rows) + "\n"
        )
    return "\n".join(out)


def plot(results: dict, path: Path) -> Path | None:
    """Each task's mean with its interval, a group of bars per task, a bar per configuration."""
    if not results:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = _tasks(results)
    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) + 2), 3.8))
    for k, name in enumerate(names):
        cells = [results[name]["tasks"].get(t) for t in tasks]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(tasks))]
        means = [100 * c["estimate"] if c else float("nan") for c in cells]
        errors = [
            [100 * (c["estimate"] - c["low"]) if c else 0 for c in cells],
            [100 * (c["high"] - c["estimate"]) if c else 0 for c in cells],
        ]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, fontsize=8)
    ax.set_ylabel("% of expected strings found")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("RULER-style tasks, 95% intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
