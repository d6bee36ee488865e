"""Long-generation fidelity of the policies in transformers: which decisions keep a continuation on track.

The HTTP evaluation (``h2o-vllm eval --scenarios fidelity``) measures the paged
engine, where one decision per 32-token block holds for every layer and head.
This script asks the same question of the transformers cache, where decisions
can also be made per layer and per KV head (as the H2O paper's code does), so
the two can be told apart: greedy continuations of essay excerpts under each
configuration, compared with the full cache's continuation (tokens matched
before the first divergence, ROUGE-L F1 of the decoded text).

    python benchmarks/hf_fidelity.py --out results/hf-fidelity
    python benchmarks/hf_fidelity.py --configs streaming_50% h2o_50%_b32 h2o_50%_mean_head --prompts 4

Configuration names (budgets are fractions of the growing sequence, as in the engine):
    full                     the full cache (transformers' DynamicCache)
    streaming_P%             sinks + recent window
    h2o_P%                   sinks + half recent window + half heavy hitters
    ..._bN, _layer, _head, _mean, _max, _windowN   options of h2o_vllm.names (_b32: the
                             engine's 32-token blocks; _head: decisions per layer and KV head)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import Run

# StreamingLLM, H2O as the paged engine decides (32-token blocks, one decision for all layers
# and heads), and H2O as it wins the perplexity benchmark (tokens, per layer and KV head, mean).
DEFAULT_CONFIGS = [
    "streaming_20%",
    "h2o_20%_b32",
    "h2o_20%_mean_head",
    "streaming_50%",
    "h2o_50%_b32",
    "h2o_50%_mean_head",
]


@dataclass(frozen=True)
class Spec:
    name: str
    policy_config: object | None  # None: the full cache
    per_layer: bool = False
    per_head: bool = False


def parse_config(name: str, n_sink: int) -> Spec:
    """A configuration name (h2o_vllm.names) with a budget in % of the sequence, ``n_sink`` sinks."""
    from h2o_vllm.names import parse_name
    from h2o_vllm.policy import PolicyConfig

    if name == "full":
        return Spec(name, None)
    try:
        named = parse_name(name, PolicyConfig(n_sink=n_sink))
    except ValueError as exc:
        raise SystemExit(f"{exc}; see --help") from None
    if not named.has_budget or named.config.budget.fraction is None or named.recent_share is not None:
        raise SystemExit(f"unknown configuration {name!r}; see --help")
    return Spec(name, named.config, named.per_layer, named.per_head)


def prompts_from_essays(tokenizer, count: int, prompt_tokens: int) -> torch.Tensor:
    """``count`` excerpts of ``prompt_tokens`` tokens spread evenly over the essays (as the HTTP eval picks them)."""
    from h2o_vllm.datasets import essays_text

    ids = tokenizer(essays_text())["input_ids"]
    stride = (len(ids) - prompt_tokens) // count
    return torch.tensor([ids[i * stride : i * stride + prompt_tokens] for i in range(count)])


def generate(model, spec: Spec, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import DynamicCache

    from h2o_vllm.hf import H2OCache

    cache = (
        DynamicCache()
        if spec.policy_config is None
        else H2OCache.for_model(model, spec.policy_config, per_layer=spec.per_layer, per_head=spec.per_head)
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[:, prompts.shape[1] :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--sink", type=int, default=32, help="sink tokens (32: the engine's one sink block)")
    parser.add_argument("--out", type=Path, default=Path("results/hf-fidelity"))
    args = parser.parse_args()
    run = Run.start(__file__)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h2o_vllm import assets
    from h2o_vllm.evaluation.metrics import matched_prefix, rouge_l

    specs = [parse_config(c, args.sink) for c in args.configs]  # fail on a bad name before loading anything
    model_dir = assets.prepare_default_model().path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_from_essays(tokenizer, args.prompts, args.prompt_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    def timed(spec):
        start = time.perf_counter()
        tokens = generate(model, spec, prompts, args.new_tokens)
        print(f"  {spec.name}: {time.perf_counter() - start:.0f} s", flush=True)
        return tokens

    print(f"{args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens, float32", flush=True)
    reference = timed(Spec("full", None))
    reference_text = [tokenizer.decode(r) for r in reference]
    rows = []
    for spec in specs:
        tokens = timed(spec)
        matched = [matched_prefix(t.tolist(), r.tolist()) for t, r in zip(tokens, reference)]
        rouge = [rouge_l(tokenizer.decode(t), ref) for t, ref in zip(tokens, reference_text)]
        rows.append(
            {
                "config": spec.name,
                "matched_tokens": matched,
                "rouge_l": rouge,
                "mean_matched_tokens": sum(matched) / len(matched),
                "mean_rouge_l": sum(rouge) / len(rouge),
            }
        )
        print(
            f"  {spec.name}: matched {rows[-1]['mean_matched_tokens']:.1f} tokens, ROUGE-L "
            f"{rows[-1]['mean_rouge_l']:.3f} (per prompt: {matched})",
            flush=True,
        )
    lines = ["| config | tokens matched (mean) | ROUGE-L (mean) | tokens matched per prompt |", "|---|---|---|---|"]
    lines += [
        f"| {r['config']} | {r['mean_matched_tokens']:.1f} | {r['mean_rouge_l']:.3f} | {r['matched_tokens']} |"
        for r in rows
    ]
    table = (
        f"Greedy continuations in transformers (SmolLM2-135M-Instruct, float32, SDPA): {args.prompts} essay "
        f"excerpts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.sink} sink tokens, "
        "compared with the full cache's continuation.\n\n" + "\n".join(lines)
    )
    settings = {k: str(v) for k, v in vars(args).items()}
    print(run.write(args.out, "results", {"settings": settings, "rows": rows}, table, md_name="table.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
