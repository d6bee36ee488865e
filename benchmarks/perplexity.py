"""Streaming perplexity of H2O, StreamingLLM and the full cache on the default model.

Every token is fed one at a time and scored under the cache state it would see
while generating: the cache has already evicted down to its budget after each
previous token. One pass over N tokens gives the perplexity at every prefix
length (a budget given as a fraction follows the current length), so
``--report-at 1024 2048 4096`` costs one 4096-token pass per configuration.
Both corpora run as one batch of two rows, each row with its own decisions.

    python benchmarks/perplexity.py                      # the README table (about 1.5 h on 2 cores)
    python benchmarks/perplexity.py --configs h2o_20%_layer --corpora essays --max-tokens 1024

Configuration names (the grammar of h2o_vllm.names; the perplexity spellings below are accepted):
    baseline                   full cache (transformers' own DynamicCache)
    streaming_S_W              S sink tokens + W recent tokens
    h2o_S_R_C                  S sinks + R recent + (C - S - R) heavy hitters, C tokens in all
    h2o_P% / streaming_P%      a budget of P% of the evaluated length N (a fixed P% x N tokens
                               for the whole run, as in the H2O paper's evaluation), 8 sinks;
                               H2O splits the rest half recent, half heavy hitters. Reported
                               at N = --max-tokens only.
    ..._layer                  per-layer decisions instead of one shared decision
    ..._head                   per-layer and per-KV-head decisions (the paper's code): each KV
                               head keeps its own tokens
    ..._bN                     blocks of N tokens instead of single tokens
    ..._mean                   scores divided by the number of queries that saw each token
    ..._max                    each query's largest mass over heads (and layers, when shared)
                               instead of the sum (H2OCache score_reduce="max")
    ..._rNN                    (P% budgets) NN% of what the sinks leave goes to the recent
                               window, the rest to heavy hitters (default 50)

Results accumulate in OUT/results.json (one entry per configuration, corpus and
length); OUT/table.md is rewritten from all of them after every configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import Run

DEFAULT_CONFIGS = [
    "baseline",
    "streaming_8_256",
    "h2o_8_32_256",
    "streaming_8_504",
    "h2o_8_64_512",
    "streaming_10%",
    "h2o_10%",
    "streaming_20%",
    "h2o_20%",
    "streaming_50%",
    "h2o_50%",
]


@dataclass
class RunSpec:
    name: str
    policy_config: object | None  # None = baseline
    per_layer: bool = False
    per_head: bool = False  # implies per_layer
    relative: bool = False  # budget is a share of the evaluated length: report at --max-tokens only
    label: str = ""  # budget as written in the table

    @property
    def score_reduce(self) -> str:
        return "sum" if self.policy_config is None else self.policy_config.score_reduce


def parse_config(name: str, max_tokens: int) -> RunSpec:
    """A configuration name (h2o_vllm.names, 8 sink tokens unless it says otherwise) as this benchmark runs it."""
    from h2o_vllm.names import parse_name
    from h2o_vllm.policy import Budget, PolicyConfig

    if name == "baseline":
        return RunSpec(name, None, label="all")
    try:
        named = parse_name(name, PolicyConfig(n_sink=8))
    except ValueError as exc:
        raise SystemExit(f"{exc}; see --help") from None
    cfg = named.config
    if named.is_full or not named.has_budget:
        raise SystemExit(f"unknown configuration {name!r}; see --help")
    if cfg.budget.fraction is None:
        return RunSpec(name, cfg, named.per_layer, named.per_head, label=str(cfg.budget.tokens))
    # P% of N: a fixed share of the evaluated length for the whole run, as in the H2O paper.
    tokens = round(cfg.budget.fraction * max_tokens)
    if named.recent_share is not None:
        cfg = cfg.replace(n_recent=round(named.recent_share * (tokens - cfg.n_sink)))
    cfg = cfg.replace(budget=Budget(tokens=tokens))
    return RunSpec(
        name,
        cfg,
        named.per_layer,
        named.per_head,
        relative=True,
        label=f"{named.config.budget.fraction * 100:g}% of N = {tokens}",
    )


def budget_tokens(spec: RunSpec, length: int) -> int:
    if spec.policy_config is None:
        return length
    return min(length, spec.policy_config.budget.tokens_for(length))


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.finfo(model.dtype).bits // 8


def resident_tokens(cache) -> torch.Tensor:
    """[batch] KV tokens each row holds, averaged over layers and heads (equal for shared decisions)."""
    from transformers import DynamicCache

    if isinstance(cache, DynamicCache):
        return torch.full((cache.layers[0].keys.shape[0],), cache.layers[0].keys.shape[-2], dtype=torch.float64)
    return cache.resident_tokens()


def run_pass(model, specs: list[RunSpec], ids: torch.Tensor, log_every: int) -> dict:
    """One token-by-token pass over ``ids`` for every spec at once: rows = specs x corpora.

    Each row has its own policy and its own decisions; batching only shares the forward passes.
    The full cache runs alone in transformers' own DynamicCache.
    """
    from transformers import DynamicCache

    from h2o_vllm.hf import H2OCache

    corpora, n = ids.shape
    batch_ids = ids.repeat(len(specs), 1)  # row = spec_index * corpora + corpus_index
    if specs[0].policy_config is None:
        assert len(specs) == 1
        cache = DynamicCache()
    else:
        row_configs = [spec.policy_config for spec in specs for _ in range(corpora)]
        # Streaming rows decide without scores, so they follow a per-layer or per-head pass unchanged.
        cache = H2OCache.for_model(
            model,
            row_configs,
            per_layer=any(spec.per_layer for spec in specs),
            per_head=any(spec.per_head for spec in specs),
        )
    nll = torch.zeros(batch_ids.shape[0], n - 1, dtype=torch.float64)
    peak_tokens = torch.zeros(batch_ids.shape[0], dtype=torch.float64)
    start = time.perf_counter()
    with torch.no_grad():
        for t in range(n - 1):
            logits = model(input_ids=batch_ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            nll[:, t] = torch.nn.functional.cross_entropy(logits.double(), batch_ids[:, t + 1], reduction="none")
            peak_tokens = torch.maximum(peak_tokens, resident_tokens(cache))
            if (t + 1) % log_every == 0 or t == n - 2:
                rate = batch_ids.shape[0] * (t + 1) / (time.perf_counter() - start)
                ppl = " ".join(
                    f"{spec.name}={math.exp(nll[k * corpora, : t + 1].mean()):.2f}" for k, spec in enumerate(specs)
                )
                print(f"  {t + 1}/{n - 1} tokens ({rate:.1f} tok/s over {batch_ids.shape[0]} rows): {ppl}", flush=True)
    return {"nll": nll, "peak_kv_bytes": peak_tokens * kv_bytes_per_token(model)}


def time_alone(model, spec: RunSpec, ids: torch.Tensor) -> float:
    """Tokens/s of one configuration alone (batch of one), token by token over ``ids``."""
    from transformers import DynamicCache

    from h2o_vllm.hf import H2OCache

    cache = (
        DynamicCache()
        if spec.policy_config is None
        else H2OCache.for_model(model, spec.policy_config, per_layer=spec.per_layer, per_head=spec.per_head)
    )
    start = time.perf_counter()
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    return ids.shape[1] / (time.perf_counter() - start)


def pass_groups(specs: list[RunSpec], max_tokens: int, one_pass: bool = False) -> list[list[RunSpec]]:
    """Batch configurations whose caches are of similar size (rows are padded to the widest).

    StreamingLLM ignores scores, so it rides along in a per-layer pass unchanged;
    H2O rows only share a pass with H2O rows of the same per_layer, per_head and score_reduce settings.
    """
    groups: dict[tuple, list[RunSpec]] = {}
    layered = {
        (s.per_layer, s.per_head, s.score_reduce)
        for s in specs
        if s.policy_config is not None and s.policy_config.policy == "h2o"
    }
    for spec in specs:
        if spec.policy_config is None:
            key = ("baseline",)
        elif one_pass:
            if len(layered) > 1:
                raise SystemExit(
                    "--one-pass needs all H2O configurations to share _layer, _head and _max (all or none)"
                )
            key = ("all",)
        else:
            key = (spec.per_layer, spec.per_head, spec.score_reduce, budget_tokens(spec, max_tokens).bit_length())
        groups.setdefault(key, []).append(spec)
    return list(groups.values())


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def records(entries: list[dict]) -> list[dict]:
    """The runs that made ``entries``: each entry's (command, commit, cpu), and its timing run's."""
    made = [{k: e.get(k) for k in ("command", "commit", "cpu")} for e in entries]
    timed = [
        {"command": e["timing_command"], "commit": e.get("timing_commit"), "cpu": e.get("timing_cpu")}
        for e in entries
        if "timing_command" in e
    ]
    return made + timed


def save(run: Run, entries: list[dict], out: Path, model_title: str) -> str:
    """OUT/results.json (every entry) and OUT/table.md (the table of them all, and the runs that made them)."""
    body = table(entries, model_title)
    return run.write(out, "results", entries, body, md_name="table.md", records=records(entries))


def table(entries: list[dict], model_title: str) -> str:
    order = {"essays": 0, "books": 1}
    corpora = sorted({e["corpus"] for e in entries}, key=lambda c: order.get(c, 9))
    lengths = sorted({e["length"] for e in entries})
    configs = list(dict.fromkeys(e["config"] for e in entries))
    by_key = {(e["config"], e["corpus"], e["length"]): e for e in entries}
    header = (
        ["config"] + [f"{c} {n}" for c in corpora for n in lengths] + ["budget (tokens)", "tok/s alone", "peak KV MiB"]
    )
    timed = {}
    for e in entries:  # the timing of a configuration comes from whichever run measured it
        if e["tokens_per_s"] == e["tokens_per_s"] and e["config"] not in timed:
            timed[e["config"]] = e
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in configs:
        row, meta = [config], None
        for corpus in corpora:
            for n in lengths:
                e = by_key.get((config, corpus, n))
                row.append(f"{e['ppl']:.2f}" if e else "")
                meta = meta or e
        speed = timed.get(config)
        budgets = sorted({e["budget"] for e in entries if e["config"] == config})
        peak = max(e["peak_kv_bytes"] for e in entries if e["config"] == config)
        row += ["; ".join(budgets), f"{speed['tokens_per_s']:.1f}" if speed else "", f"{peak / 2**20:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    timing = "/".join(sorted({str(e["timing_tokens"]) for e in timed.values()})) or "?"
    return (
        f"Streaming perplexity (lower is better) of {model_title} in float32, token by token: each token\n"
        "is scored under the cache its policy had left after the previous one. Columns: corpus and number of\n"
        "tokens scored (N). Budget: KV tokens kept; P% rows were run once per N with a budget of P% of N.\n"
        f"tok/s: the configuration alone, batch of one, over the first {timing} essay tokens. Peak KV: one\n"
        "sequence's cache at its largest, over all runs of that row.\n\n" + "\n".join(lines)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--corpora", nargs="+", default=["essays", "books"], choices=["essays", "books"])
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--report-at", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument(
        "--model",
        default=None,
        help="a model h2o-vllm builds (qwen2.5-coder-0.5b) or a folder; default: the default model",
    )
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--timing-tokens",
        type=int,
        default=1024,
        help="tokens/s is measured per configuration alone over this many essay tokens (0: skip)",
    )
    parser.add_argument("--log-every", type=int, default=256)
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only re-measure tok/s of the given configurations in existing results",
    )
    parser.add_argument(
        "--one-pass",
        action="store_true",
        help="run every non-baseline configuration in one batched pass (faster, more memory)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/perplexity"))
    args = parser.parse_args()
    run = Run.start(__file__)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h2o_vllm import assets, datasets

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_config(c, args.max_tokens) for c in args.configs]
    known = assets.MODELS.get((args.model or assets.DEFAULT_SERVED_NAME).lower())
    model_dir = assets.prepare_model(known).path if known else Path(args.model)
    model_title = known.title if known else model_dir.name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for corpus in args.corpora:
        ids = tokenizer(datasets.CORPORA[corpus]()).input_ids[: args.max_tokens]
        if len(ids) < args.max_tokens:
            raise SystemExit(f"{corpus} has only {len(ids)} tokens")
        rows.append(ids)
    ids = torch.tensor(rows)
    report_at = sorted(n for n in args.report_at if n <= args.max_tokens) or [args.max_tokens]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"

    def load_model():
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=args.attn
        ).eval()

    timing_ids = ids[:1, : args.timing_tokens]
    if args.timing_only:  # re-measure speed only, e.g. after a run that shared the machine
        entries = load_results(results_path)
        for spec in specs:
            speed = time_alone(load_model(), spec, timing_ids)
            print(
                f"  {spec.name}: {speed:.1f} tok/s alone over the first {args.timing_tokens} essay tokens", flush=True
            )
            for e in entries:
                if e["config"] == spec.name:
                    e.update(tokens_per_s=speed, timing_tokens=args.timing_tokens, timing_command=run.command)
                    e.update(timing_commit=run.commit, timing_cpu=run.cpu)
        print(save(run, entries, args.out, model_title), flush=True)
        return 0
    for group in pass_groups(specs, args.max_tokens, args.one_pass):
        names = ", ".join(spec.name for spec in group)
        print(f"pass: {names} ({len(group) * len(args.corpora)} rows x {args.max_tokens} tokens)", flush=True)
        scored = run_pass(load_model(), group, ids, args.log_every)
        entries = load_results(results_path)
        for k, spec in enumerate(group):
            speed = time_alone(load_model(), spec, timing_ids) if args.timing_tokens else float("nan")
            print(
                f"  {spec.name}: {speed:.1f} tok/s alone over the first {args.timing_tokens} essay tokens", flush=True
            )
            lengths = [args.max_tokens] if spec.relative else report_at
            entries = [
                e
                for e in entries
                if not (e["config"] == spec.name and e["corpus"] in args.corpora and e["length"] in lengths)
            ]
            for c, corpus in enumerate(args.corpora):
                row = k * len(args.corpora) + c
                for n in lengths:
                    entries.append(
                        {
                            "config": spec.name,
                            "corpus": corpus,
                            "length": n,
                            "ppl": math.exp(scored["nll"][row, : n - 1].mean().item()),
                            "budget_tokens_at_max": budget_tokens(spec, args.max_tokens),
                            "budget": spec.label,
                            "max_tokens": args.max_tokens,
                            "tokens_per_s": speed,
                            "timing_tokens": args.timing_tokens,
                            "peak_kv_bytes": float(scored["peak_kv_bytes"][row]),
                            "attn": args.attn,
                            **run.record(),
                        }
                    )
        print(save(run, entries, args.out, model_title), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
