"""``h2o-vllm eval``: quality of eviction policies measured over HTTP, HELM-style.

    h2o-vllm eval                                   # starts a local server, runs everything
    h2o-vllm eval --base-url http://127.0.0.1:8000  # any running h2o-vllm server
    h2o-vllm eval --scenarios needle --budgets 0.2 --lengths 1024 --samples 4
    h2o-vllm eval --policies h2o_window8_max h2o_window8_max_chunked --budgets 0.2 1024
    h2o-vllm eval --scenarios ruler --ruler-tasks niah_number vt --ruler-samples 100 --budgets 0.2
    h2o-vllm eval --rescore results/ruler/smollm2      # score saved answers again, no request

Every scenario runs under the full cache and under each policy x budget, concurrently,
with the policy chosen per request. Budgets are fractions of the sequence (0.2 or 20%)
or token counts (1024); a policy family that ends in _chunked compresses the prompt
after every prefill chunk. Results: OUT/eval.json, OUT/eval.md (tables),
OUT/eval.png, OUT/answers.jsonl (every answer, for inspection). RULER-style tasks
(--scenarios ruler) are reported with 95% intervals, and every configuration is
compared with the full cache on the same cases (paired).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from h2o_vllm.evaluation import ruler, scenarios
from h2o_vllm.evaluation.configs import (
    DEFAULT_POLICIES,
    DEFAULT_WINDOW,
    SELECT_MODES,
    EvalConfig,
    EvalConfigError,
    eval_configs,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="h2o-vllm eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--base-url", help="server root, e.g. http://127.0.0.1:8000 (default: start h2o-vllm serve on loopback)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="served model name (default: the default model's, smollm2-135m); a model h2o-vllm builds "
        "(qwen2.5-coder-0.5b) is also what a started server serves",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for building prompts (default: the model's, for a model h2o-vllm builds; "
        "else the default model's)",
    )
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=list(scenarios.DEFAULT_SCENARIOS),
        choices=scenarios.SCENARIOS,
        help=f"default: {' '.join(scenarios.DEFAULT_SCENARIOS)}",
    )
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        help="policy families, named as in h2o_vllm.names without a budget (h2o, streaming, "
        "h2o_window8_max, h2o_mean, h2o_chunked, ...; also h2o-window, h2o-window-max, h2o-mean)",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        default=["0.1", "0.2", "0.5"],
        help="KV budgets: fractions of the sequence below 1 (0.2 or 20%%) and/or token counts (1024)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help="observation window of the h2o-window and h2o-window-max families (query rows)",
    )
    p.add_argument(
        "--select",
        choices=SELECT_MODES,
        default="xargs",
        help="choose the policy per request with vllm_xargs, or with MODEL@policy-budget aliases",
    )
    g = p.add_argument_group("needle")
    g.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096], help="context lengths in tokens")
    g.add_argument(
        "--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="where the key sits (fraction of the text)"
    )
    g.add_argument("--samples", type=int, default=2, help="pass keys per length and depth")
    g = p.add_argument_group("fidelity")
    g.add_argument("--fidelity-prompts", type=int, default=3)
    g.add_argument(
        "--fidelity-prompt-tokens",
        type=int,
        default=1024,
        help="long enough that 10%% of the sequence leaves room for heavy hitters besides sink and recent blocks",
    )
    g.add_argument("--fidelity-new-tokens", type=int, default=512)
    g = p.add_argument_group("summary")
    g.add_argument("--summaries", type=int, default=3)
    g.add_argument("--summary-essay-tokens", type=int, default=1536)
    g.add_argument("--summary-new-tokens", type=int, default=128)
    g = p.add_argument_group("ruler")
    g.add_argument("--ruler-tasks", nargs="+", default=list(ruler.TASKS), choices=ruler.TASKS)
    g.add_argument("--ruler-lengths", nargs="+", type=int, default=[1024, 2048, 4096], help="prompt tokens")
    g.add_argument("--ruler-samples", type=int, default=2, help="cases per task and length")
    g.add_argument("--ruler-seed", type=int, default=0, help="another seed draws other cases")
    g = p.add_argument_group("run")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    g.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
    g.add_argument("--out", type=Path, default=Path("results/eval"))
    g.add_argument(
        "--rescore",
        type=Path,
        metavar="DIR",
        help="score DIR/answers.jsonl again with the arguments saved in DIR/eval.json and rewrite DIR's "
        "tables and plots (after a change to the scoring or the report); sends no request",
    )
    g.add_argument(
        "--serve-args",
        default="--enforce-eager",
        help="extra h2o-vllm serve arguments when this command starts the server",
    )
    return p


POSITIVE_ARGS = (
    "samples",
    "fidelity_prompts",
    "summaries",
    "concurrency",
    "window",
    "fidelity_prompt_tokens",
    "fidelity_new_tokens",
    "summary_essay_tokens",
    "summary_new_tokens",
    "ruler_samples",
)


def _checked_configs(args) -> list[EvalConfig]:
    """The configurations the arguments ask for; EvalConfigError before any request if they cannot run."""
    for name in POSITIVE_ARGS:
        if getattr(args, name) < 1:
            raise EvalConfigError(f"--{name.replace('_', '-')} must be at least 1")
    configs = eval_configs(args.policies, args.budgets, args.window)
    if args.select == "alias":
        for c in configs:
            c.alias("m")  # raises for configurations without an alias
    return configs


def build_items(args, tokenizer) -> list[scenarios.Item]:
    from h2o_vllm.datasets import essays_dir, essays_text

    corpus = essays_text()
    items = []
    if "needle" in args.scenarios:
        items += scenarios.needle_items(tokenizer, corpus, args.lengths, args.depths, args.samples)
    if "fidelity" in args.scenarios:
        items += scenarios.fidelity_items(
            tokenizer, corpus, args.fidelity_prompts, args.fidelity_prompt_tokens, args.fidelity_new_tokens
        )
    if "ruler" in args.scenarios:
        items += ruler.ruler_items(
            tokenizer, corpus, args.ruler_tasks, args.ruler_lengths, args.ruler_samples, args.ruler_seed
        )
    if "summary" in args.scenarios:
        essays = [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in sorted(essays_dir().glob("*.txt"))]
        items += scenarios.summary_items(
            tokenizer, essays, args.summaries, args.summary_essay_tokens, args.summary_new_tokens
        )
    return items


def max_context(items) -> int:
    return max(i.prompt_tokens + i.max_tokens for i in items) + 64  # chat template and tokenizer drift


def _saved_run(directory: Path, parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, str, float]:
    """(the arguments, the command and the wall time) of the run saved in ``directory``."""
    import json

    saved = json.loads((directory / "eval.json").read_text())
    args = parser.parse_args([])
    for name, value in saved["settings"].items():
        if hasattr(args, name) and name not in ("rescore", "base_url"):
            setattr(args, name, Path(value) if name == "out" else value)
    args.out = directory
    return args, saved["command"], saved["settings"].get("wall_s")


def _saved_answers(path: Path) -> list:
    import json

    from h2o_vllm.evaluation.client import Answer

    fields = set(Answer.__dataclass_fields__)
    return [Answer(**{k: v for k, v in json.loads(line).items() if k in fields}) for line in path.open()]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rescore = args.rescore
    if rescore is not None:
        try:
            args, command, wall_s = _saved_run(rescore, parser)
        except (OSError, ValueError, KeyError) as err:
            print(f"h2o-vllm eval: error: cannot read the run saved in {rescore}: {err}", file=sys.stderr)
            return 2
    try:
        configs = _checked_configs(args)
    except EvalConfigError as err:
        print(f"h2o-vllm eval: error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from h2o_vllm import assets
    from h2o_vllm.evaluation import client, report

    model = args.model or assets.DEFAULT_SERVED_NAME
    # A model h2o-vllm builds brings its own tokenizer; any other needs --tokenizer (else the default's).
    known = assets.MODELS.get(model.lower())
    tokenizer_dir = args.tokenizer or str(assets.prepare_model(known, log=lambda *_: None).path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    try:
        items = build_items(args, tokenizer)
    except ValueError as err:
        print(f"h2o-vllm eval: error: {err}", file=sys.stderr)
        return 2
    if rescore is not None:
        from h2o_vllm.evaluation import report

        answers = _saved_answers(rescore / "answers.jsonl")
        wanted = {(c.name, i.scenario, i.key) for c in configs for i in items}
        if {(a.config, a.scenario, a.key) for a in answers} != wanted:
            print(f"h2o-vllm eval: error: {rescore}/answers.jsonl is not the saved run's requests", file=sys.stderr)
            return 2
        results = report.score(items, answers, configs, tokenizer)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
        settings["wall_s"] = wall_s
        paths = report.save(args.out, command, settings, items, answers, results, configs)
        print(report.markdown(results, configs))
        print("rescored: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
        return 0
    jobs = [(c, i) for c in configs for i in items]
    print(
        f"[eval] {len(items)} items x {len(configs)} configurations = {len(jobs)} requests "
        f"({', '.join(c.name for c in configs)})",
        file=sys.stderr,
        flush=True,
    )
    command = "h2o-vllm eval " + shlex.join(sys.argv[2:] if argv is None else argv)
    t0 = time.monotonic()

    def ask(base_url: str) -> list:
        return client.run_requests(
            base_url,
            jobs,
            model,
            select=args.select,
            concurrency=args.concurrency,
            timeout=args.request_timeout,
            api_key=args.api_key,
        )

    if args.base_url:
        answers = ask(args.base_url)
    else:
        from h2o_vllm.local_server import ServerProcess

        serve_args = ["--max-model-len", str(max_context(items)), *shlex.split(args.serve_args)]
        if known is not None:
            serve_args = ["--model", known.name, *serve_args]
        args.out.mkdir(parents=True, exist_ok=True)
        print(
            f"[eval] starting h2o-vllm serve {' '.join(serve_args)} (log: {args.out / 'server.log'})",
            file=sys.stderr,
            flush=True,
        )
        with ServerProcess(serve_args, log_path=args.out / "server.log") as server:
            answers = ask(server.base_url)
    results = report.score(items, answers, configs, tokenizer)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
    settings["wall_s"] = round(time.monotonic() - t0, 1)
    paths = report.save(args.out, command, settings, items, answers, results, configs)
    print(report.markdown(results, configs))
    print("saved: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if answers and all(a.error is not None for a in answers):
        print(f"h2o-vllm eval: error: every request failed; the first: {answers[0].error}", file=sys.stderr)
        return 1
    return 0  # single failures are counted in the tables
