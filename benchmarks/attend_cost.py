"""One layer of decode attention three ways: vLLM's CPU kernel, the kernel then H2O's scoring, H2O's one pass.

    python benchmarks/attend_cost.py              # bfloat16 and float32, one torch thread
    python benchmarks/attend_cost.py --threads 2

On pages vLLM's own writer wrote (its ``vec`` kernels), for the default model's attention shape (9
query heads, 3 KV heads, head size 64, blocks of 32 tokens), decode batches of R requests holding K
keys each: ``vllm kernel`` is ``cpu_attention_with_kv_cache`` alone (what StreamingLLM and vanilla
run), ``kernel + score_layer`` what H2O ran before ``attend_layer``, ``attend_layer`` the fused
operator's one pass (the scores and the output). Each time is the mean of ``--repeats`` calls after
20 warm-up calls. Also how far ``attend_layer``'s output is from the kernel's.

Results: OUT/attend-cost.json, OUT/attend-cost.md (default OUT: results/engine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from report import ROOT, Run

KV_HEADS, HEADS, HEAD_DIM, BLOCK = 3, 9, 64, 32
BATCHES = ((11, 288), (11, 1024), (64, 288))  # (requests, keys each): the kv workload's decodes at 20%, longer, more


def measure(dtype, requests: int, keys: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from vllm import _custom_ops as ops

    from h2o_vllm.engine import scoring
    from h2o_vllm.engine.compaction import compact
    from h2o_vllm.engine.messages import ScoreRequest
    from h2o_vllm.engine.pages import KeyLayout
    from h2o_vllm.patches import engine_seams

    torch.manual_seed(0)
    width = -(-keys // BLOCK)
    table = (1 + torch.arange(requests * width, dtype=torch.int32)).view(requests, width)
    cache = torch.zeros(1 + requests * width, KV_HEADS, BLOCK, 2 * HEAD_DIM, dtype=dtype)
    key_cache, value_cache = cache.view(cache.shape[0], KV_HEADS, 2 * BLOCK, HEAD_DIM).chunk(2, dim=2)
    for r in range(requests):
        slots = (table[r].long()[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:keys]
        k, v = (torch.randn(keys, KV_HEADS, HEAD_DIM).to(dtype) for _ in range(2))
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
    query = torch.randn(requests, HEADS, HEAD_DIM).to(dtype)
    qsl = torch.arange(requests + 1, dtype=torch.int32)
    seq_lens = torch.full((requests,), keys, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False,
    )  # fmt: skip
    theirs, ours = torch.zeros_like(query), torch.zeros_like(query)
    names = [f"r{i}" for i in range(requests)]
    context = scoring.StepContext(names, {n: ScoreRequest(0, "sum") for n in names}, with_holes=set())
    compaction = compact(table, seq_lens, [], BLOCK)

    def scorer():
        lens = np.full(requests, keys)
        return scoring.StepScorer.for_step(context, compaction, qsl, lens, BLOCK, KeyLayout.DT, use_fused=True)

    before, after = scorer(), scorer()
    pages, values = engine_seams.key_pages(cache), engine_seams.value_pages(cache)

    def kernel():
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=theirs, query_start_loc=qsl,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
            softcap=0.0, scheduler_metadata=metadata, s_aux=None,
        )  # fmt: skip

    def kernel_then_score():
        kernel()
        before.score_layer(query, pages, scale)

    def attend():
        after.attend_layer(query, pages, values, scale, 1.0, ours)

    row = {"dtype": str(dtype).removeprefix("torch."), "requests": requests, "keys": keys}
    for name, fn in (("kernel_ms", kernel), ("kernel_score_ms", kernel_then_score), ("attend_ms", attend)):
        for _ in range(20):
            fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        row[name] = (time.perf_counter() - t) / repeats * 1e3
    diff = (ours.float() - theirs.float()).abs()
    row["max_abs_diff"] = diff.max().item()
    row["equal_elements"] = (ours == theirs).float().mean().item()
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| dtype | requests x keys | vLLM kernel ms | kernel + score_layer ms | attend_layer ms "
        "| attend / kernel | attend / (kernel + score) | max abs diff to the kernel | elements equal |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['requests']} x {r['keys']} | {r['kernel_ms']:.4f} | {r['kernel_score_ms']:.4f} "
            f"| {r['attend_ms']:.4f} | {r['attend_ms'] / r['kernel_ms']:.2f} "
            f"| {r['attend_ms'] / r['kernel_score_ms']:.2f} | {r['max_abs_diff']:.1e} | {r['equal_elements']:.1%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "engine")
    args = parser.parse_args(argv)
    run = Run.start(__file__, argv)
    import torch

    from h2o_vllm.engine import fused

    if not fused.load():
        raise SystemExit("the fused operator does not load here (see the log)")
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for requests, keys in BATCHES:
            rows.append(measure(dtype, requests, keys, args.repeats))
            r = rows[-1]
            print(
                f"[attend-cost] {r['dtype']} {requests} x {keys}: kernel {r['kernel_ms']:.4f} ms, "
                f"+ score_layer {r['kernel_score_ms']:.4f} ms, attend_layer {r['attend_ms']:.4f} ms",
                flush=True,
            )
    data = {"threads": args.threads, "repeats": args.repeats, "rows": rows}
    print(run.write(args.out, "attend-cost", data, table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
