"""Scores reduced over tensor- and pipeline-parallel ranks equal one process's (h2o_vllm/engine/ranks.py).

Four real processes with gloo groups laid out as vLLM lays out TP=2 x PP=2 (global rank
= pp_rank * 2 + tp_rank): each scores its own query and KV heads (TP) of its own layers
(PP) with the worker's StepScorer and KeyNormSums, and reduces through RankReducer. The
result must equal a single process scoring every head of every layer: sums, per-row
maxima, visibility (layers counted once) and key norms, also with a KV head copied to
both TP ranks.
"""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scoring_cases import step_of

from h2o_vllm.engine import key_norms, scoring
from h2o_vllm.engine.compaction import compact
from h2o_vllm.engine.pages import KeyLayout
from h2o_vllm.engine.ranks import RankReducer

BS, HEAD_DIM, LAYERS, TP, PP = 32, 64, 4, 2, 2
# (name, tokens held, query rows this step, first scored position, reduce, holes)
REQUESTS = [("P", 300, 120, 200, "sum", [2]), ("Q", 200, 200, 0, "max", []), ("D", 150, 1, 0, "max", [1])]


def step_inputs(kv_heads: int, heads: int):
    torch.manual_seed(0)
    table, lens, qsl, asks, next_block = step_of(REQUESTS, BS)
    rows = int(qsl[-1])
    pages = torch.randn(next_block, kv_heads, BS * HEAD_DIM)
    queries = [torch.randn(rows, heads, HEAD_DIM) for _ in range(LAYERS)]
    new_keys = [torch.randn(rows, kv_heads, HEAD_DIM) for _ in range(LAYERS)]
    return table, lens, qsl, asks, pages, queries, new_keys


def score(kv_heads, heads, kv_part, head_part, layers, reducer, use_fused):
    """One rank's step: its heads of its layers, reduced by ``reducer`` (None: everything, one process)."""
    table, lens, qsl, asks, pages, queries, new_keys = step_inputs(kv_heads, heads)
    context = scoring.StepContext([r[0] for r in REQUESTS], asks, with_holes={"P", "D"}, key_norms={"P", "D"})
    compaction = compact(table, lens, [0, 2], BS)
    scorer = scoring.StepScorer.for_step(context, compaction, qsl, lens.numpy(), BS, KeyLayout.TD, use_fused)
    norms = key_norms.KeyNormSums.for_step(context, qsl, lens.numpy(), BS)
    for layer in layers:
        scorer.score_layer(queries[layer][:, head_part].contiguous(), pages[:, kv_part].contiguous(), HEAD_DIM**-0.5)
        norms.add_layer(new_keys[layer][:, kv_part])
    return scorer.collect(reducer), norms.collect(reducer)


def rank_main(rank, init_file, out_file, kv_heads, heads, use_fused):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP * PP)
    tp_groups = [dist.new_group([p * TP + t for t in range(TP)]) for p in range(PP)]
    pp_groups = [dist.new_group([p * TP + t for p in range(PP)]) for t in range(TP)]
    pp_rank, tp_rank = divmod(rank, TP)
    replicas = max(1, TP // kv_heads)
    # An earlier stage only sends its part (as in vLLM's workers: RankReducer.for_worker).
    async_groups = [pp_groups[tp_rank]] if pp_rank < PP - 1 else []
    reducer = RankReducer(
        [tp_groups[pp_rank], pp_groups[tp_rank]], [pp_groups[tp_rank]], tp_rank % replicas != 0, async_groups
    )
    kv_per_rank = max(1, kv_heads // TP)
    kv_first = (tp_rank // replicas) * kv_per_rank
    heads_per_rank = heads // TP
    layers = range(pp_rank * LAYERS // PP, (pp_rank + 1) * LAYERS // PP)
    got = score(
        kv_heads,
        heads,
        slice(kv_first, kv_first + kv_per_rank),
        slice(tp_rank * heads_per_rank, (tp_rank + 1) * heads_per_rank),
        layers,
        reducer,
        use_fused,
    )
    if rank == TP * PP - 1:  # vLLM's output rank is TP rank 0 of the last stage; every last-stage rank holds it
        with open(out_file, "wb") as f:
            pickle.dump(got, f)
    reducer.wait()
    dist.destroy_process_group()


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "pytorch"])
@pytest.mark.parametrize("kv_heads, heads", [(2, 6), (1, 4)], ids=["kv-split", "kv-replicated"])
def test_scores_reduced_over_tp_and_pp_equal_one_process(tmp_path, kv_heads, heads, use_fused):
    if use_fused:
        assert scoring.fused.load(), "the fused scoring operator must build on the test machine"
    out_file = tmp_path / "scores.pkl"
    mp.spawn(rank_main, args=(str(tmp_path / "init"), str(out_file), kv_heads, heads, use_fused), nprocs=TP * PP)
    with open(out_file, "rb") as f:
        attention, norms = pickle.load(f)
    want_attention, want_norms = score(
        kv_heads, heads, slice(None), slice(None), range(LAYERS), reducer=None, use_fused=use_fused
    )
    assert attention.keys() == want_attention.keys() == {"P", "Q", "D"}
    for name in want_attention:
        np.testing.assert_array_equal(attention[name].blocks, want_attention[name].blocks)
        np.testing.assert_allclose(attention[name].mass, want_attention[name].mass, rtol=1e-5)
        np.testing.assert_array_equal(attention[name].visibility, want_attention[name].visibility)
    assert norms.keys() == want_norms.keys() == {"P", "D"}
    for name in want_norms:
        np.testing.assert_allclose(norms[name].mass, want_norms[name].mass, rtol=1e-9)
