"""Where H2O's scoring time goes: scoring against vLLM's attention kernel, layer call by layer call.

In-process engine (default model, bf16, ``--enforce-eager``), one configuration after the
other, each on the same workload: ``--requests`` essay prompts of ``--prompt-tokens`` tokens
generating ``--new-tokens`` each, all at once. Every attention layer call of the H2O backend
is timed twice: the whole call (vLLM's CPU kernel, then our scoring) and the scoring alone
(``StepScorer.score_layer``); the kernel's time is the difference. Calls are split by step:
*prompt* steps (at least one prompt chunk scored) and *decode* steps (only single rows).
Besides the layer calls, the H2O work done once per step is timed: the scheduler's
``schedule`` and ``update_from_output`` (vLLM's own work included), the attention
metadata builder's ``build`` (compaction, the step's scorer) and the scorer's ``collect``
(the step's scores handed to the scheduler). StreamingLLM at the same
budget does the same eviction work without scores: the difference in wall time between
H2O and StreamingLLM is what scoring costs the whole step. H2O scores with the fused
operator (``h2o_vllm/engine/fused.py``); a config name ending in ``+pytorch`` scores with
the PyTorch operators instead (``H2O_VLLM_FUSED_SCORING=0``), as before the operator.

    python benchmarks/scoring_cost.py
    python benchmarks/scoring_cost.py --configs h2o_20% h2o_20%_window8_max --requests 4

Results: OUT/scoring-cost.json, OUT/scoring-cost.md (default OUT: results/engine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path

from inprocess import default_model_dir, engine_config, workload_prompts
from report import ROOT, Run


class LayerTimer:
    """Times the H2O attention impl's ``forward`` and the scorer's ``score_layer`` in this process,
    and the once-per-step methods in ``STEP_METHODS``."""

    def __init__(self):
        from h2o_vllm.engine import attention, scoring
        from h2o_vllm.engine.scheduler import H2OScheduler

        self.totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.step_s: dict[str, float] = defaultdict(float)
        self._kind = None
        self._score = 0.0
        impl = attention.H2OCPUAttentionBackendImpl
        self._originals = [(impl, "forward", impl.forward)]
        timer = self
        for cls, name in (
            (H2OScheduler, "schedule"),
            (H2OScheduler, "update_from_output"),
            (attention.H2OCPUAttentionMetadataBuilder, "build"),
            (scoring.StepScorer, "collect"),
        ):
            self._originals.append((cls, name, getattr(cls, name)))
            setattr(cls, name, self._timed(f"{cls.__name__}.{name}", getattr(cls, name)))

        def forward(self_, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            s = getattr(attn_metadata, attention.SCORER_ATTR, None) if attn_metadata is not None else None
            timer._kind = "none" if s is None else ("prompt" if s.prompts else "decode")
            timer._score = 0.0
            t = time.perf_counter()
            out = timer._originals[0][2](self_, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            whole = time.perf_counter() - t
            row = timer.totals[timer._kind]
            row["calls"] += 1
            row["kernel_s"] += whole - timer._score
            row["scoring_s"] += timer._score
            return out

        def timed_scoring(original):
            def score_layer(self_, *args, **kwargs):
                t = time.perf_counter()
                original(self_, *args, **kwargs)
                timer._score += time.perf_counter() - t

            return score_layer

        impl.forward = forward
        for scorer in (scoring.TorchScorer, scoring.FusedScorer):  # the two implementations
            self._originals.append((scorer, "score_layer", scorer.score_layer))
            scorer.score_layer = timed_scoring(scorer.score_layer)

    def _timed(self, key: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.step_s[key] += time.perf_counter() - t

        return timed

    def close(self) -> None:
        for cls, name, fn in self._originals:
            setattr(cls, name, fn)


PYTORCH_SUFFIX = "+pytorch"


@contextlib.contextmanager
def scoring_path(pytorch: bool):
    """Score with PyTorch operators (``pytorch``) or the fused operator in this process's engine."""
    from h2o_vllm.engine import fused

    saved = os.environ.get(fused.ENV_SWITCH)
    os.environ[fused.ENV_SWITCH] = "0" if pytorch else "1"
    fused.load.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(fused.ENV_SWITCH)
        else:
            os.environ[fused.ENV_SWITCH] = saved
        fused.load.cache_clear()


def run_config(name: str, prompts, args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from h2o_vllm.engine.observe import inprocess_llm

    model = default_model_dir()
    kwargs = dict(
        max_model_len=args.prompt_tokens + args.new_tokens,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=1024 * 2**20,
        enable_prefix_caching=False,  # every configuration computes every prompt
    )
    policy = name.removesuffix(PYTORCH_SUFFIX)
    with scoring_path(name != policy), inprocess_llm(model, **kwargs, **engine_config(policy)) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        timer = LayerTimer()
        try:
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            wall = time.perf_counter() - t
        finally:
            timer.close()
    row = {"config": name, "wall_s": wall, "step_s": dict(timer.step_s)}
    for kind in ("prompt", "decode"):
        t = timer.totals.get(kind, {})
        row[kind] = {k: t.get(k, 0.0) for k in ("calls", "kernel_s", "scoring_s")}
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| config | steps | layer calls | kernel ms per call | scoring ms per call | scoring / kernel "
        "| scoring, share of the run |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        for kind in ("prompt", "decode"):
            t = r[kind]
            if not t["calls"]:
                continue
            calls = t["calls"]
            lines.append(
                f"| {r['config']} | {kind} | {int(calls)} | {1e3 * t['kernel_s'] / calls:.3f} "
                f"| {1e3 * t['scoring_s'] / calls:.3f} | {t['scoring_s'] / max(t['kernel_s'], 1e-9):.2f} "
                f"| {t['scoring_s'] / r['wall_s']:.0%} |"
            )
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    """Wall time and the once-per-step work, per configuration (seconds over the whole run)."""
    keys = [
        "H2OScheduler.schedule",
        "H2OScheduler.update_from_output",
        "H2OCPUAttentionMetadataBuilder.build",
        "StepScorer.collect",
    ]
    lines = [
        "| config | wall s | scoring in layer calls s | scheduler.schedule s | scheduler.update_from_output s "
        "| builder.build s | scorer.collect s |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        scoring = r["prompt"]["scoring_s"] + r["decode"]["scoring_s"]
        steps = " | ".join(f"{r['step_s'].get(k, 0.0):.2f}" for k in keys)
        lines.append(f"| {r['config']} | {r['wall_s']:.1f} | {scoring:.2f} | {steps} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["h2o_20%+pytorch", "h2o_20%", "h2o_20%_max", "h2o_20%_window8_max", "streaming_20%"],
    )
    parser.add_argument("--requests", type=int, default=11)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "engine")
    args = parser.parse_args(argv)
    run = Run.start(__file__, argv)

    prompts = workload_prompts(args.requests, args.prompt_tokens)
    rows = []
    for name in args.configs:
        print(
            f"[scoring-cost] {name}: {args.requests} x {args.prompt_tokens} tokens, {args.new_tokens} new", flush=True
        )
        rows.append(run_config(name, prompts, args))
        r = rows[-1]
        print(
            f"    {r['wall_s']:.1f} s; scoring {r['prompt']['scoring_s']:.2f} s in prompt steps, "
            f"{r['decode']['scoring_s']:.2f} s in decode steps",
            flush=True,
        )
    settings = {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    tables = table(rows) + "\n\n" + step_table(rows)
    run.write(args.out, "scoring-cost", {**settings, "rows": rows}, tables)
    print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
