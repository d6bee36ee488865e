"""Worker-side pieces of paged H2O against brute force: hole compaction and block scores.

Keys are written into pages by vLLM's own CPU kernel, so the page layout is the real one.
"""

import numpy as np
import pytest
import torch
from scoring_cases import CASE_IDS, OPERATOR_CASES, assert_fused_equals_pytorch

from h2o_vllm.engine import scoring
from h2o_vllm.engine.compaction import compact
from h2o_vllm.engine.messages import ScoreRequest

BS, KV_HEADS, HEADS, HEAD_DIM = 32, 2, 6, 64


def test_compact_drops_holes_and_shortens_only_those_rows():
    table = torch.tensor([[5, 0, 7, 9, 12], [3, 4, 6, 0, 0], [8, 0, 0, 2, 11]], dtype=torch.int32)
    lens = torch.tensor([4 * BS + 3, 3 * BS, 5 * BS], dtype=torch.int32)
    out = compact(table, lens, rows=[0, 2], block_size=BS)
    assert out.block_table[0].tolist() == [5, 7, 9, 12, 0] and out.seq_lens[0] == 3 * BS + 3
    assert out.block_table[1].tolist() == [3, 4, 6, 0, 0] and out.seq_lens[1] == 3 * BS
    assert out.block_table[2, :3].tolist() == [8, 2, 11] and out.seq_lens[2] == 3 * BS
    assert out.kept_blocks[0].tolist() == [0, 2, 3, 4] and out.kept_blocks[2].tolist() == [0, 3, 4]
    assert table[0].tolist() == [5, 0, 7, 9, 12] and lens[0] == 4 * BS + 3  # inputs untouched


# How vLLM writes the pages: (model dtype, ISA, --kv-cache-dtype). 'vec' is every x86 CPU's kernel;
# 'amx' the one vLLM picks for bfloat16 on AMX Xeons; fp8 caches are AVX-512/AMX only.
CACHES = [
    (torch.float32, "vec", "auto"),
    (torch.bfloat16, "vec", "auto"),
    (torch.bfloat16, "amx", "auto"),
    (torch.bfloat16, "vec", "fp8_e4m3"),
    (torch.float32, "vec", "fp8_e5m2"),
    (torch.bfloat16, "amx", "fp8"),
]
K_SCALE = 0.0625  # fp8 caches: the layer's key scale (a power of two, so scaled fp8 keys stay exact)


def write_keys(k, key_cache, value_cache, slots, isa, cache_dtype):
    """Keys into pages by vLLM's own kernel; where this CPU's vLLM build refuses ``isa`` or fp8
    (an AVX2 machine has neither amx nor fp8 kernels, and vLLM never picks them there), by the
    layout as read from vLLM's source (pages.KeyLayout), so the reader is still checked."""
    from vllm import _custom_ops as ops

    from h2o_vllm.engine.pages import KeyLayout, page_dtype

    try:
        ops.cpu_attn_reshape_and_cache(
            k, k, key_cache, value_cache, slots, isa, k_scale=K_SCALE, v_scale=1.0, kv_cache_dtype=cache_dtype
        )
        return "vllm"
    except RuntimeError:
        pass
    fp8 = page_dtype(cache_dtype)
    layout = KeyLayout.AMX if isa == "amx" else KeyLayout.DT
    pages = key_cache.view(-1, BS * HEAD_DIM) if fp8 is None else key_cache.view(fp8).view(-1, BS * HEAD_DIM)
    values = k if fp8 is None else (k.float() / K_SCALE).to(fp8)
    for token, slot in enumerate(slots.tolist()):
        block, t = divmod(slot, BS)
        for head in range(KV_HEADS):
            page = pages[block * KV_HEADS + head]  # (a strided view: the K page of each block and head)
            for d in range(HEAD_DIM):
                at = (
                    d * BS + t
                    if layout is KeyLayout.DT
                    else (t // 16) * 16 * HEAD_DIM + (d // 2) * 32 + (t % 16) * 2 + d % 2
                )
                page[at] = values[token, head, d]
    return "python"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pytorch"])
@pytest.mark.parametrize("dtype,isa,cache_dtype", CACHES, ids=[f"{str(d)[6:]}-{i}-{c}" for d, i, c in CACHES])
@pytest.mark.parametrize("score_max", [set(), {"A", "B"}, {"A", "B", "C"}], ids=["sum", "max-for-A-B", "max-for-all"])
def test_step_scores_equal_brute_force_softmax(dtype, isa, cache_dtype, score_max, fused):
    """Pages written as vLLM writes them for each ISA and cache dtype; scores equal brute force
    over the same keys (fp8: keys that fp8 times the key scale holds exactly, in the model's dtype)."""
    import types

    from h2o_vllm.engine.pages import KeyLayout, page_dtype
    from h2o_vllm.patches import engine_seams

    torch.manual_seed(0)
    num_blocks = 16
    fp8 = page_dtype(cache_dtype)
    kv_cache = torch.zeros(num_blocks, KV_HEADS, BS, 2 * HEAD_DIM, dtype=dtype if fp8 is None else torch.uint8)
    key_cache, value_cache = kv_cache.view(num_blocks, KV_HEADS, 2 * BS, HEAD_DIM).chunk(2, dim=2)
    # Request A: logical blocks 0..4 in physical 3,0(hole),5,6,7 with 150 tokens; it decodes one token.
    # Request B: 2 blocks (9, 10), 40 tokens, a 40-token prompt chunk of which the last 10 rows are scored.
    # Request C: 2 blocks (11, 12), 50 tokens, decoding: batched with A, padded to A's width.
    layouts = {"A": ([3, 0, 5, 6, 7], 150), "B": ([9, 10], 40), "C": ([11, 12], 50)}
    keys, writers = {}, set()
    for name, (phys, n) in layouts.items():
        k = torch.randn(n, KV_HEADS, HEAD_DIM)
        k = k.to(dtype) if fp8 is None else (k.to(fp8).float() * K_SCALE).to(dtype)
        keys[name] = k
        slots = torch.tensor([phys[t // BS] * BS + t % BS for t in range(n)])
        held = torch.tensor([phys[t // BS] != 0 for t in range(n)])
        writers.add(write_keys(k[held], key_cache, value_cache, slots[held], isa, cache_dtype))
    table = torch.tensor([[3, 0, 5, 6, 7], [9, 10, 0, 0, 0], [11, 12, 0, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([150, 40, 50], dtype=torch.int32)
    layer_queries = [torch.randn(1 + 40 + 1, HEADS, HEAD_DIM).to(dtype) for _ in range(2)]  # two layers
    qsl = torch.tensor([0, 1, 41, 42], dtype=torch.int32)
    first = {"A": 0, "B": 30, "C": 0}
    asks = {name: ScoreRequest(row, "max" if name in score_max else "sum") for name, row in first.items()}
    context = scoring.StepContext(["A", "B", "C"], asks, with_holes={"A"})
    compaction = compact(table, lens, [0], BS)
    if writers == {"vllm"}:
        layout = engine_seams.detect_key_layout(isa, dtype, HEAD_DIM, BS, cache_dtype)
    else:  # this vLLM build has no such kernel: the layout the python writer used
        layout = KeyLayout.AMX if isa == "amx" else KeyLayout.DT
    assert layout is (KeyLayout.AMX if isa == "amx" else KeyLayout.DT)
    impl = types.SimpleNamespace(scale=HEAD_DIM**-0.5, kv_cache_dtype=cache_dtype)
    layer = types.SimpleNamespace(_k_scale_float=K_SCALE)
    if fused:
        assert scoring.fused.load(), "the fused scoring operator must build on the test machine"
    scorer = scoring.StepScorer.for_step(context, compaction, qsl, lens.numpy(), BS, layout, use_fused=fused)
    assert isinstance(scorer, scoring.FusedScorer) == fused
    scale = HEAD_DIM**-0.5
    for query in layer_queries:  # two layers (same keys, other queries): scores combine over layers
        scorer.score_layer(query, *engine_seams.scored_key_pages(impl, layer, kv_cache))
    got = scorer.collect()

    def brute(name, q_rows, q_positions, blocks):
        """Sum over layers, heads and queries; or, for score_max, each query's best (layer, head), summed."""
        k, n = keys[name].float(), layouts[name][1]
        held = [t for t in range(n) if t // BS in blocks]
        mass = torch.zeros(max(blocks) + 1, dtype=torch.float64)
        for row, pos in zip(range(q_rows.start, q_rows.stop), q_positions):
            per_head = []  # [layer * head] block mass of this query
            for query in layer_queries:
                q = query[row].float()
                for h in range(HEADS):
                    visible = [t for t in held if t <= pos]
                    logits = torch.stack([q[h] @ k[t, h // (HEADS // KV_HEADS)] for t in visible]) * scale
                    head_mass = torch.zeros_like(mass)
                    for t, p in zip(visible, torch.softmax(logits, 0)):
                        head_mass[t // BS] += float(p)
                    per_head.append(head_mass)
            per_head = torch.stack(per_head)
            mass += per_head.amax(dim=0) if name in score_max else per_head.sum(dim=0)
        return mass[blocks].numpy()

    assert got["A"].blocks.tolist() == [0, 2, 3, 4]
    np.testing.assert_allclose(got["A"].mass, brute("A", slice(0, 1), [149], [0, 2, 3, 4]), rtol=1e-4)
    assert len(scorer.decodes) == 2 and len(scorer.prompts) == 1
    np.testing.assert_allclose(got["C"].mass, brute("C", slice(41, 42), [49], [0, 1]), rtol=1e-4)
    assert got["B"].blocks.tolist() == [0, 1]
    np.testing.assert_allclose(got["B"].mass, brute("B", slice(31, 41), range(30, 40), [0, 1]), rtol=1e-4)
    # Visibility: B's 10 scored rows (positions 30..39) each see tokens 0..pos; 2 layers.
    expected_b = 2 * np.array(
        [sum(t <= p for p in range(30, 40) for t in range(b * BS, min(40, (b + 1) * BS))) for b in (0, 1)]
    )
    np.testing.assert_array_equal(got["B"].visibility, expected_b)


@pytest.mark.parametrize("dtype,page_dtype,layout,block_size", OPERATOR_CASES, ids=CASE_IDS)
def test_fused_operator_equals_the_pytorch_path(dtype, page_dtype, layout, block_size):
    assert scoring.fused.load(), "the fused scoring operator must build on the test machine"
    assert_fused_equals_pytorch(dtype, page_dtype, layout, block_size)
