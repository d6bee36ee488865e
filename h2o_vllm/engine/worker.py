"""Worker side: apply the scheduler's evictions, describe the step to the attention
builder, and send the step's scores back with the sampled tokens.

Enabled with ``--worker-cls h2o_vllm.engine.worker.H2OCPUWorker`` (see
:func:`h2o_vllm.engine.settings.engine_kwargs`).
"""

from __future__ import annotations

from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from h2o_vllm.engine import attention, scoring
from h2o_vllm.engine.messages import PLAN_ATTR, SCORES_ATTR
from h2o_vllm.patches import engine_seams


class H2OCPUModelRunner(CPUModelRunner):
    """vLLM's CPU runner plus three small steps around its own."""

    _h2o_holey: set[str]  # requests whose block table has holes

    def _update_states(self, scheduler_output):
        holey = self.__dict__.setdefault("_h2o_holey", set())
        # Finished, preempted and resumed requests lose their blocks: their holes go too.
        holey.difference_update(scheduler_output.finished_req_ids)
        holey.difference_update(scheduler_output.preempted_req_ids or ())
        holey.difference_update(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        result = super()._update_states(scheduler_output)
        plan = getattr(scheduler_output, PLAN_ATTR, None)
        if plan is None:
            scoring.begin_step(None)
            return result
        for req_id, blocks in plan.evictions.items():
            engine_seams.punch_worker_holes(self, req_id, blocks)
            holey.add(req_id)
        scoring.begin_step(scoring.StepContext(
            req_ids=engine_seams.batch_req_ids(self), score_from=plan.score_from,
            score_max=plan.score_max, holey=set(holey),
        ))
        return result

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        step = scoring.end_step()
        if step is not None and step.scorer is not None and isinstance(output, ModelRunnerOutput) \
                and output is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(output, SCORES_ATTR, step.scorer.collect())
        return output


class H2OCPUWorker(CPUWorker):
    def __init__(self, *args, **kwargs):
        # Before the model is built, so its attention layers pick the H2O backend.
        attention.register()
        super().__init__(*args, **kwargs)

    def init_device(self):
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(
                f"H2O needs vLLM's V1 CPU model runner, got {type(self.model_runner).__name__} "
                "(unset VLLM_USE_V2_MODEL_RUNNER)"
            )
        # The runner was just constructed and holds no state our subclass lacks:
        # switching its class adds our three overrides without copying vLLM's init_device.
        self.model_runner.__class__ = H2OCPUModelRunner
