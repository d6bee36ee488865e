"""Pass keys through OpenVINO GenAI's eviction and h2o-vllm's, on the same RULER-style cases.

    python benchmarks/peers/openvino_ruler.py --h2o-vllm results/peers/ruler-openvino/h2o-vllm
    python benchmarks/peers/openvino_ruler.py --h2o-vllm results/peers/ruler-openvino/h2o-vllm --rescore

``--h2o-vllm DIR`` is an ``h2o-vllm eval --scenarios ruler`` run (its ``eval.json`` and
``answers.jsonl``). This script draws the same cases again (the run's tasks, lengths, samples and
seed, the default model's tokenizer, the packaged essays), checks that each prompt has the token
count the run recorded, and asks OpenVINO GenAI's continuous-batching pipeline the same questions:
greedy, at most the case's new tokens, stopped at the model's EOS as vLLM stops, the prompt sent as
the token ids vLLM's server makes of it (the model's tokenizer with its special tokens). Run with
the main environment's python; OpenVINO's environment and the exported model are
``openvino.py``'s (made there if missing: ``openvino.py --setup-only``).

Configurations (``--configs``): ``full`` and names OpenVINO can express (``h2o_20%``: every prompt
row scores, summed; ``h2o_20%_window8``: the last 8 prompt rows, SnapKV's window; see
``openvino.py``'s :func:`eviction_budget`). OpenVINO's budget is fixed per pipeline, so each
configuration runs one pipeline per context length, its budget what h2o-vllm keeps of that
length's sequence (prompt length + the case's new tokens) at the configuration's share. OpenVINO
evicts once the whole prompt is resident, h2o-vllm's ``whole`` prefill compresses once the prompt
is; both then evict while decoding. OpenVINO scores and evicts each layer on its own, h2o-vllm the
same blocks in every layer.

Writes ``OUT/ruler.{json,md,png}`` (OUT: ``--out``, default the h2o-vllm run's parent folder) and
OpenVINO's answers in ``OUT/openvino-answers.jsonl``, in ``h2o-vllm eval``'s format. Each rate
comes with its 95% interval (Wilson), each comparison of two configurations on the same cases with
its paired bootstrap interval and McNemar's exact p-value.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OV_PREFIX = "openvino:"
DEFAULT_CONFIGS = ("full", "h2o_20%_window8", "h2o_20%")
DEFAULT_AGAINST = ("h2o_20%_window8_max",)  # h2o-vllm's server default at 20%: max cannot run in OpenVINO
ANSWERS = "openvino-answers.jsonl"
MAX_NUM_BATCHED_TOKENS = 512  # the prefill chunk of the h2o-vllm run results/ruler describes


def log(message: str) -> None:
    print(f"[openvino-ruler] {message}", file=sys.stderr, flush=True)


def peer_module():
    """``openvino.py`` beside this file (its environment, export and pipeline), loaded under another
    name: ``openvino`` is OpenVINO's own package."""
    spec = importlib.util.spec_from_file_location("openvino_peer", HERE / "openvino.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--h2o-vllm", type=Path, help="an h2o-vllm eval run of RULER-style cases (eval.json, answers.jsonl)"
    )
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="default: %(default)s")
    parser.add_argument("--out", type=Path, help="default: the h2o-vllm run's parent folder")
    parser.add_argument("--threads", type=int, help="OpenVINO's INFERENCE_NUM_THREADS; default: the CPUs usable here")
    parser.add_argument("--kv-cache-precision", default="bf16", help="default: %(default)s (vLLM's cache is bf16)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-openvino")
    parser.add_argument("--ir-dir", type=Path, help="the exported model (default: openvino.py's)")
    parser.add_argument(
        "--timeout", type=int, default=3600, help="seconds for OpenVINO's whole run (default %(default)s)"
    )
    parser.add_argument(
        "--against",
        nargs="+",
        default=list(DEFAULT_AGAINST),
        help="h2o-vllm configurations every OpenVINO eviction is also compared with (default: %(default)s)",
    )
    parser.add_argument(
        "--rescore", action="store_true", help="score OpenVINO's answers saved in --out again; run nothing"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: answer JOB in OpenVINO's venv
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.h2o_vllm is None:
        parser.error("--h2o-vllm DIR is required (an h2o-vllm eval run of RULER-style cases)")
    if args.out is None:
        args.out = args.h2o_vllm.resolve().parent
    return args


# -- the cases -----------------------------------------------------------------------------


def saved_run(directory: Path) -> tuple[dict, list[dict]]:
    """(settings, answers) of an ``h2o-vllm eval`` run; ValueError unless it asked RULER-style cases."""
    settings = json.loads((directory / "eval.json").read_text())["settings"]
    if "ruler" not in settings.get("scenarios", []):
        raise ValueError(f"{directory} is not a run of RULER-style cases (scenarios: {settings.get('scenarios')})")
    answers = [json.loads(line) for line in (directory / "answers.jsonl").open()]
    return settings, [a for a in answers if a["scenario"] == "ruler"]


def draw_cases(settings: dict, tokenizer, corpus: str) -> list:
    from h2o_vllm.evaluation.ruler import ruler_items

    return ruler_items(
        tokenizer,
        corpus,
        settings["ruler_tasks"],
        settings["ruler_lengths"],
        settings["ruler_samples"],
        settings["ruler_seed"],
    )


def check_same_cases(items: list, answers: list[dict]) -> None:
    """ValueError unless ``answers`` are of exactly ``items``' cases, with the prompt lengths drawn here."""
    tokens = {i.key: i.prompt_tokens for i in items}
    recorded = {}
    for a in answers:
        recorded.setdefault(a["key"], a.get("prompt_tokens"))
    if set(recorded) != set(tokens):
        raise ValueError(f"the run's cases are not the ones drawn here: {len(recorded)} against {len(tokens)}")
    differ = [k for k, n in recorded.items() if n is not None and n != tokens[k]]
    if differ:
        raise ValueError(f"{len(differ)} prompts differ in length from the run's, e.g. {differ[0]}")


def openvino_runs(configs: list[str], items: list, budget_of) -> list[dict]:
    """One pipeline run per (configuration, context length): its cases and ``budget_of(name, length,
    new_tokens)`` (None for ``full``)."""
    by_length = defaultdict(list)
    for item in items:
        by_length[item.meta["length"]].append(item)
    runs = []
    for name in configs:
        for length, cases in sorted(by_length.items()):
            new_tokens = max(c.max_tokens for c in cases)
            runs.append(
                {
                    "config": name,
                    "length": length,
                    "eviction": None if name == "full" else budget_of(name, length, new_tokens),
                    "cases": [{"key": c.key, "max_tokens": c.max_tokens} for c in cases],
                }
            )
    return runs


def stop_tokens(model_dir: Path, tokenizer) -> list[int]:
    """The ids vLLM stops at: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} - {None}
    config = model_dir / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


# -- OpenVINO's answers (in its environment) ------------------------------------------------


def answer(job: dict) -> list[dict]:
    import openvino_genai as ov_genai

    peer = peer_module()
    out = []
    for run in job["runs"]:
        cases = run["cases"]
        ids = [job["prompts"][c["key"]] for c in cases]
        pool = sum(math.ceil((len(p) + c["max_tokens"]) / peer.BLOCK) + 1 for p, c in zip(ids, cases))
        pipe = peer.make_pipeline(job, run["eviction"], pool, len(cases))
        handles = []
        for i, (prompt, case) in enumerate(zip(ids, cases)):
            gen = ov_genai.GenerationConfig()
            gen.max_new_tokens = case["max_tokens"]
            gen.do_sample = False
            gen.eos_token_id = job["stop_token_ids"][0]
            gen.stop_token_ids = set(job["stop_token_ids"])
            handles.append(pipe.add_request(i, peer.token_tensor(prompt), gen))
        generated: list[list[int]] = [[] for _ in cases]
        t0 = time.perf_counter()
        while pipe.has_non_finished_requests():
            pipe.step()
            for i, handle in enumerate(handles):
                while handle.can_read():
                    for output in handle.read().values():
                        generated[i] += list(output.generated_ids)
        seconds = time.perf_counter() - t0
        statuses = [h.get_status().name for h in handles]
        log(
            f"{run['config']} at {run['length']}: {len(cases)} cases in {seconds:.1f} s ({', '.join(sorted(set(statuses)))})"
        )
        for case, tokens, status in zip(cases, generated, statuses):
            out.append({"config": run["config"], "key": case["key"], "ids": tokens, "status": status})
    return out


def worker(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    Path(job["result"]).write_text(json.dumps(answer(job)) + "\n")
    return 0


# -- the comparison -------------------------------------------------------------------------


def ov_answers(raw: list[dict], items: list, tokenizer, stops: list[int]) -> list[dict]:
    """OpenVINO's answers in ``h2o-vllm eval``'s format, decoded as vLLM decodes (special tokens skipped)."""
    by_key = {i.key: i for i in items}
    out = []
    for r in raw:
        item = by_key[r["key"]]
        ids = [t for t in r["ids"] if t not in stops]
        ok = r["status"] == "FINISHED"
        out.append(
            {
                "config": OV_PREFIX + r["config"],
                "scenario": "ruler",
                "key": r["key"],
                "text": tokenizer.decode(ids, skip_special_tokens=True) if ok else None,
                "error": None if ok else f"status {r['status']}",
                "completion_tokens": len(r["ids"]),
                "prompt_tokens": item.prompt_tokens,
                "expected": item.meta["expected"],
            }
        )
    return out


def case_scores(items: list, answers: list[dict]) -> dict[str, dict[str, float]]:
    """{configuration: {case key: score}} (RULER's string match; a failed request scores 0)."""
    from h2o_vllm.evaluation.ruler import case_score

    expected = {i.key: i.meta["expected"] for i in items}
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for a in answers:
        scores[a["config"]][a["key"]] = case_score(a["text"], expected[a["key"]])
    return dict(scores)


def compare(items: list, scores: dict[str, dict[str, float]], configs: list[str], against=DEFAULT_AGAINST) -> dict:
    """Each configuration's rate per engine, per length, and the paired differences that say something:
    OpenVINO minus h2o-vllm at the same configuration and at each of ``against`` (h2o-vllm's server
    default), each against its engine's full cache and against h2o-vllm's StreamingLLM at the same
    budget."""
    from dataclasses import asdict

    from h2o_vllm.evaluation import intervals

    keys = [i.key for i in items]
    length_of = {i.key: i.meta["length"] for i in items}
    names = [n for n in scores if not n.startswith(OV_PREFIX)] + [OV_PREFIX + c for c in configs]

    def rate(name: str, subset=None) -> dict:
        values = [scores[name][k] for k in keys if subset is None or length_of[k] == subset]
        return asdict(intervals.mean_interval(values))

    def paired(a: str, b: str) -> dict | None:
        if a not in scores or b not in scores:
            return None
        return asdict(intervals.paired_difference([scores[a][k] for k in keys], [scores[b][k] for k in keys]))

    lengths = sorted(set(length_of.values()))
    rates = {n: {"all": rate(n), **{str(length): rate(n, length) for length in lengths}} for n in names if n in scores}
    pairs = {}
    for name in configs:
        ov = OV_PREFIX + name
        pairs[f"{ov} - {name}"] = paired(ov, name)
        if name != "full":
            for ours in against:
                pairs[f"{ov} - {ours}"] = paired(ov, ours)
            pairs[f"{ov} - {OV_PREFIX}full"] = paired(ov, OV_PREFIX + "full")
            pairs[f"{name} - full"] = paired(name, "full")
            streaming = "streaming_" + name.split("_")[1]
            pairs[f"{ov} - {streaming}"] = paired(ov, streaming)
            pairs[f"{name} - {streaming}"] = paired(name, streaming)
    return {"lengths": lengths, "rates": rates, "pairs": {k: v for k, v in pairs.items() if v is not None}}


def _rate(d: dict | None) -> str:
    return "" if d is None else f"{100 * d['estimate']:.1f} [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def _diff(d: dict) -> str:
    mark = "" if d["low"] <= 0 <= d["high"] else " *"
    return (
        f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark} "
        f"| {d['a_only']}/{d['b_only']} | {d['p_value']:.3g}"
    )


def tables(result: dict, n: int) -> str:
    rates, lengths = result["rates"], result["lengths"]
    head = f"| configuration | engine | all (n={n}) | " + " | ".join(f"{length}" for length in lengths) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(lengths)]
    for name, r in rates.items():
        engine = "OpenVINO GenAI" if name.startswith(OV_PREFIX) else "h2o-vllm"
        cells = " | ".join(f"{100 * r[str(length)]['estimate']:.1f}" for length in lengths)
        lines.append(f"| {name.removeprefix(OV_PREFIX)} | {engine} | {_rate(r['all'])} | {cells} |")
    out = [
        f"**Cases answered, % [95% interval]**, and per context length (n={n // max(1, len(lengths))} each)\n\n"
        + "\n".join(lines)
    ]
    lines = ["| comparison (a - b) | points [95% paired interval] | a only / b only | McNemar p |", "|---|---|---|---|"]
    lines += [f"| {k} | {_diff(d)} |" for k, d in result["pairs"].items()]
    out.append("**On the same cases: difference in points**; * where the interval excludes 0\n\n" + "\n".join(lines))
    return "\n\n".join(out)


def plot(result: dict, configs: list[str], tasks: list[str], path: Path) -> None:
    sys.path.insert(0, str(HERE.parent))
    from report import pyplot

    plt = pyplot()
    if plt is None:
        return
    names = list(dict.fromkeys([*configs, *(n for n in result["rates"] if not n.startswith(OV_PREFIX))]))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.6))
    width = 0.38
    for k, (engine, prefix) in enumerate((("h2o-vllm", ""), ("OpenVINO GenAI", OV_PREFIX))):
        xs, means, errs = [], [], [[], []]
        for i, name in enumerate(names):
            d = result["rates"].get(prefix + name, {}).get("all")
            if d is None:
                continue
            xs.append(i + (k - 0.5) * width)
            means.append(100 * d["estimate"])
            errs[0].append(100 * (d["estimate"] - d["low"]))
            errs[1].append(100 * (d["high"] - d["estimate"]))
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=engine)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("% of cases answered")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{', '.join(tasks)}: both engines on the same cases, 95% intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the driver -----------------------------------------------------------------------------


def run_openvino(args, peer, items: list, tokenizer, model_dir: Path) -> tuple[list[dict], dict]:
    """OpenVINO's answers to ``items`` (in ``h2o-vllm eval``'s format) and how they were made."""
    from h2o_vllm.assets import DEFAULT_MODEL_NAME

    versions = peer.ensure_venv(args.venv)
    ir_dir = args.ir_dir or ROOT / "results" / "tmp" / "openvino" / f"{DEFAULT_MODEL_NAME}-fp16"
    peer.ensure_ir(args.venv, model_dir, ir_dir, versions)
    runs = openvino_runs(args.configs, items, peer.eviction_budget)
    for r in runs:
        log(
            f"{r['config']} at {r['length']} tokens: {len(r['cases'])} cases, eviction {peer.describe_eviction(r['eviction'])}"
        )
    work = ROOT / "results" / "tmp" / "openvino"
    work.mkdir(parents=True, exist_ok=True)
    stops = stop_tokens(model_dir, tokenizer)
    job = {
        "ir_dir": str(ir_dir),
        "prompts": {i.key: list(tokenizer(i.prompt)["input_ids"]) for i in items},
        "runs": runs,
        "stop_token_ids": stops,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        "kv_cache_precision": args.kv_cache_precision,
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "result": str(work / "ruler-result.json"),
    }
    job_path = work / "ruler-job.json"
    job_path.write_text(json.dumps(job) + "\n")
    Path(job["result"]).unlink(missing_ok=True)
    cmd = [str(peer.venv_python(args.venv)), str(Path(__file__).resolve()), "--worker", str(job_path)]
    log(f"answering in {args.venv}: {len(runs)} pipelines, {sum(len(r['cases']) for r in runs)} requests")
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=peer.offline_env(), timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"OpenVINO's run failed ({done.returncode}); its job: {job_path}")
    made = {
        "versions": versions,
        "openvino_runs": [{k: v for k, v in r.items() if k != "cases"} for r in runs],
        "threads": job["threads"],
        "kv_cache_precision": args.kv_cache_precision,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    theirs = ov_answers(json.loads(Path(job["result"]).read_text()), items, tokenizer, stops)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ANSWERS).write_text("".join(json.dumps(a) + "\n" for a in theirs))
    return theirs, made


def saved_openvino(out: Path) -> tuple[list[dict], dict, dict]:
    """(OpenVINO's answers, how they were made, the records of the runs that made and scored them) saved in
    ``out``."""
    saved = json.loads((out / "ruler.json").read_text())
    theirs = [json.loads(line) for line in (out / ANSWERS).open()]
    made = {k: saved[k] for k in ("versions", "openvino_runs", "threads", "kv_cache_precision", "wall_s")}
    return theirs, made, saved.get("records") or [{k: saved[k] for k in ("command", "commit", "cpu")}]


def report_body(args, settings: dict, made: dict, result: dict, n: int, describe) -> str:
    runs = made["openvino_runs"]
    budgets = "\n".join(f"- `{r['config']}` at {r['length']}: {describe(r['eviction'])}" for r in runs if r["eviction"])
    command = json.loads((args.h2o_vllm / "eval.json").read_text())["command"]
    return (
        f"**RULER-style pass keys through two engines on the same cases** ({', '.join(settings['ruler_tasks'])}, "
        f"{settings['ruler_samples']} cases per length, seed {settings['ruler_seed']}). h2o-vllm: the run in "
        f"`{args.h2o_vllm.name}/` (`{command}`). OpenVINO GenAI {made['versions'].get('openvino-genai')}: "
        f"ContinuousBatchingPipeline on the CPU, greedy, the same token ids, KV cache {made['kv_cache_precision']}, "
        f"prefill chunks of {MAX_NUM_BATCHED_TOKENS}, {made['threads']} threads, one pipeline per configuration "
        f"and length ({made['wall_s']:.0f} s in all). OpenVINO's budgets, what h2o-vllm keeps of each length's "
        "sequence (prompt + new tokens):\n\n"
        + budgets
        + "\n\n"
        + tables(result, n)
        + "\n\n![pass keys, both engines](ruler.png)"
    )


def main(argv: list[str] | None = None) -> int:
    # This file's folder holds openvino.py: take it off sys.path, or ``import openvino`` finds that file.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    peer = peer_module()
    try:
        for name in args.configs:  # what OpenVINO cannot run is refused before any work
            if name != "full":
                peer.eviction_budget(name, 1024, 24)
        settings, answers = saved_run(args.h2o_vllm)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"openvino_ruler.py: {exc}") from None
    sys.path.insert(0, str(HERE.parent))
    from report import Run, cpu_summary, git_commit, lscpu
    from transformers import AutoTokenizer

    from h2o_vllm.assets import prepare_default_model
    from h2o_vllm.datasets import essays_text

    command = ["python", "benchmarks/peers/openvino_ruler.py", *(sys.argv[1:] if argv is None else argv)]
    run = Run(shlex.join(command), git_commit(), cpu_summary())
    model_dir = prepare_default_model(log=log).path
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    items = draw_cases(settings, tokenizer, essays_text())
    check_same_cases(items, answers)
    records = None
    if args.rescore:
        theirs, made, earlier = saved_openvino(args.out)
        check_same_cases(items, [a for a in theirs if a["config"] == OV_PREFIX + "full"])
        args.configs = list(dict.fromkeys(r["config"] for r in made["openvino_runs"]))
        records = [*earlier, run.record()]
    else:
        theirs, made = run_openvino(args, peer, items, tokenizer, model_dir)
    result = compare(items, case_scores(items, answers + theirs), args.configs, args.against)
    data = {"lscpu": lscpu(peer.LSCPU_FIELDS), "h2o_vllm_run": {"dir": str(args.h2o_vllm), "settings": settings}}
    data |= {**made, "against": args.against, "records": records or [run.record()], **result}
    body = report_body(args, settings, made, result, len(items), peer.describe_eviction)
    text = run.write(
        args.out,
        "ruler",
        data,
        body,
        plot=lambda p: plot(result, args.configs, settings["ruler_tasks"], p),
        records=records,
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
