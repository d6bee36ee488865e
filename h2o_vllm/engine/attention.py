"""CPU attention with holes and scores: vLLM's CPU backend, one builder and one impl wrapped.

Registered in place of ``CPU_ATTN`` by the H2O worker only, so a vanilla engine in
the same environment never sees it. The kernel itself is untouched: the builder
hands it a block table without holes and shorter sequence lengths (cached keys
are already rotated, so RoPE does not care which tokens are missing), and the
impl scores after the kernel ran, and sums the new keys' norms for key-norm requests.
On a step of decodes that all evicted before (:func:`attends_itself`), the fused
operator attends and scores in one pass instead of vLLM's kernel then the scorer.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from h2o_vllm.engine import scoring
from h2o_vllm.engine.compaction import compact
from h2o_vllm.engine.key_norms import KeyNormSums
from h2o_vllm.engine.pages import KeyLayout
from h2o_vllm.patches import engine_seams

SCORER_ATTR = "h2o_scorer"  # on the attention metadata: the step's scorer, read by every layer
KEY_NORMS_ATTR = "h2o_key_norms"  # likewise: the step's KeyNormSums


class H2OCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    h2o_step: scoring.StepContext | None = None  # set by the H2O model runner before each step

    def __init__(self, spec, layer_names, vllm_config, device):
        super().__init__(spec, layer_names, vllm_config, device)
        # Before any page is written: an ISA whose pages H2O cannot read is switched to vLLM's vec kernels.
        self.h2o_key_layout = engine_seams.attention_builder_key_layout(self, layer_names)
        # Build (or find) the fused operator now, at start-up, not in the first request's step (a fresh
        # CPU compiles it for up to a minute); it logs what it runs, or why PyTorch scores instead.
        scoring.fused.load()

    def begin_step(self, context: scoring.StepContext | None) -> None:
        self.h2o_step = context

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        step = self.h2o_step
        cm = common_attn_metadata
        if step is None or (not step.with_holes and not step.score_requests and not step.key_norms):
            return super().build(common_prefix_len, cm, fast_build)
        num_reqs = cm.num_reqs
        block_size = engine_seams.attention_builder_block_size(self)
        logical_lens = cm.seq_lens[:num_reqs].numpy().copy()
        rows = [i for i, r in enumerate(step.req_ids[:num_reqs]) if r in step.with_holes]
        compaction = compact(cm.block_table_tensor, cm.seq_lens, rows, block_size)
        if rows:
            cm = cm.replace(
                block_table_tensor=compaction.block_table,
                seq_lens=compaction.seq_lens,
                max_seq_len=int(compaction.seq_lens[:num_reqs].max()),
                seq_lens_cpu_upper_bound=compaction.seq_lens,
            )
        metadata = super().build(common_prefix_len, cm, fast_build)
        if step.score_requests:
            step.scorer = scoring.StepScorer.for_step(
                step, compaction, cm.query_start_loc_cpu, logical_lens, block_size, self.h2o_key_layout
            )
            if step.scorer is not None:
                step.scorer.attends = attends_itself(step, step.scorer, num_reqs, cm.num_actual_tokens)
            setattr(metadata, SCORER_ATTR, step.scorer)
        if step.key_norms:
            step.key_norm_sums = KeyNormSums.for_step(step, cm.query_start_loc_cpu, logical_lens, block_size)
            setattr(metadata, KEY_NORMS_ATTR, step.key_norm_sums)
        return metadata


def attends_itself(step: scoring.StepContext, scorer: scoring.StepScorer, num_reqs: int, num_tokens: int) -> bool:
    """Whether the step's scorer attends in place of vLLM's kernel (``attend_layer``: the scores and the
    output from one pass over the keys): the fused operator's, on key pages it reads as K^T, for a step of
    decodes only, each scored and each with holes. A request that never evicted keeps vLLM's kernel, so with
    a budget at least the sequence the tokens stay vanilla vLLM's bit for bit."""
    return (
        isinstance(scorer, scoring.FusedScorer)
        and scorer.key_layout is KeyLayout.DT
        and not scorer.prompts
        and len(scorer.decodes) == num_reqs == num_tokens
        and all(d.req_id in step.with_holes for d in scorer.decodes)
    )


class H2OCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        scorer = getattr(attn_metadata, SCORER_ATTR, None) if attn_metadata is not None else None
        if (
            scorer is not None
            and scorer.attends
            and output_scale is None
            and engine_seams.attention_is_plain(self, layer)
        ):
            n = attn_metadata.num_actual_tokens
            pages, scale = engine_seams.scored_key_pages(self, layer, kv_cache)
            out = output[:n].view(n, query.shape[1], query.shape[2])
            scorer.attend_layer(query[:n], pages, engine_seams.value_pages(kv_cache), scale, 1.0, out)
        else:
            output = super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
            if scorer is not None:
                scorer.score_layer(query, *engine_seams.scored_key_pages(self, layer, kv_cache))
        if attn_metadata is None:
            return output
        key_norms = getattr(attn_metadata, KEY_NORMS_ATTR, None)
        if key_norms is not None and key is not None:  # the keys this layer writes (rotated, as cached)
            key_norms.add_layer(key)
        return output


class H2OCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return H2OCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls():
        return H2OCPUAttentionMetadataBuilder


def register() -> None:
    """Make CPU_ATTN resolve to the H2O backend in this process (also after a vanilla engine ran in it)."""
    engine_seams.override_cpu_attention_backend(f"{__name__}.H2OCPUAttentionBackend")
