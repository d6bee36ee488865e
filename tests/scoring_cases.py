"""Shared by the fused-operator tests: one step's requests scored by the fused operator and by PyTorch."""

import numpy as np
import torch

from h2o_vllm.engine import scoring
from h2o_vllm.engine.compaction import compact
from h2o_vllm.engine.messages import ScoreRequest
from h2o_vllm.engine.pages import KeyLayout

DT, TD, AMX = KeyLayout.DT, KeyLayout.TD, KeyLayout.AMX
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# (query dtype, page dtype, key page layout, block size): every dtype in every layout; fp8 pages
# with bfloat16 and float32 queries; 16-token blocks take the generic loops.
OPERATOR_CASES = [
    (torch.float32, torch.float32, DT, 32),
    (torch.bfloat16, torch.bfloat16, DT, 32),
    (torch.float16, torch.float16, DT, 32),
    (torch.float32, torch.float32, TD, 32),
    (torch.bfloat16, torch.bfloat16, TD, 32),
    (torch.float16, torch.float16, TD, 32),
    (torch.float32, torch.float32, AMX, 32),
    (torch.bfloat16, torch.bfloat16, AMX, 32),
    (torch.float16, torch.float16, AMX, 32),
    (torch.bfloat16, E4M3, DT, 32),
    (torch.float32, E5M2, DT, 32),
    (torch.bfloat16, E5M2, AMX, 32),
    (torch.float32, E4M3, AMX, 32),
    (torch.float32, torch.float32, TD, 16),
    (torch.bfloat16, torch.bfloat16, DT, 16),
    (torch.bfloat16, torch.bfloat16, AMX, 16),
]
CASE_IDS = [f"{str(q)[6:]}-{str(k)[6:]}-{layout.name}-{bs}" for q, k, layout, bs in OPERATOR_CASES]


def step_of(requests, block_size):
    """One step's block table, lengths, query start offsets, score requests and blocks used, for
    requests given as (name, tokens held before holes, query rows, first scored position, reduce, holes);
    each request's blocks follow the last one's from block 1 (0 is vLLM's null block: a hole)."""
    width = max(-(-n // block_size) for _, n, *_ in requests)
    table = torch.zeros(len(requests), width, dtype=torch.int32)
    lens, qsl, asks, next_block = [], [0], {}, 1
    for i, (name, n, rows, first, reduce, holes) in enumerate(requests):
        blocks = -(-n // block_size)
        table[i, :blocks] = torch.arange(next_block, next_block + blocks)
        table[i, holes] = 0
        next_block += blocks
        lens.append(n)
        qsl.append(qsl[-1] + rows)
        asks[name] = ScoreRequest(first, reduce)
    return table, torch.tensor(lens, dtype=torch.int32), torch.tensor(qsl, dtype=torch.int32), asks, next_block


def assert_fused_equals_pytorch(dtype, page_dtype, layout, block_size, op=None):
    """Long prompt chunks (more rows than one tile and than SCORE_CHUNK_ROWS), holes, GQA,
    mixed reductions and decodes: the fused operator (``op``: a given build's, else the
    default one's) gives the PyTorch path's scores."""
    torch.manual_seed(1)
    kv_heads, heads, head_dim, num_blocks = 3, 9, 64, 96
    pages = torch.randn(num_blocks, kv_heads, 2, block_size * head_dim).to(page_dtype)[:, :, 0]
    # (name, tokens held before holes, query rows this step, first scored position, reduce, holes)
    requests = [
        ("P", 700, 300, 400, "sum", [2, 5]),
        ("Q", 333, 333, 0, "max", []),
        ("D1", 200, 1, 0, "sum", [1]),
        ("D2", 150, 1, 0, "max", [0, 3]),
    ]
    table, lens, qsl, asks, _ = step_of(requests, block_size)
    context = scoring.StepContext([r[0] for r in requests], asks, with_holes={"P", "D1", "D2"})
    compaction = compact(table, lens, [0, 2, 3], block_size)
    queries = [torch.randn(int(qsl[-1]), heads, head_dim).to(dtype) for _ in range(3)]
    scores = {}
    for use_fused in (True, False):
        scorer = scoring.StepScorer.for_step(context, compaction, qsl, lens.numpy(), block_size, layout, use_fused)
        if use_fused and op is not None:
            scorer.fused_batch.op = op
        for query in queries:
            scorer.score_layer(query, pages, head_dim**-0.5)
        scores[use_fused] = scorer.collect()
    for name, *_ in requests:
        fast, slow = scores[True][name], scores[False][name]
        np.testing.assert_array_equal(fast.blocks, slow.blocks)
        np.testing.assert_array_equal(fast.visibility, slow.visibility)
        np.testing.assert_allclose(fast.mass, slow.mass, rtol=2e-5, atol=1e-7)
        assert fast.mass.min() > 0
