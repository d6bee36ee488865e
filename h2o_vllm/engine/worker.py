"""Worker side: apply the scheduler's evictions, describe the step to the attention
builders, and send the step's scores (and key norms) back with the sampled tokens.

Enabled with ``--worker-cls h2o_vllm.engine.worker.H2OCPUWorker`` (see
:func:`h2o_vllm.engine.settings.engine_kwargs`).
"""

from __future__ import annotations

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from h2o_vllm.engine import attention
from h2o_vllm.engine.kv_spec import BudgetedAttentionSpec
from h2o_vllm.engine.messages import PLAN_ATTR, SCORES_ATTR
from h2o_vllm.engine.ranks import RankReducer
from h2o_vllm.engine.scoring import StepContext
from h2o_vllm.patches import engine_seams


class H2OCPUModelRunner(CPUModelRunner):
    """vLLM's CPU runner plus a step around two of its own (see ``engine_seams.adopt_model_runner_class``)."""

    # The class is switched after vLLM built the runner (no __init__ of ours runs), so state is made on first use.
    _h2o_with_holes: set[str]  # requests whose block table has holes
    _h2o_context: StepContext | None  # this step's, from _update_states to sample_tokens
    _h2o_reducer_: RankReducer | None  # sums scores over tensor/pipeline-parallel ranks (None: one rank)

    def _update_states(self, scheduler_output):
        with_holes = self.__dict__.setdefault("_h2o_with_holes", set())
        # Finished, preempted and resumed requests lose their blocks: their holes go too.
        with_holes.difference_update(scheduler_output.finished_req_ids)
        with_holes.difference_update(scheduler_output.preempted_req_ids or ())
        with_holes.difference_update(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        result = super()._update_states(scheduler_output)
        plan = getattr(scheduler_output, PLAN_ATTR, None)
        context = None
        if plan is not None:
            for req_id, blocks in plan.evictions.items():
                engine_seams.punch_worker_holes(self, req_id, blocks)
                with_holes.add(req_id)
            context = StepContext(
                engine_seams.batch_req_ids(self), plan.score_requests, set(with_holes), plan.key_norms
            )
        self._h2o_step(context)
        return result

    def get_kv_cache_spec(self):
        # Full attention whose per-request memory the engine core sizes by the budget (see kv_spec).
        return engine_seams.budgeted_specs(super().get_kv_cache_spec(), BudgetedAttentionSpec)

    def _h2o_step(self, context: StepContext | None) -> None:
        """Tell the attention metadata builders what this step is (None: a step of no H2O interest)."""
        self._h2o_context = context
        for builder in engine_seams.attention_metadata_builders(self):
            if not isinstance(builder, attention.H2OCPUAttentionMetadataBuilder):
                raise RuntimeError(f"H2O: the model's attention uses {type(builder).__name__}, not the H2O builder")
            builder.begin_step(context)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        context = self.__dict__.get("_h2o_context")
        self._h2o_step(None)  # warm-up and profiling runs between steps see a plain table
        if context is None or (context.scorer is None and context.key_norm_sums is None):
            return output
        # Every rank collects (vLLM runs this on all of them, in step), reducing over the ranks;
        # only the rank whose output reaches the scheduler has a non-empty one to carry it.
        reducer = self._h2o_reducer()
        scores = {}  # attention scores and key norms go to different requests
        for source in (context.scorer, context.key_norm_sums):
            if source is not None:
                scores.update(source.collect(reducer))
        if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(output, SCORES_ATTR, scores)
        return output

    def _h2o_reducer(self) -> RankReducer | None:
        if "_h2o_reducer_" not in self.__dict__:
            self._h2o_reducer_ = RankReducer.for_worker(engine_seams.total_kv_heads(self))
        return self._h2o_reducer_


class H2OCPUWorker(CPUWorker):
    def __init__(self, *args, **kwargs):
        # Before the model is built, so its attention layers pick the H2O backend.
        attention.register()
        super().__init__(*args, **kwargs)

    def init_device(self):
        super().init_device()
        engine_seams.adopt_model_runner_class(self, H2OCPUModelRunner)
