"""Every place where h2o-vllm reaches into vLLM 0.32 internals.

Read from the vLLM 0.32.0 source. ``vllm/...`` paths are files of the installed
package (``python -c "import vllm; print(vllm.__file__)"``); a bare file name is in
the folder last named. The subclasses in ``h2o_vllm/engine/`` only override the
methods listed here and call the functions in this file for everything else;
``patches/request_*.py`` and ``patches/cli_version.py`` hold the rest. An upgrade
re-checks this list against the new source and nothing else, then adds the release
to ``versions.SUPPORTED_VLLM``. That is why this module is long (about 600 lines, a
third of them this list) and stays one: each function is a few lines of vLLM access
with no policy in it, and an upgrade reads one file.

Scheduler side: ``H2OScheduler(Scheduler)`` in h2o_vllm/engine/scheduler.py
  overrides   vllm/v1/core/sched/scheduler.py: ``Scheduler.__init__``, ``schedule``,
              ``update_from_output``, ``finish_requests``, ``add_request`` (public) and
              ``Scheduler._free_request_blocks`` (private: where finishing and
              preemption both give a request's blocks back)
  reads       ``Scheduler.running``, ``.requests``, ``.block_size`` (scheduler.py);
              ``SchedulerOutput.num_scheduled_tokens`` (vllm/v1/core/sched/output.py);
              ``Request.request_id``, ``num_computed_tokens``, ``num_tokens``,
              ``num_prompt_tokens``, ``max_tokens``, ``sampling_params``,
              ``is_finished()`` (vllm/v1/request.py)
  check_single_full_attention_group
              ``KVCacheConfig.kv_cache_groups[i].kv_cache_spec`` (vllm/v1/kv_cache_interface.py)
  request_blocks, resident_blocks, free_as_holes, count_holes, private_blocks, held_blocks, hashed_blocks
              ``Scheduler.kv_cache_manager`` (scheduler.py) -> ``KVCacheManager.coordinator``
              (vllm/v1/core/kv_cache_manager.py) -> ``KVCacheCoordinator.single_type_managers[0]``
              (vllm/v1/core/kv_cache_coordinator.py) -> ``SingleTypeKVCacheManager.req_to_blocks``,
              ``._null_block``, ``.block_pool`` (vllm/v1/core/single_type_kv_cache_manager.py);
              ``BlockPool.free_blocks`` (vllm/v1/core/block_pool.py: drops one reference per
              block); ``KVCacheBlock.ref_cnt``, ``.is_null``, ``.block_id``, ``.block_hash``
              (vllm/v1/core/kv_cache_utils.py)
  prefix_caching_enabled
              ``KVCacheManager.enable_caching`` (kv_cache_manager.py)
  cap_prefix_caching
              ``SingleTypeKVCacheManager.cache_blocks(request, num_tokens, ...)``, which
              ``KVCacheCoordinator.cache_blocks`` calls from ``KVCacheManager.allocate_slots``
              (the one place full-attention blocks are hashed), wrapped on the manager instance
  cap_prefix_hits
              ``KVCacheManager.get_computed_blocks(request) -> (blocks, num_tokens, boundary)`` and
              ``.truncate_computed_blocks`` (kv_cache_manager.py), asked by
              ``Scheduler._get_local_prefix_cache_hit`` (scheduler.py), wrapped on the instance
  gate_admission
              ``SingleTypeKVCacheManager.get_num_blocks_to_allocate(..., apply_admission_cap=True)``,
              which ``KVCacheManager.allocate_slots(full_sequence_must_fit=True)`` calls to admit a
              waiting request (kv_cache_manager.py), wrapped on the scheduler's manager instance
  in_flight   ``Request.num_in_flight_tokens`` (vllm/v1/request.py): raised in
              ``Scheduler._update_after_schedule``, lowered in ``update_from_output`` (scheduler.py)
  hold_request, release_request
              ``Request.next_decode_eligible_step`` (vllm/v1/request.py), against which
              ``Scheduler.schedule`` skips a running request while ``Scheduler.current_step`` is
              below it (scheduler.py; vLLM itself sets it only in ``AsyncScheduler`` and
              ``DiffusionScheduler``, async_scheduler.py and diffusion_scheduler.py, which
              ``H2OScheduler`` does not derive from)
  eager_model
              ``CompilationConfig.mode`` (vllm/config/compilation.py; ``CompilationMode.NONE`` under
              ``--enforce-eager``): ``CPUModelRunner.warming_up_model`` (vllm/v1/worker/cpu_model_runner.py)
              returns at once then, and only its ``profile_run`` -> ``_dummy_run`` allocates
              ``GPUModelRunner.intermediate_tensors``, which a later pipeline stage needs
  data_parallel_engine
              ``ParallelConfig.data_parallel_index`` (vllm/config/parallel.py), which
              ``EngineCoreProc.run_engine_core`` (vllm/v1/engine/core.py) sets to the engine's DP rank
              before ``reconfigure_for_independent_dp_rank`` makes a dense engine DP=1
  num_free_blocks, num_total_blocks, blocks_in_use, cached_free_blocks
              ``KVCacheManager.block_pool``; ``BlockPool.get_num_free_blocks()``,
              ``.num_gpu_blocks``, ``.blocks``, ``.null_block`` (the pool's first block, never a request's)
  inprocess_scheduler, shutdown_llm (tests and benchmarks, h2o_vllm/engine/observe.py)
              ``LLM.llm_engine`` (vllm/entrypoints/llm.py) -> ``LLMEngine.engine_core``
              (vllm/v1/engine/llm_engine.py) -> ``InprocClient.engine_core``, ``.shutdown()``
              (vllm/v1/engine/core_client.py) -> ``EngineCore.scheduler`` (vllm/v1/engine/core.py)

Worker side: ``H2OCPUWorker(CPUWorker)`` and ``H2OCPUModelRunner(CPUModelRunner)`` in
h2o_vllm/engine/worker.py
  overrides   vllm/v1/worker/cpu_worker.py: ``CPUWorker.__init__``, ``init_device``;
              vllm/v1/worker/gpu_model_runner.py (inherited by ``CPUModelRunner``,
              vllm/v1/worker/cpu_model_runner.py): ``GPUModelRunner._update_states``
              (private: where the runner applies a ``SchedulerOutput`` to its batch),
              ``sample_tokens`` and ``get_kv_cache_spec`` (public; the latter gives the layer
              specs the engine core sizes the pool from)
  reads       ``SchedulerOutput.finished_req_ids``, ``preempted_req_ids``,
              ``scheduled_cached_reqs.resumed_req_ids`` (vllm/v1/core/sched/output.py);
              ``ModelRunnerOutput``, ``EMPTY_MODEL_RUNNER_OUTPUT`` (vllm/v1/outputs.py)
  budgeted_specs
              ``FullAttentionSpec`` and its dataclass fields (vllm/v1/kv_cache_interface.py);
              h2o_vllm/engine/kv_spec.py subclasses it, overriding ``max_memory_usage_bytes``
              (read by ``get_kv_cache_configs`` in vllm/v1/core/kv_cache_utils.py for the
              start-up check); ``KVCacheSpecRegistry.get_manager_class`` finds its manager
              through the class's bases (vllm/v1/kv_cache_spec_registry.py)
  adopt_model_runner_class
              ``CPUWorker.init_device`` builds ``self.model_runner = CPUModelRunner(...)``
              (cpu_worker.py); we switch that object's class to our subclass
  punch_worker_holes
              ``runner.requests[req_id].block_ids`` (``CachedRequestState``,
              vllm/v1/worker/gpu_input_batch.py), ``runner.input_batch.req_id_to_index``
              (``InputBatch``, gpu_input_batch.py), ``input_batch.block_table[0].block_table.np``
              (``MultiGroupBlockTable.__getitem__`` -> ``BlockTable.block_table``, a
              ``CpuGpuBuffer``; vllm/v1/worker/block_table.py)
  batch_req_ids
              ``InputBatch.req_ids`` (gpu_input_batch.py)
  total_kv_heads
              ``GPUModelRunner.model_config`` -> ``ModelConfig.get_total_num_kv_heads()``
              (vllm/config/model.py); h2o_vllm/engine/ranks.py reduces over
              ``vllm.distributed.get_tp_group()`` / ``get_pp_group()`` (``GroupCoordinator.world_size``,
              ``.rank_in_group``, ``.cpu_group``: vllm/distributed/parallel_state.py), in
              ``sample_tokens``, which the multiproc executor runs on every rank
              (vllm/v1/executor/multiproc_executor.py; non-last stages return ``EMPTY_MODEL_RUNNER_OUTPUT``)
  attention_metadata_builders
              ``GPUModelRunner.attn_groups`` (gpu_model_runner.py) -> ``AttentionGroup.metadata_builders``
              (vllm/v1/worker/utils.py)
  NULL_BLOCK_ID
              ``BlockPool.null_block`` is block 0 (vllm/v1/core/block_pool.py)

Attention side: the H2O builder, impl and backend in h2o_vllm/engine/attention.py
  overrides   vllm/v1/attention/backends/cpu_attn.py: ``CPUAttentionMetadataBuilder.__init__``, ``build``,
              ``CPUAttentionBackendImpl.forward``, ``CPUAttentionBackend.get_impl_cls`` and
              ``get_builder_cls``
  reads       ``CommonAttentionMetadata.num_reqs``, ``seq_lens``, ``block_table_tensor``,
              ``query_start_loc_cpu`` and ``.replace(block_table_tensor=, seq_lens=,
              max_seq_len=, seq_lens_cpu_upper_bound=)`` (vllm/v1/attention/backend.py)
  override_cpu_attention_backend
              ``register_backend(AttentionBackendEnum.CPU_ATTN, ...)``
              (vllm/v1/attention/backends/registry.py) and the memo it must clear,
              ``_cached_get_attn_backend`` (private; vllm/v1/attention/selector.py)
  attention_builder_key_layout, attention_builder_block_size
              ``CPUAttentionMetadataBuilder.isa``, ``.dtype``, ``.head_dim``, ``.kv_cache_dtype``,
              ``.kv_cache_spec.block_size`` (set in its ``__init__``, cpu_attn.py, from
              ``_get_attn_isa``); switching the ISA: ``builder.isa`` (passed to
              ``cpu_attn_get_scheduler_metadata`` in ``build``, which picks the attention kernel)
              and ``CPUAttentionMetadataBuilder._set_isa_to_layers`` (private: sets ``Attention.isa``,
              which ``CPUAttentionBackendImpl.do_kv_cache_update`` writes the cache with)
  attention_impl_scale, scored_key_pages
              ``CPUAttentionBackendImpl.scale``, ``.kv_cache_dtype`` (cpu_attn.py); the layer's
              ``Attention._k_scale_float`` (vllm/model_executor/layers/attention/attention.py), the
              key scale vLLM's fp8 kernels quantise and dequantise with; an fp8 cache is uint8
              (``STR_DTYPE_TO_TORCH_DTYPE``, vllm/utils/torch_utils.py) holding e4m3 or e5m2 bytes
  key_pages   the CPU KV cache layout ``[num_blocks, kv_heads, block_size, 2 * head_size]``
              split into K and V in ``CPUAttentionBackendImpl.forward`` (cpu_attn.py)
  detect_key_layout
              ``ops.cpu_attn_reshape_and_cache`` (vllm/_custom_ops.py)

Request side (API server and ``vllm.LLM`` processes)
  patches/request_validation.py wraps ``InputProcessor._validate_params`` (private) and
              ``process_inputs`` (public; reads ``EngineCoreRequest.prompt_token_ids``,
              ``sampling_params``, and ``cache_config.num_gpu_blocks``, which
              vllm/v1/engine/core_client.py and core.py set once the engine core sized the pool;
              vllm/v1/engine/input_processor.py) and raises ``VLLMValidationError``
              (vllm/exceptions.py)
  engines_behind_frontend
              the frontend sums ``num_gpu_blocks`` over the engines it talks to
              (``_decode_ready_response``, core_client.py): every DP engine with the internal load
              balancer, the node's own with ``data_parallel_hybrid_lb``, one with
              ``data_parallel_external_lb`` (``ParallelConfig``, vllm/config/parallel.py;
              vllm/entrypoints/cli/serve.py)
  patches/request_aliases.py wraps ``CompletionRequest.to_sampling_params``
              (vllm/entrypoints/openai/completion/protocol.py) and
              ``ChatCompletionRequest.to_sampling_params``
              (vllm/entrypoints/openai/chat_completion/protocol.py)
  patches/process_role.py tells h2o_vllm/plugin.py which process it runs in from the vLLM
              module that called ``load_general_plugins()`` (vllm/plugins/__init__.py)
  patches/cli_version.py patches ``importlib.metadata.version("vllm")``, asked by
              vllm/entrypoints/cli/main.py and ``vllm_version_matches_substr``
              (vllm/platforms/__init__.py)
"""

from __future__ import annotations

import functools
from typing import Any

from h2o_vllm.patches.versions import require_supported_vllm

require_supported_vllm()


# -- scheduler side -----------------------------------------------------------------


def _full_attention_manager(scheduler) -> Any:
    # One KV cache group (checked at start-up), managed by a FullAttentionManager.
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def check_single_full_attention_group(kv_cache_config, spec_cls: type) -> None:
    """One KV cache group, of full attention as ``spec_cls`` (our subclass, see ``budgeted_specs``) reports it."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not spec_cls:
        specs = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ValueError(f"H2O supports models with one full-attention KV cache group only, got {specs}")


def request_blocks(scheduler, req_id: str) -> list:
    """The request's block list (logical block i -> KVCacheBlock); holes are the null block."""
    return _full_attention_manager(scheduler).req_to_blocks.get(req_id, [])


def resident_blocks(scheduler, req_id: str) -> int:
    """Blocks the request holds in the pool: its block list less the holes evictions left."""
    blocks = request_blocks(scheduler, req_id)
    return len(blocks) - count_holes(blocks)


def count_holes(blocks: list) -> int:
    return sum(1 for b in blocks if b.is_null)


def private_blocks(scheduler, req_id: str) -> int:
    """Blocks only this request holds: what evicting them would give back to the pool."""
    return sum(1 for b in request_blocks(scheduler, req_id) if not b.is_null and b.ref_cnt == 1)


def held_blocks(scheduler, req_ids) -> tuple[int, int]:
    """(distinct blocks the requests hold, how many of those another holder shares)."""
    blocks = {b.block_id: b for rid in req_ids for b in request_blocks(scheduler, rid) if not b.is_null}
    return len(blocks), sum(1 for b in blocks.values() if b.ref_cnt > 1)


def hashed_blocks(scheduler, req_id: str) -> list[bool]:
    """Per logical block of the request: whether it is in the prefix cache (other requests may reuse it)."""
    return [not b.is_null and b.block_hash is not None for b in request_blocks(scheduler, req_id)]


def free_as_holes(scheduler, req_id: str, logical_blocks: list[int]) -> tuple[int, int]:
    """Drop the request's references to its blocks at ``logical_blocks``, leaving holes.

    The same mechanism vLLM uses for sliding windows: the entry becomes the pool's
    null block (id 0), so the list keeps its length and nothing is re-allocated.
    ``BlockPool.free_blocks`` drops one reference per block: a block only this request
    held goes back to the pool (if it is in the prefix cache, it stays there, reusable,
    until the pool hands it out again); a block another request also holds (a shared
    prefix) frees nothing. Returns (freed, shared).
    """
    manager = _full_attention_manager(scheduler)
    blocks = manager.req_to_blocks[req_id]
    dropped = []
    for i in logical_blocks:
        block = blocks[i]
        if block.is_null or block.ref_cnt < 1:
            raise RuntimeError(
                f"block {i} of request {req_id} cannot be evicted (null={block.is_null}, ref_cnt={block.ref_cnt})"
            )
        blocks[i] = manager._null_block
        dropped.append(block)
    shared = sum(1 for b in dropped if b.ref_cnt > 1)
    manager.block_pool.free_blocks(dropped)
    return len(dropped) - shared, shared


def prefix_caching_enabled(scheduler) -> bool:
    return scheduler.kv_cache_manager.enable_caching


def cap_prefix_caching(scheduler, cap_tokens) -> None:
    """Offer to the prefix cache only a request's blocks below ``cap_tokens(req_id)`` (None: no cap).

    vLLM hashes a request's full blocks when it schedules them (``allocate_slots`` ->
    ``SingleTypeKVCacheManager.cache_blocks(request, num_tokens)``, which hashes the
    blocks from ``num_cached_block[req_id]`` up to ``num_tokens // block_size`` and
    returns early when there are none). Clamping ``num_tokens`` stops it at the cap;
    ``num_cached_block`` keeps its meaning. Wrapped on the scheduler's manager instance.
    """
    manager = _full_attention_manager(scheduler)
    original = manager.cache_blocks

    @functools.wraps(original)
    def cache_blocks(request, num_tokens, *args, **kwargs):
        cap = cap_tokens(request.request_id)
        return original(request, num_tokens if cap is None else min(num_tokens, cap), *args, **kwargs)

    manager.cache_blocks = cache_blocks


def cap_prefix_hits(scheduler, max_hit_tokens) -> None:
    """Shorten a waiting request's prefix-cache hit to ``max_hit_tokens(request)`` tokens (None: vLLM's hit).

    Wraps ``KVCacheManager.get_computed_blocks`` on the scheduler's instance, which the
    scheduler asks once per admission; ``truncate_computed_blocks`` (a pure slice) cuts
    the hit, so the blocks are touched, and vLLM's prefix-cache metrics count, only what
    is used. The limit must be a multiple of the block size.
    """
    kv_cache_manager = scheduler.kv_cache_manager
    original = kv_cache_manager.get_computed_blocks

    @functools.wraps(original)
    def get_computed_blocks(request):
        blocks, num_tokens, boundary = original(request)
        cap = max_hit_tokens(request)
        if cap is not None and num_tokens > cap:
            return kv_cache_manager.truncate_computed_blocks(blocks, cap), cap, boundary
        return blocks, num_tokens, boundary

    kv_cache_manager.get_computed_blocks = get_computed_blocks


def gate_admission(scheduler, blocks_needed) -> None:
    """Admit a waiting request when ``blocks_needed(req_id)`` blocks are free, instead of its whole prompt's.

    vLLM admits a chunked prompt only if the pool can hold all of it
    (``full_sequence_must_fit``); its sliding-window managers lower that with a
    per-manager ``max_admission_blocks_per_request``. This does the same per
    request: ``blocks_needed`` returns the blocks to require (None: vLLM's own rule).
    Only the admission check is changed (``apply_admission_cap=True``); allocations
    still get exactly the blocks each chunk needs.
    """
    manager = _full_attention_manager(scheduler)
    original = manager.get_num_blocks_to_allocate

    @functools.wraps(original)
    def get_num_blocks_to_allocate(request_id, num_tokens, *args, apply_admission_cap=False, **kwargs):
        needed = blocks_needed(request_id) if apply_admission_cap else None
        if needed is not None:
            num_tokens = needed * manager.block_size
        return original(request_id, num_tokens, *args, apply_admission_cap=apply_admission_cap, **kwargs)

    manager.get_num_blocks_to_allocate = get_num_blocks_to_allocate


def in_flight(request) -> bool:
    """Whether a step of this request was scheduled and its output has not come back yet."""
    return request.num_in_flight_tokens > 0


_HELD = 1 << 62  # a step Scheduler.current_step never reaches


def hold_request(request) -> None:
    """Keep vLLM's scheduler from scheduling this running request until :func:`release_request`."""
    request.next_decode_eligible_step = _HELD


def release_request(request) -> None:
    request.next_decode_eligible_step = 0


def eager_model(vllm_config) -> bool:
    """Whether the model runs uncompiled (``--enforce-eager``)."""
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode == CompilationMode.NONE


def data_parallel_engine(vllm_config) -> int:
    """This engine core's data-parallel index (0 without data parallelism)."""
    return int(getattr(vllm_config.parallel_config, "data_parallel_index", 0) or 0)


def engines_behind_frontend(vllm_config) -> int:
    """How many engines' KV pools the API server's ``cache_config.num_gpu_blocks`` adds up."""
    parallel = vllm_config.parallel_config
    if parallel.data_parallel_external_lb:
        return 1
    if parallel.data_parallel_hybrid_lb:
        return max(1, parallel.data_parallel_size_local)
    return max(1, parallel.data_parallel_size)


def num_free_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def num_total_blocks(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1  # minus the null block


def blocks_in_use(scheduler) -> int:
    """Blocks some request holds (a reference count above 0); the rest are free, cached or not."""
    return sum(1 for b in scheduler.kv_cache_manager.block_pool.blocks if not b.is_null and b.ref_cnt > 0)


def cached_free_blocks(scheduler) -> int:
    """Free blocks that still hold KV in the prefix cache (reusable by a hit until the pool hands them out)."""
    pool = scheduler.kv_cache_manager.block_pool
    return sum(1 for b in pool.blocks if not b.is_null and b.ref_cnt == 0 and b.block_hash is not None)


def inprocess_scheduler(llm):
    """The scheduler of a ``vllm.LLM`` whose engine core runs in this process.

    Only with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: otherwise the engine core (and
    its scheduler) lives in a child process and cannot be read from here.
    """
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # InprocClient -> EngineCore
    if core is None:
        raise RuntimeError(
            "the engine core runs in another process; start vllm.LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )
    return core.scheduler


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core (and its workers) now, rather than when it is collected."""
    llm.llm_engine.engine_core.shutdown()


# -- worker side -------------------------------------------------------------------

NULL_BLOCK_ID = 0  # BlockPool hands the first block out as the null block, never to a request


def adopt_model_runner_class(worker, runner_cls: type) -> None:
    """Turn the worker's freshly built ``CPUModelRunner`` into a ``runner_cls``, in place.

    Call right after ``CPUWorker.init_device``. ``runner_cls`` must subclass
    ``CPUModelRunner`` without an ``__init__`` of its own (none would run).
    """
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if not issubclass(runner_cls, CPUModelRunner) or runner_cls.__init__ is not CPUModelRunner.__init__:
        raise TypeError(f"{runner_cls.__name__} must subclass CPUModelRunner and add no __init__")
    if type(worker.model_runner) is not CPUModelRunner:
        raise RuntimeError(
            f"H2O needs vLLM's V1 CPU model runner, got {type(worker.model_runner).__name__} "
            "(unset VLLM_USE_V2_MODEL_RUNNER)"
        )
    # The runner was just constructed and holds no state our subclass lacks:
    # switching its class adds our overrides without copying vLLM's init_device.
    worker.model_runner.__class__ = runner_cls


def punch_worker_holes(runner, req_id: str, logical_blocks: list[int]) -> None:
    """Mirror the scheduler's holes in the worker: the request's block ids and its batch row.

    Both are needed: a request that leaves the batch gets its row rebuilt from
    ``req_state.block_ids`` when it comes back.
    """
    state = runner.requests.get(req_id)
    if state is None:
        return  # finished in between
    ids = state.block_ids[0]
    row = runner.input_batch.req_id_to_index.get(req_id)
    table = runner.input_batch.block_table[0].block_table.np
    for i in logical_blocks:
        ids[i] = NULL_BLOCK_ID
        if row is not None:
            table[row, i] = NULL_BLOCK_ID


def budgeted_specs(kv_cache_spec: dict, spec_cls: type) -> dict:
    """The runner's layer specs with every plain ``FullAttentionSpec`` turned into ``spec_cls`` (same fields).

    ``spec_cls`` subclasses ``FullAttentionSpec`` and overrides ``max_memory_usage_bytes``
    only; vLLM's ``KVCacheSpecRegistry`` maps it to ``FullAttentionManager`` through its
    bases. Other spec types (sliding window, MLA, ...) are left as they are: the
    scheduler then refuses the model (``check_single_full_attention_group``).
    """
    import dataclasses

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    def convert(spec):
        if type(spec) is not FullAttentionSpec:
            return spec
        values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return spec_cls(**values)

    return {name: convert(spec) for name, spec in kv_cache_spec.items()}


def attention_metadata_builders(runner) -> list:
    """Every attention metadata builder of the runner (per attention group, per micro-batch).

    Empty until vLLM has set up the KV cache (``initialize_metadata_builders``).
    """
    return [b for groups in runner.attn_groups for group in groups for b in group.metadata_builders]


def batch_req_ids(runner, num_reqs: int | None = None) -> list[str]:
    ids = runner.input_batch.req_ids
    return list(ids if num_reqs is None else ids[:num_reqs])


def total_kv_heads(runner) -> int:
    """The model's KV heads over all tensor-parallel ranks."""
    return runner.model_config.get_total_num_kv_heads()


# -- attention side ----------------------------------------------------------------


def override_cpu_attention_backend(class_path: str) -> None:
    """Make ``CPU_ATTN`` resolve to ``class_path`` in this process from now on.

    vLLM memoises the backend each layer gets (``_cached_get_attn_backend``): an engine
    built earlier in this process (a vanilla one, in a benchmark) would otherwise hand
    its cached class to the next engine's layers.
    """
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, class_path)
    selector._cached_get_attn_backend.cache_clear()


def attention_builder_block_size(builder) -> int:
    """Tokens per KV block of a ``CPUAttentionMetadataBuilder``."""
    return builder.kv_cache_spec.block_size


class UnreadableKeyPages(RuntimeError):
    """vLLM's kernel for this ISA and dtype writes key pages in no layout H2O reads (or refuses the ISA here)."""


def attention_builder_key_layout(builder, layer_names: list[str]):
    """The :class:`~h2o_vllm.engine.pages.KeyLayout` of the builder's kernel, found by ``detect_key_layout``.

    Where H2O cannot read the pages of the ISA vLLM picked (a kernel with a layout of
    its own, such as Arm's bfloat16 one), the builder and its layers are switched to
    vLLM's portable ``vec`` kernels (``vec16`` for blocks that are not a multiple of 32
    tokens), whose layout H2O reads, and a warning says so. Both places vLLM keeps the
    ISA change together: ``builder.isa`` (the attention kernel, through the scheduler
    metadata) and every layer's ``isa`` (the cache writes, ``do_kv_cache_update``).
    """
    import logging

    block_size = attention_builder_block_size(builder)
    isa, args = builder.isa, (builder.dtype, builder.head_dim, block_size, builder.kv_cache_dtype)
    try:
        return detect_key_layout(isa, *args)
    except UnreadableKeyPages as unreadable:
        portable = "vec" if block_size % 32 == 0 else "vec16"
        if isa == portable:
            raise
        layout = detect_key_layout(portable, *args)
        logging.getLogger("vllm.h2o_vllm.attention").warning(
            "H2O cannot read the key pages of vLLM's %r attention kernels (%s): this engine attends with "
            "vLLM's %r kernels instead (same results, possibly slower)",
            isa,
            unreadable,
            portable,
        )
        builder.isa = portable
        builder._set_isa_to_layers(layer_names)
        return layout


def attention_impl_scale(impl) -> float:
    """The softmax scale a ``CPUAttentionBackendImpl`` attends with."""
    return impl.scale


def attention_is_plain(impl, layer) -> bool:
    """Whether a ``CPUAttentionBackendImpl`` layer attends as the fused operator's ``attend_layer`` can: a
    decoder layer on vLLM's ``vec`` kernels (value pages [block_size, head_dim]) with a bfloat16, float16 or
    float32 cache, and none of sinks, ALiBi, a logits soft cap or a sliding window."""
    from vllm.v1.attention.backend import AttentionType

    return (
        getattr(layer, "isa", None) == "vec"
        and impl.attn_type == AttentionType.DECODER
        and impl.kv_cache_dtype == "auto"
        and impl.sinks is None
        and impl.alibi_slopes is None
        and not impl.logits_soft_cap
        and impl.sliding_window in (-1, (-1, -1))
    )


def scored_key_pages(impl, layer, kv_cache):
    """One layer's key pages as the numbers they hold, and the scale that turns q.k into logits.

    For an fp8 cache (``impl.kv_cache_dtype`` fp8, fp8_e4m3 or fp8_e5m2: uint8 bytes in
    vLLM) the pages are viewed as their float8 type and the layer's per-tensor key scale
    (``layer._k_scale_float``, what vLLM's kernels dequantise with) joins the softmax scale.
    """
    from h2o_vllm.engine.pages import page_dtype

    pages, scale = key_pages(kv_cache), attention_impl_scale(impl)
    fp8 = page_dtype(impl.kv_cache_dtype)
    if fp8 is None:
        return pages, scale
    return pages.view(fp8), scale * layer._k_scale_float


def key_pages(kv_cache):
    """The key half of one layer's CPU KV cache: [num_blocks, kv_heads, block_size * head_dim] raw pages.

    vLLM's CPU cache is [num_blocks, kv_heads, block_size, 2 * head_dim], each
    (block, head) holding its K page then its V page; how a K page is laid out is
    what ``detect_key_layout`` finds out.
    """
    return _kv_halves(kv_cache)[:, :, 0]


def value_pages(kv_cache):
    """The value half of one layer's CPU KV cache, as :func:`key_pages` the key half (vLLM's vec kernels
    write each value page [block_size, head_dim]: ``tests/test_fused_attention.py`` checks)."""
    return _kv_halves(kv_cache)[:, :, 1]


def _kv_halves(kv_cache):
    """[num_blocks, kv_heads, 2, block_size * head_dim]: each (block, head)'s key page, then its value page."""
    num_blocks, kv_heads, block_size, two_head_dim = kv_cache.shape
    return kv_cache.view(num_blocks, kv_heads, 2, block_size * two_head_dim // 2)


@functools.cache
def detect_key_layout(isa: str, dtype, head_dim: int, block_size: int = 32, kv_cache_dtype: str = "auto"):
    """How ``cpu_attn_reshape_and_cache`` lays one key page out for ``isa``: a ``KeyLayout``.

    Keys of distinct small integers (exact in bfloat16 and in both fp8 formats) are
    written by the real kernel and read back through each layout, so a kernel that
    changes its layout stops the engine (or switches it to ``vec``, see
    ``attention_builder_key_layout``) instead of producing wrong scores. An fp8 cache
    is probed as vLLM allocates it: uint8, with ``kv_cache_dtype`` and a key scale of 1.
    Raises :class:`UnreadableKeyPages` where no layout matches or the kernel refuses ``isa``,
    ``ValueError`` for a cache dtype H2O does not read.
    """
    import torch
    from vllm import _custom_ops as ops

    from h2o_vllm.engine.pages import KeyLayout, page_dtype

    fp8 = page_dtype(kv_cache_dtype)
    kv_heads, n = 2, block_size
    cache = torch.zeros(2, kv_heads, block_size, 2 * head_dim, dtype=dtype if fp8 is None else torch.uint8)
    view = cache.view(2, kv_heads, 2 * block_size, head_dim)
    key_cache, value_cache = view.chunk(2, dim=2)
    values = 8 if fp8 is not None else 251  # integers every format holds exactly
    key = torch.randint(0, values, (n, kv_heads, head_dim), generator=torch.Generator().manual_seed(0)).to(dtype)
    slots = torch.arange(block_size, 2 * block_size)
    try:
        ops.cpu_attn_reshape_and_cache(
            key, -key, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype=kv_cache_dtype
        )
    except RuntimeError as refused:
        raise UnreadableKeyPages(f"vLLM refused isa={isa!r} here: {str(refused).splitlines()[0]}") from refused
    page = key_pages(cache)[1:]  # [1, kv_heads, block_size * head_dim]
    page = page if fp8 is None else page.view(fp8)
    expected = key.transpose(0, 1).float()  # [kv_heads, tokens, head_dim]
    for layout in KeyLayout:
        if (layout is not KeyLayout.AMX or block_size % 16 == 0) and torch.equal(
            layout.keys(page, block_size)[0].float(), expected
        ):
            return layout
    raise UnreadableKeyPages(f"no known layout for isa={isa!r} dtype={dtype} cache={kv_cache_dtype}")
