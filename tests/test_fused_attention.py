"""The fused operator's attend_layer: H2O's scores and the attention output from one pass over the keys.

Its scores are score_layer's, bit for bit; its output is softmax(scale * q.K) V over the keys each
row sees, against a float64 reference (exact to float32 rounding in float32), and against vLLM's own
CPU attention kernel on pages that kernel's writer wrote (within bfloat16 rounding). The engine calls
it on decode steps of requests that all evicted (``tests/test_engine_attends.py``).
"""

import numpy as np
import pytest
import torch
from scoring_cases import step_of

from h2o_vllm.engine import fused, scoring
from h2o_vllm.engine.compaction import compact
from h2o_vllm.engine.pages import KeyLayout
from h2o_vllm.patches import engine_seams


@pytest.fixture(scope="module", autouse=True)
def operator_loads():
    assert fused.load(), "the fused operator does not load (see the log)"


KV_HEADS, HEADS, HEAD_DIM, NUM_BLOCKS, BS = 3, 9, 64, 64, 32
# (name, tokens held before holes, query rows this step, first scored position, reduce, holes)
REQUESTS = [
    ("P", 700, 40, 680, "sum", [2, 5]),  # a prompt chunk, only its last 20 rows scored
    ("Q", 333, 20, 0, "max", []),
    ("D1", 200, 1, 0, "sum", [1]),
    ("D2", 150, 1, 0, "max", [0, 3]),
]


def dt_cache(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CPU KV cache [blocks, kv_heads, block_size, 2 * head_dim] holding ``keys`` and ``values``
    ([blocks, kv_heads, block_size, head_dim]) as vLLM's vec kernels lay them out: K^T pages, V pages."""
    cache = torch.empty(NUM_BLOCKS, KV_HEADS, BS, 2 * HEAD_DIM, dtype=keys.dtype)
    engine_seams.key_pages(cache).copy_(keys.transpose(-1, -2).reshape(NUM_BLOCKS, KV_HEADS, -1))
    engine_seams.value_pages(cache).copy_(values.reshape(NUM_BLOCKS, KV_HEADS, -1))
    return cache


def step(dtype):
    table, lens, qsl, asks, _ = step_of(REQUESTS, BS)
    context = scoring.StepContext([r[0] for r in REQUESTS], asks, with_holes={"P", "D1", "D2"})
    compaction = compact(table, lens, [0, 2, 3], BS)
    query = torch.randn(int(qsl[-1]), HEADS, HEAD_DIM).to(dtype)

    def scorer():
        return scoring.StepScorer.for_step(context, compaction, qsl, lens.numpy(), BS, KeyLayout.DT, use_fused=True)

    return scorer, query


def reference(scorer, query, keys, values, scale):
    """float64 softmax(scale * q.K) V of every scored row over the keys it sees: {query row: [heads, head_dim]}."""
    out = {}
    for req in scorer.prompts + scorer.decodes:
        k = keys[req.block_ids].double().permute(1, 0, 2, 3).reshape(KV_HEADS, -1, HEAD_DIM)[:, : req.num_keys]
        v = values[req.block_ids].double().permute(1, 0, 2, 3).reshape(KV_HEADS, -1, HEAD_DIM)[:, : req.num_keys]
        for i, position in enumerate(req.query_positions):
            seen = int(np.searchsorted(req.token_positions, position, side="right"))
            q = query[req.query_rows.start + i].double().view(KV_HEADS, -1, HEAD_DIM)  # [kv, group, d]
            p = torch.softmax(scale * q @ k[:, :seen].transpose(1, 2), dim=-1)
            out[req.query_rows.start + i] = (p @ v[:, :seen]).reshape(HEADS, HEAD_DIM)
    return out


@pytest.mark.parametrize("target", fused.runnable_targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attend_layer_scores_as_score_layer_and_attends_as_softmax_qk_v(dtype, target):
    """Every x86-64 level this CPU runs (SSE4.2, AVX2, AVX-512 registers) and -march=native."""
    fused.load_variant(target)
    ops = getattr(torch.ops, fused.variant_namespace(target))
    torch.manual_seed(0)
    keys = torch.randn(NUM_BLOCKS, KV_HEADS, BS, HEAD_DIM).to(dtype)
    values = torch.randn(NUM_BLOCKS, KV_HEADS, BS, HEAD_DIM).to(dtype)
    cache = dt_cache(keys, values)
    scale = HEAD_DIM**-0.5
    make, query = step(dtype)
    scored, attended = make(), make()
    for scorer in (scored, attended):
        scorer.fused_batch.op, scorer.fused_batch.attend_op = ops.score_layer, ops.attend_layer
    output = torch.full_like(query, float("nan"))
    for _ in range(2):  # two layers: the scores accumulate alike
        scored.score_layer(query, engine_seams.key_pages(cache), scale)
        attended.attend_layer(query, engine_seams.key_pages(cache), engine_seams.value_pages(cache), scale, 1.0, output)
    a, b = scored.collect(), attended.collect()
    for name, *_ in REQUESTS:
        np.testing.assert_array_equal(a[name].mass, b[name].mass)  # bit for bit
        np.testing.assert_array_equal(a[name].visibility, b[name].visibility)

    expected = reference(attended, query, keys, values, scale)
    assert sorted(expected) == sorted(set(range(20, 40)) | set(range(40, 60)) | {60, 61})
    tolerance = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for row, want in expected.items():
        torch.testing.assert_close(output[row].double(), want, rtol=tolerance, atol=tolerance)
    assert torch.isnan(output[:20]).all()  # rows not scored are left as they were


def test_vllm_writes_value_pages_as_attend_layer_reads_them():
    """vLLM's vec writer puts each value page [block_size, head_dim]; attend_layer assumes so."""
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    cache = torch.zeros(2, KV_HEADS, BS, 2 * HEAD_DIM, dtype=torch.bfloat16)
    view = cache.view(2, KV_HEADS, 2 * BS, HEAD_DIM)
    key_cache, value_cache = view.chunk(2, dim=2)
    key, value = (torch.randn(BS, KV_HEADS, HEAD_DIM).to(torch.bfloat16) for _ in range(2))
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(BS, 2 * BS), "vec")
    pages = engine_seams.value_pages(cache)[1].view(KV_HEADS, BS, HEAD_DIM)
    assert torch.equal(pages, value.transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_layer_equals_vllms_kernel_on_decodes(dtype):
    """Decode rows over pages vLLM's writer wrote: attend_layer's output against vLLM's CPU attention kernel."""
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    lens = [200, 150, 333]
    table, _, _, asks, used = step_of([(f"D{i}", n, 1, 0, "sum", []) for i, n in enumerate(lens)], BS)
    cache = torch.zeros(used, KV_HEADS, BS, 2 * HEAD_DIM, dtype=dtype)
    key_cache, value_cache = cache.view(used, KV_HEADS, 2 * BS, HEAD_DIM).chunk(2, dim=2)
    for i, n in enumerate(lens):
        slots = (table[i, : -(-n // BS)].long()[:, None] * BS + torch.arange(BS)).reshape(-1)[:n]
        k, v = (torch.randn(n, KV_HEADS, HEAD_DIM).to(dtype) for _ in range(2))
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
    assert engine_seams.detect_key_layout("vec", dtype, HEAD_DIM) is KeyLayout.DT
    query = torch.randn(len(lens), HEADS, HEAD_DIM).to(dtype)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(lens), num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False,
    )  # fmt: skip
    theirs = torch.zeros_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=theirs, query_start_loc=qsl,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
        softcap=0.0, scheduler_metadata=metadata, s_aux=None,
    )  # fmt: skip
    context = scoring.StepContext([f"D{i}" for i in range(len(lens))], asks, with_holes=set())
    compaction = compact(table, seq_lens, [], BS)
    scorer = scoring.StepScorer.for_step(context, compaction, qsl, np.array(lens), BS, KeyLayout.DT, use_fused=True)
    ours = torch.zeros_like(query)
    scorer.attend_layer(query, engine_seams.key_pages(cache), engine_seams.value_pages(cache), scale, 1.0, ours)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance)


def test_attend_cost_benchmark_measures_the_three_roads():
    from benchmark_scripts import benchmark_script

    with benchmark_script("attend_cost") as bench:
        row = bench.measure(torch.bfloat16, requests=2, keys=100, repeats=2)
        assert row["max_abs_diff"] < 2e-2 and row["equal_elements"] > 0.9
        assert min(row["kernel_ms"], row["kernel_score_ms"], row["attend_ms"]) > 0
        assert "| bfloat16 | 2 x 100 |" in bench.table([row])
