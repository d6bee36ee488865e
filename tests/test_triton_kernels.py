"""The Triton kernels of h2o_vllm.kernels (triton_scoring, triton_jit) against their PyTorch references.

- On CPU, always: each reference against an independent computation (block mass:
  a plain softmax over the gathered keys; compaction: the CPU engine's
  ``compaction.compact``), and the module importing without Triton.
- On a CUDA GPU: each kernel against its reference (GQA and MQA, partial last
  blocks, holes, several requests of different lengths, float16 and bfloat16
  caches in vLLM's strided FlashAttention layout, accumulation over layers), and
  both kernels captured in one CUDA graph and replayed on new inputs.
- On CPU through Triton's interpreter: the same kernel checks on small shapes, in
  a subprocess started with ``TRITON_INTERPRET=1`` (it must be set before Triton
  is imported), so CI exercises the kernels without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from h2o_vllm.kernels import triton_jit
from h2o_vllm.kernels import triton_scoring as ts

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = ts.TRITON_AVAILABLE and torch.cuda.is_available() and not INTERPRETED

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU and Triton")


def case(heads: int, kv_heads: int, head_dim: int, block_size: int, *reqs: tuple[int, int, int, int]) -> dict:
    """A batch's shapes. A request: (tokens held before compaction, query rows this step, rows scored, holes).

    Holes are whole blocks before the step's first query row, as the policy makes them.
    """
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, reqs=list(reqs))


CASES = {
    # MHA decodes: one key, a block exactly full, partial last blocks, one request not scored.
    "decodes_mha": case(4, 4, 64, 16, (1, 1, 1, 0), (16, 1, 1, 0), (40, 1, 1, 1), (57, 1, 0, 2), (33, 1, 1, 0)),
    # GQA (4 query heads per KV head): a prompt chunk, a decode, a chunk's last rows, a padded slot.
    "mixed_gqa": case(8, 2, 128, 16, (50, 50, 50, 0), (70, 1, 1, 2), (100, 20, 8, 3), (0, 0, 0, 0)),
    # The CPU engine's block size, GQA group 2, a chunk continuing after holes.
    "block32_gqa": case(6, 3, 64, 32, (200, 37, 37, 3), (65, 1, 1, 1), (31, 31, 5, 0)),
    # One request (a long prompt chunk, every row scored), MHA.
    "one_prompt": case(2, 2, 64, 16, (300, 300, 300, 0)),
    # MQA (one KV head for 16 query heads), head_dim not a power of two.
    "mqa": case(16, 1, 80, 16, (90, 10, 10, 2), (17, 1, 1, 0)),
}
# Small enough for Triton's interpreter (about a second each on one core).
INTERPRETER_CASES = {
    "decodes_mha": case(2, 2, 16, 16, (1, 1, 1, 0), (16, 1, 1, 0), (40, 1, 1, 1), (33, 1, 0, 0)),
    "mixed_gqa": case(4, 2, 32, 16, (20, 20, 20, 0), (50, 6, 3, 1), (0, 0, 0, 0)),
}


@dataclass
class Batch:
    """One step's inputs as vLLM's FlashAttention path holds them, plus the holed table they came from."""

    q: torch.Tensor  # [tokens, heads, head_dim]
    lse: torch.Tensor  # [heads, tokens], float32, as FlashAttention returns it
    key_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim], strided as in vLLM
    holed_table: torch.Tensor  # [reqs, width] int32, with holes (0)
    logical_lens: torch.Tensor  # [reqs] int32, holes counted
    block_table: torch.Tensor  # compacted
    seq_lens: torch.Tensor  # compacted
    query_start_loc: torch.Tensor
    scored_start_loc: torch.Tensor
    scale: float

    @property
    def num_rows(self) -> int:
        return int(self.scored_start_loc[-1])

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed sum and max buffers (with a spare column to check nothing is written past a request's blocks)."""
        width = self.block_table.shape[1] + 1
        device = self.q.device
        return torch.zeros(len(self.seq_lens), width, device=device), torch.zeros(self.num_rows, width, device=device)

    def args(self):
        return (
            self.q,
            self.lse,
            self.key_cache,
            self.block_table,
            self.seq_lens,
            self.query_start_loc,
            self.scored_start_loc,
            self.scale,
        )

    def to(self, device) -> Batch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        moved["key_cache"] = vllm_key_view(self.key_cache.contiguous().to(device))
        return Batch(**moved)


def vllm_key_view(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` [blocks, block_size, kv_heads, d] placed in a [blocks, kv_heads, block_size, 2 * d] cache, viewed back as vLLM 0.32 does."""
    blocks, block_size, kv_heads, d = keys.shape
    cache = torch.zeros(blocks, kv_heads, block_size, 2 * d, dtype=keys.dtype, device=keys.device)
    view = cache.transpose(1, 2).split(d, dim=-1)[0]
    view.copy_(keys)
    return view


def make_batch(case: dict, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Batch:
    """Random queries, keys and block tables for ``case``'s requests; the log-sum-exp from :func:`brute_force`."""
    gen = torch.Generator().manual_seed(seed)
    bs, reqs = case["block_size"], case["reqs"]
    blocks_per_req = [ts.cdiv(n, bs) for n, *_ in reqs]
    width = max(blocks_per_req) + 2
    num_blocks = sum(blocks_per_req) + 5
    physical = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 is vLLM's null block
    table = torch.zeros(len(reqs), width, dtype=torch.int32)
    for r, ((length, q_len, _, holes), n) in enumerate(zip(reqs, blocks_per_req)):
        table[r, :n] = torch.tensor([physical.pop() for _ in range(n)], dtype=torch.int32)
        before_chunk = (length - q_len) // bs  # blocks wholly before the first query row
        assert holes <= before_chunk, "holes precede the step's query rows"
        if holes:
            table[r, torch.randperm(before_chunk, generator=gen)[:holes]] = 0
    logical = torch.tensor([r[0] for r in reqs], dtype=torch.int32)
    compacted, lens = ts.compact_block_tables_reference(
        table, logical, bs, torch.empty_like(table), torch.empty_like(logical)
    )
    qsl = torch.tensor(np.cumsum([0] + [r[1] for r in reqs]), dtype=torch.int32)
    ssl = torch.tensor(np.cumsum([0] + [r[2] for r in reqs]), dtype=torch.int32)
    heads, kv_heads, d = case["heads"], case["kv_heads"], case["head_dim"]
    q = torch.randn(int(qsl[-1]), heads, d, generator=gen).to(dtype)
    keys = torch.randn(num_blocks, bs, kv_heads, d, generator=gen).to(dtype)
    batch = Batch(q, torch.empty(heads, len(q)), keys, table, logical, compacted, lens, qsl, ssl, d**-0.5)
    batch.lse = brute_force(batch)[0]
    return batch.to(device)


def brute_force(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of every query row over its visible keys by a full softmax, from the holed table.

    Returns the log-sum-exp [heads, tokens] (what FlashAttention returns) and the
    scored rows' block mass reduced both ways: summed [reqs, width + 1], and per
    row the largest head's [rows, width + 1].
    """
    heads, bs = batch.q.shape[1], batch.key_cache.shape[1]
    group = heads // batch.key_cache.shape[2]
    lse = torch.full((heads, batch.q.shape[0]), float("nan"))
    sums, maxes = (t.cpu() for t in batch.outputs())
    qsl, ssl = batch.query_start_loc.tolist(), batch.scored_start_loc.tolist()
    for r, length in enumerate(batch.logical_lens.tolist()):
        q_start, q_end = qsl[r], qsl[r + 1]
        if q_end == q_start:
            continue
        ids = [b for b in batch.holed_table[r, : ts.cdiv(length, bs)].tolist() if b != 0]
        num_keys = length - (ts.cdiv(length, bs) - len(ids)) * bs
        keys = batch.key_cache[ids].float().cpu().flatten(0, 1)[:num_keys].repeat_interleave(group, dim=1)
        logits = torch.einsum("thd,khd->htk", batch.q[q_start:q_end].float().cpu(), keys) * batch.scale
        first = num_keys - (q_end - q_start)  # position of the first query row among the kept keys
        hidden = torch.arange(num_keys)[None, :] > torch.arange(first, num_keys)[:, None]
        logits = logits.masked_fill(hidden, float("-inf"))  # [heads, rows, keys]
        lse[:, q_start:q_end] = torch.logsumexp(logits, dim=-1)
        num_scored = ssl[r + 1] - ssl[r]
        if num_scored == 0:
            continue
        probs = torch.softmax(logits[:, -num_scored:], dim=-1)  # [heads, scored rows, keys]
        blocks = len(ids)
        per_block = torch.zeros(heads, num_scored, blocks * bs)
        per_block[..., :num_keys] = probs
        mass = per_block.view(heads, num_scored, blocks, bs).sum(-1)
        sums[r, :blocks] = mass.sum(dim=(0, 1))
        maxes[ssl[r] : ssl[r + 1], :blocks] = mass.amax(dim=0)
    return lse, sums, maxes


def second_layer(batch: Batch, seed: int) -> Batch:
    """The same step's next layer: new queries and keys, the same tables."""
    gen = torch.Generator().manual_seed(seed)
    other = Batch(**vars(batch))
    other.q = torch.randn(batch.q.shape, generator=gen).to(batch.q.dtype).to(batch.q.device)
    keys = torch.randn(batch.key_cache.shape, generator=gen).to(batch.key_cache.dtype)
    other.key_cache = vllm_key_view(keys.to(batch.q.device))
    cpu = other.to("cpu")
    other.lse = brute_force(cpu)[0].to(batch.q.device)
    return other


# ---------------------------------------------------------------------------
# References, on CPU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_block_mass_reference_equals_full_softmax(name, dtype):
    batch = make_batch(CASES[name], dtype, seed=1)
    _, expected_sum, expected_max = brute_force(batch)
    sums, maxes = batch.outputs()
    ts.block_mass_reference(*batch.args(), sums, maxes)
    torch.testing.assert_close(sums, expected_sum, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maxes, expected_max, rtol=1e-4, atol=1e-5)
    # Every scored (row, head) spreads a mass of 1 over the blocks it sees.
    rows = (batch.scored_start_loc[1:] - batch.scored_start_loc[:-1]).float()
    torch.testing.assert_close(sums.sum(dim=1), rows * batch.q.shape[1], rtol=1e-4, atol=1e-4)


def test_block_mass_reference_accumulates_over_layers():
    batch = make_batch(CASES["mixed_gqa"], torch.float16, seed=2)
    layer2 = second_layer(batch, seed=3)
    sums, maxes = batch.outputs()
    for layer in (batch, layer2):
        ts.block_mass_reference(*layer.args(), sums, maxes)
    _, sum1, max1 = brute_force(batch)
    _, sum2, max2 = brute_force(layer2)
    torch.testing.assert_close(sums, sum1 + sum2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maxes, torch.maximum(max1, max2), rtol=1e-4, atol=1e-5)


def random_holed_tables(seed: int, rows: int = 9, width: int = 600, block_size: int = 16):
    """Rows of every kind: no holes, many, all but the last block, empty (padding), wider than one kernel chunk."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(1, 10_000, (rows, width), generator=gen, dtype=torch.int32)
    lens = torch.randint(1, width * block_size, (rows,), generator=gen, dtype=torch.int32)
    lens[0], lens[1], lens[2] = 0, block_size * 3, width * block_size  # padding, exactly full, the whole width
    for r in range(rows):
        blocks = ts.cdiv(int(lens[r]), block_size)
        if blocks > 1 and r % 3:
            holes = torch.rand(blocks - 1, generator=gen) < (0.9 if r % 3 == 1 else 0.2)
            table[r, : blocks - 1][holes] = 0  # never the last, partly written block
    table[3, : ts.cdiv(int(lens[3]), block_size) - 1] = 0
    return table, lens


def test_compaction_reference_equals_cpu_engine():
    from h2o_vllm.engine.compaction import compact

    table, lens = random_holed_tables(seed=4)
    out_table, out_lens, kept = torch.full_like(table, -7), torch.zeros_like(lens), torch.zeros_like(table)
    got_table, got_lens = ts.compact_block_tables_reference(table, lens, 16, out_table, out_lens, kept)
    expected = compact(table.clone(), lens.clone(), list(range(len(table))), 16)
    for r in range(len(table)):
        blocks = ts.cdiv(int(lens[r]), 16)
        assert torch.equal(got_table[r, :blocks], expected.block_table[r, :blocks])
        assert torch.equal(got_table[r, blocks:], torch.zeros_like(got_table[r, blocks:]))
        assert kept[r, : len(expected.kept_blocks[r])].tolist() == expected.kept_blocks[r].tolist()
    assert torch.equal(got_lens, expected.seq_lens)


def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from h2o_vllm.kernels import triton_scoring as ts\n"
        "assert not ts.TRITON_AVAILABLE\n"
        "import torch\n"
        "t = torch.tensor([[3, 0, 5]], dtype=torch.int32); n = torch.tensor([40], dtype=torch.int32)\n"
        "out, lens = ts.compact_block_tables_reference(t, n, 16, torch.empty_like(t), torch.empty_like(n))\n"
        "assert out.tolist() == [[3, 5, 0]] and lens.tolist() == [24]\n"
        "try:\n    ts.compact_block_tables(t, n, 16, torch.empty_like(t), torch.empty_like(n))\n"
        "except RuntimeError:\n    pass\nelse:\n    raise AssertionError('no error without Triton')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------
# Kernels against references (on the GPU, or on CPU in Triton's interpreter)
# ---------------------------------------------------------------------------


def check_block_mass(case: dict, dtype: torch.dtype, device: str, **launch) -> None:
    """Both reductions, two layers accumulated, against the reference; also each reduction alone."""
    batch = make_batch(case, dtype, seed=5, device=device)
    layer2 = second_layer(batch, seed=6)
    sums, maxes = batch.outputs()
    ref_sums, ref_maxes = batch.outputs()
    for layer in (batch, layer2):
        ts.block_mass(*layer.args(), sums, maxes, **launch)
        ts.block_mass_reference(*layer.args(), ref_sums, ref_maxes)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(maxes, ref_maxes, rtol=1e-3, atol=1e-5)

    only_sums, only_maxes = batch.outputs()
    ts.block_mass(*batch.args(), sum_out=only_sums, **launch)
    ts.block_mass(*batch.args(), max_out=only_maxes, **launch)
    ref_sums, ref_maxes = batch.outputs()
    ts.block_mass_reference(*batch.args(), ref_sums, ref_maxes)
    torch.testing.assert_close(only_sums, ref_sums, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(only_maxes, ref_maxes, rtol=1e-3, atol=1e-5)


def check_lse_layouts(device: str) -> None:
    """A [tokens, heads] log-sum-exp seen through its transpose gives the same result."""
    batch = make_batch(
        CASES["mixed_gqa"] if device != "cpu" else INTERPRETER_CASES["mixed_gqa"], torch.float16, 7, device
    )
    sums, maxes = batch.outputs()
    ts.block_mass(*batch.args(), sums, maxes)
    batch.lse = batch.lse.t().contiguous().t()
    sums2, maxes2 = batch.outputs()
    ts.block_mass(*batch.args(), sums2, maxes2)
    torch.testing.assert_close(sums2, sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maxes2, maxes, rtol=1e-5, atol=1e-6)


def check_compaction(device: str, seed: int, width: int = 600) -> None:
    """Against the reference, into buffers larger than the table, with out_kept and without."""
    table, lens = random_holed_tables(seed, width=width)
    table, lens = table.to(device), lens.to(device)
    outs = [
        (
            torch.full((12, width + 5), -7, dtype=torch.int32, device=device),
            torch.full((12,), -7, dtype=torch.int32, device=device),
            torch.full((12, width + 5), -7, dtype=torch.int32, device=device),
        )
        for _ in range(2)
    ]
    ts.compact_block_tables(table, lens, 16, *outs[0])
    ts.compact_block_tables_reference(table, lens, 16, *outs[1])
    for got, expected in zip(outs[0], outs[1]):
        assert torch.equal(got, expected)
    out_table, out_lens = torch.zeros_like(table), torch.zeros_like(lens)
    got_table, got_lens = ts.compact_block_tables(table, lens, 16, out_table, out_lens)
    assert torch.equal(got_table, outs[1][0][: len(table), :width]) and torch.equal(got_lens, outs[1][1][: len(table)])


@needs_gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_mass_kernel(name, dtype):
    check_block_mass(CASES[name], dtype, "cuda")


@needs_gpu
@pytest.mark.parametrize("launch", [dict(num_splits=1), dict(num_splits=3, rows_per_tile=4), dict(rows_per_tile=32)])
def test_block_mass_kernel_launch_shapes(launch):
    check_block_mass(CASES["mixed_gqa"], torch.float16, "cuda", **launch)


@needs_gpu
def test_block_mass_kernel_lse_layouts():
    check_lse_layouts("cuda")


@needs_gpu
@pytest.mark.parametrize("seed", [0, 1])
def test_compaction_kernel(seed):
    check_compaction("cuda", seed)


@needs_gpu
def test_kernels_replay_in_cuda_graph():
    """Compaction then scoring, captured once, replayed on new holes, lengths, queries and keys."""
    case = CASES["mixed_gqa"]
    first, second = (make_batch(case, torch.bfloat16, seed=s, device="cuda") for s in (8, 9))
    # Persistent inputs, as vLLM's runner keeps them, and the H2O-owned outputs.
    inputs = Batch(**vars(first))
    inputs.holed_table, inputs.logical_lens = first.holed_table.clone(), first.logical_lens.clone()
    inputs.q, inputs.lse = first.q.clone(), first.lse.clone()
    table, lens = torch.zeros_like(first.holed_table), torch.zeros_like(first.logical_lens)
    sums, maxes = first.outputs()

    def step():
        ts.compact_block_tables(inputs.holed_table, inputs.logical_lens, case["block_size"], table, lens)
        ts.block_mass(
            inputs.q,
            inputs.lse,
            inputs.key_cache,
            table,
            lens,
            inputs.query_start_loc,
            inputs.scored_start_loc,
            inputs.scale,
            sums,
            maxes,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for batch in (first, second):
        inputs.holed_table.copy_(batch.holed_table)
        inputs.logical_lens.copy_(batch.logical_lens)
        inputs.q.copy_(batch.q)
        inputs.lse.copy_(batch.lse)
        inputs.key_cache.copy_(batch.key_cache)
        sums.zero_()
        maxes.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_sums, ref_maxes = batch.outputs()
        ts.block_mass_reference(*batch.args(), ref_sums, ref_maxes)
        assert torch.equal(table, batch.block_table) and torch.equal(lens, batch.seq_lens)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(maxes, ref_maxes, rtol=1e-3, atol=1e-5)


# Collected only in the interpreted process that test_kernels_run_in_triton_interpreter starts
# (elsewhere they would only show up as skipped).
if INTERPRETED and ts.TRITON_AVAILABLE:

    @pytest.mark.parametrize("name", sorted(INTERPRETER_CASES))
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_interpreted_block_mass(name, dtype):
        check_block_mass(INTERPRETER_CASES[name], dtype, "cpu", num_splits=2)

    def test_interpreted_block_mass_launch_shape():
        check_block_mass(INTERPRETER_CASES["mixed_gqa"], torch.float16, "cpu", rows_per_tile=4, num_splits=3)

    def test_interpreted_lse_layouts():
        check_lse_layouts("cpu")

    def test_interpreted_compaction():
        check_compaction("cpu", seed=0, width=300)


def compile_for_cuda(kernel, pointers: dict[str, str], constexprs: dict, capability: int = 90) -> None:
    """Compile ``kernel`` with Triton's CUDA backend down to machine code (ptxas), no GPU needed; other ints are i32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in kernel.arg_names}
    triton_jit.triton.compile(
        ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", capability, 32)
    )


def has_cuda_compiler() -> bool:
    if not ts.TRITON_AVAILABLE or ON_GPU or INTERPRETED:
        return False
    from triton.backends import backends

    return "nvidia" in backends


@pytest.mark.skipif(
    not has_cuda_compiler(), reason="needs Triton's CUDA backend, and no GPU (the GPU tests compile them)"
)
@pytest.mark.parametrize(
    "dtype, group, rows, block_size, head_dim, reductions",
    [
        ("fp16", 4, 4, 16, 128, (True, True)),
        ("bf16", 1, 16, 16, 64, (True, False)),
        ("bf16", 16, 1, 32, 80, (False, True)),
        ("fp32", 2, 8, 16, 64, (True, True)),
    ],
)
def test_kernels_compile_for_hopper(dtype, group, rows, block_size, head_dim, reductions):
    """Without a GPU, the kernels still go through Triton's CUDA compiler (sm_90, an H100/H200), as the GPU would."""
    pointers = {n: "*i32" for n in ("block_table_ptr", "seq_lens_ptr", "query_start_loc_ptr", "scored_start_loc_ptr")}
    pointers |= dict(
        q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", lse_ptr="*fp32", sum_ptr="*fp32", max_ptr="*fp32", scale="fp32"
    )
    constexprs = dict(
        GROUP=group, GROUP_P2=group, ROWS=rows, BLOCK_SIZE=block_size, BLOCK_P2=block_size, HEAD_DIM=head_dim
    )
    constexprs |= dict(HEAD_DIM_P2=ts.next_power_of_2(head_dim), REQS_P2=8, DO_SUM=reductions[0], DO_MAX=reductions[1])
    compile_for_cuda(triton_jit.block_mass_kernel, pointers, constexprs | dict(DOT_FP32=dtype == "fp32"))
    pointers = {n: "*i32" for n in ("table_ptr", "seq_lens_ptr", "out_table_ptr", "out_lens_ptr", "kept_ptr")}
    compile_for_cuda(
        triton_jit.compact_kernel,
        pointers,
        dict(BLOCK_SIZE=block_size, CHUNK=ts.COMPACT_CHUNK, WRITE_KEPT=reductions[1]),
    )


# A loop over a loaded bound, as both kernels have. Triton's interpreter holds scalars as
# one-element arrays and converts them with int(), which NumPy 2.4 and later refuse
# ("only 0-dimensional arrays can be converted to Python scalars"): triton-lang/triton#9171,
# fixed upstream by #9172. Seen with Triton 3.6 and NumPy 2.5 on the H200 machine.
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def count(n_ptr, out_ptr):
    total = 0
    for i in range(0, tl.load(n_ptr)):
        total += 1
    tl.store(out_ptr, total)
n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
count[(1,)](n, out)
assert out.item() == 3, out
"""


@pytest.mark.skipif(INTERPRETED or not ts.TRITON_AVAILABLE, reason="needs Triton; starts the interpreted run itself")
def test_kernels_run_in_triton_interpreter():
    """The ``test_interpreted_*`` tests, in a fresh process where Triton interprets the kernels on CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    probe = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0 and "only 0-dimensional arrays" in probe.stderr:
        pytest.skip(
            f"Triton {triton_jit.triton.__version__}'s interpreter cannot loop to a loaded bound with NumPy "
            f"{np.__version__} (triton-lang/triton#9171); the compiled kernels are tested on the GPU"
        )
    assert probe.returncode == 0, probe.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
