"""Where a pass key is lost: before the question is seen, when the prompt is compressed, or while answering.

Runs the RULER-style ``niah_number`` cases of ``h2o-vllm eval`` (the same seed gives the same
cases, token for token) through the in-process engine as ``h2o-vllm serve`` runs them (bf16,
eager, prefill chunks of ``--chunk`` tokens), one configuration after another, and reads from
the scheduler when each block was evicted: after a prefill chunk that does not reach the
prompt's end, after the one that does, or while generating. Each case and configuration ends in:

- ``lost before the question``: a token of the needle's value (the 7-digit number) was evicted
  after a chunk short of the prompt's end, so no row of the question ranked it (what
  ``chunked`` and ``staged`` prefill risk);
- ``lost at compression``: evicted after the chunk that ends the prompt;
- ``lost while answering``: evicted while the answer was generated;
- ``kept``: resident to the end,

and ``found`` says whether the greedy answer holds the value (kept does not imply found, nor
lost not found: a model may guess, or miss a value it still holds).

    python benchmarks/needle_survival.py --length 4096 --samples 34 --seed 1 \\
        --configs h2o_20%_window8_max h2o_20%_window8_max_chunked h2o_20%_window8_max_staged2

Results: OUT/NAME.json (every case), OUT/NAME.md (the table), OUT/NAME.png (stacked bars);
OUT defaults to results/ruler/needle-survival, NAME to the model's short name and length.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from inprocess import engine_config
from report import Run, pyplot

OUTCOMES = ("kept", "lost while answering", "lost at compression", "lost before the question")


def needle_tokens(tokenizer, prompt: str, value: str) -> tuple[list[int], list[int]]:
    """The prompt's token ids (as the server tokenizes it) and the positions of the tokens that spell ``value``."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    start = prompt.index(f" is: {value}.") + len(" is: ")
    end = start + len(value)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    if not span:
        raise ValueError(f"no token of the prompt spells {value!r}")
    return enc["input_ids"], span


def outcome(evictions: list[tuple[int, list[int]]], prompt_tokens: int, needle_blocks: set[int]) -> str:
    """Where the needle went, from ``(tokens computed when evicted, blocks)`` in order."""
    for computed, blocks in evictions:
        if needle_blocks & set(blocks):
            if computed < prompt_tokens:
                return "lost before the question"
            return "lost at compression" if computed == prompt_tokens else "lost while answering"
    return "kept"


def run_config(model: str, name: str, prompts: list[list[int]], max_tokens: int, args) -> list[dict]:
    """Every prompt through a fresh engine with configuration ``name``: each one's greedy answer ids,
    and its evictions as ``(tokens it had computed, blocks)`` in the order the scheduler made them."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from h2o_vllm.engine.observe import StepObserver, inprocess_llm, scheduler_of

    events: dict[str, list] = {}

    def record(scheduler, output, before):
        plan = getattr(output, "h2o_plan", None)
        for req_id, blocks in plan.evictions.items() if plan else ():
            events.setdefault(req_id.split("-")[0], []).append((before[req_id][0], list(blocks)))

    kwargs = dict(
        dtype=args.dtype,
        max_model_len=max(len(p) for p in prompts) + max_tokens + 64,
        max_num_batched_tokens=args.chunk,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=1 << 30,
    )
    with inprocess_llm(model, **{**kwargs, **engine_config(name)}) as llm:
        observer = StepObserver(scheduler_of(llm), [record])
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        observer.close()
    return [
        {"answer_ids": list(o.outputs[0].token_ids), "evictions": events.get(o.request_id.split("-")[0], [])}
        for o in outputs
    ]


def plot_outcomes(path, summary: dict, configs: list[str], n: int) -> None:
    """Stacked bars: each configuration's cases by where the needle went, and the share found."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(configs) + 2.0))
    left = [0] * len(configs)
    colors = {"kept": "#4c9a2a", "lost while answering": "#b0b0b0", "lost at compression": "#e6a23c"}
    for where in OUTCOMES:
        widths = [summary[c]["counts"][where] for c in configs]
        ax.barh(configs, widths, left=left, label=where, color=colors.get(where, "#c0392b"))
        left = [a + b for a, b in zip(left, widths)]
    for y, c in enumerate(configs):
        ax.text(n + 0.5, y, f"found {100 * summary[c]['found']:.0f}%", va="center", fontsize=8)
    ax.set_xlim(0, n * 1.25)
    ax.set_xlabel(f"cases (of {n}): where the needle's value was evicted")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.4, -0.18), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def write_results(run, args, name: str, title: str, cases: list[dict], configs: list[str]) -> dict:
    """OUT/NAME.{json,md,png} for the configurations measured so far; returns their summary."""
    from h2o_vllm.evaluation.intervals import paired_difference, wilson

    n = len(cases)
    first = configs[0]
    lines = [
        f"| configuration | {' | '.join(OUTCOMES)} | found [95% CI] | found vs {first} | lost before the question, by needle depth (thirds) |",
        "|" + " --- |" * (len(OUTCOMES) + 4),
    ]
    summary = {}

    def by_depth(config: str) -> str:
        thirds = [
            [c for c in cases if t / 3 <= c["depth"] < (t + 1) / 3 or (t == 2 and c["depth"] == 1)] for t in range(3)
        ]
        return " / ".join(
            f"{sum(c[config]['outcome'] == OUTCOMES[-1] for c in third)} of {len(third)}" for third in thirds
        )

    for config in configs:
        counts = {o: sum(c[config]["outcome"] == o for c in cases) for o in OUTCOMES}
        found = [c[config]["found"] for c in cases]
        ci = wilson(int(sum(found)), n)
        diff = paired_difference(found, [c[first]["found"] for c in cases])
        summary[config] = {"counts": counts, "found": sum(found) / n, "found_ci": [ci.low, ci.high]}
        vs = "" if config == first else f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
        lines.append(
            f"| {config} | "
            + " | ".join(f"{counts[o]}" for o in OUTCOMES)
            + f" | {100 * sum(found) / n:.1f}% [{100 * ci.low:.1f}, {100 * ci.high:.1f}] | {vs} | "
            + f"{by_depth(config)} |"
        )
    body = (
        f"{n} `niah_number` cases of {args.length} tokens (seed {args.seed}), {title} in {args.dtype} "
        f"in the engine, prefill chunks of {args.chunk} tokens; cases by where the needle's value was evicted, "
        "and answers that hold the value.\n\n" + "\n".join(lines) + "\n"
    )
    print(body, flush=True)

    def plot(out_png):
        plot_outcomes(out_png, summary, configs, n)

    kept = [{k: v for k, v in case.items() if k != "prompt"} for case in cases]
    run.write(args.out, name, {"summary": summary, "cases": kept}, body, plot=plot)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model h2o-vllm builds (default: the default model)")
    parser.add_argument("--configs", nargs="+", required=True, help="configuration names (h2o_vllm.names)")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens per case")
    parser.add_argument("--samples", type=int, default=34)
    parser.add_argument("--seed", type=int, default=1, help="the RULER seed (h2o-vllm eval --ruler-seed)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (the server's --max-num-batched-tokens)")
    parser.add_argument("--dtype", default="bfloat16", help="the model's dtype (the server's default: bfloat16)")
    parser.add_argument("--out", type=Path, default=Path("results/ruler/needle-survival"))
    parser.add_argument("--name", help="file name in OUT (default: MODEL-LENGTH)")
    args = parser.parse_args(argv)
    run = Run.start(__file__, argv)

    from transformers import AutoTokenizer

    from h2o_vllm import assets
    from h2o_vllm.datasets import essays_text
    from h2o_vllm.evaluation.ruler import case_score, ruler_items
    from h2o_vllm.profiles import ENGINE_BLOCK_SIZE

    spec = assets.model_spec(args.model)
    model = str(assets.prepare_model(spec, log=lambda *_: None).path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    items = ruler_items(tokenizer, essays_text(), ["niah_number"], [args.length], args.samples, args.seed)
    cases = []
    for item in items:
        value = item.meta["expected"][0]
        prompt_ids, span = needle_tokens(tokenizer, item.prompt, value)
        cases.append(
            {
                "key": item.key,
                "value": value,
                "depth": item.meta["depths"][0],
                "prompt": prompt_ids,
                "needle_blocks": sorted({p // ENGINE_BLOCK_SIZE for p in span}),
            }
        )
    max_tokens = items[0].max_tokens
    name = args.name or f"{spec.name}-{args.length}"
    t0 = time.perf_counter()
    for i, config in enumerate(args.configs):
        print(f"[{config}] {len(cases)} prompts of {args.length} tokens ...", flush=True)
        runs = run_config(model, config, [c["prompt"] for c in cases], max_tokens, args)
        for case, result in zip(cases, runs):
            text = tokenizer.decode(result["answer_ids"], skip_special_tokens=True)
            where = outcome(result["evictions"], len(case["prompt"]), set(case["needle_blocks"]))
            case[config] = {"outcome": where, "answer": text, "found": case_score(text, [case["value"]])}
        counts = {o: sum(c[config]["outcome"] == o for c in cases) for o in OUTCOMES}
        print(
            f"    {counts}, found {sum(c[config]['found'] for c in cases):.0f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        # Written after every configuration: a long run stopped early keeps what it measured.
        summary = write_results(run, args, name, spec.title, cases, args.configs[: i + 1])
    print(json.dumps({k: v["counts"] for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
