"""The RULER-style tasks' results: a mean per task with its 95% interval, and each configuration
against the full cache on the same cases (paired), so that "worse" or "the same" is read off
an interval, not off two means.

Per configuration (``results[name]["ruler"]``):

    tasks      {task: Interval as a dict}, over every length
    by_length  {"task length": Interval as a dict}
    overall    Interval over every case (tasks weigh by their cases)
    vs_full    {task: PairedDifference as a dict}, this configuration minus the full cache
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


def score(items, answers, config_names: list[str]) -> dict[str, dict]:
    """{config name: its RULER results} (see the module docstring); {} when no RULER case ran."""
    cases = [i for i in items if i.scenario == "ruler"]
    if not cases:
        return {}
    task_of = {i.key: i.meta["task"] for i in cases}
    group_of = {i.key: i.group for i in cases}
    scores = {name: case_scores(cases, answers, name) for name in config_names}
    full = scores.get("full", {})
    out = {}
    for name, got in scores.items():
        if not got:
            continue
        by_task, by_group = defaultdict(list), defaultdict(list)
        for key, value in got.items():
            by_task[task_of[key]].append(key)
            by_group[group_of[key]].append(value)
        vs_full = {}
        if name != "full":
            for task, keys in by_task.items():
                shared = [k for k in keys if k in full]
                if shared:
                    diff = intervals.paired_difference([got[k] for k in shared], [full[k] for k in shared])
                    vs_full[task] = _as_dict(diff)
        out[name] = {
            "tasks": {t: _as_dict(intervals.mean_interval([got[k] for k in keys])) for t, keys in by_task.items()},
            "by_length": {g: _as_dict(intervals.mean_interval(v)) for g, v in by_group.items()},
            "overall": _as_dict(intervals.mean_interval(list(got.values()))),
            "vs_full": vs_full,
            "cases": got,
        }
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
    compared = {name: r for name, r in results.items() if r["vs_full"]}
    if compared:
        head = "| configuration | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks) + "\n"
        rows = [
            f"| {name} | " + " | ".join(_diff_cell(r["vs_full"].get(t)) for t in tasks) + " |"
            for name, r in compared.items()
        ]
        out.append(
            "**RULER-style tasks against the full cache on the same cases: difference in points "
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
