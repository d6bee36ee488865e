"""The H2O scheduler: vLLM's V1 scheduler plus one eviction pass per step.

Each step, before vLLM schedules anything, every running request whose prompt is
fully processed and whose resident blocks exceed its budget drops the blocks its
policy picks (from :mod:`h2o_vllm.policy`, fed by a :class:`BlockLedger`). The
freed blocks go straight back to the pool, so the same step can give them to
running requests that need a new block and to waiting requests. With prefix
caching on (vLLM's default), a request offers the prefix cache only the blocks it
computed before its first eviction, and takes from it only what leaves its
decisions unchanged (see :meth:`Footprint.max_prefix_hit`). The evictions,
the rows to score (H2O) and the requests whose new keys' norms to sum (key-norm
eviction) travel to the workers on the step's ``SchedulerOutput``; the scores
come back on the ``ModelRunnerOutput`` and are added to the ledgers: attention
mass for every scored row of every step, a key's norm once, in the step that
writes it. With pipeline parallelism vLLM schedules the next step before the last
one's output is back; a request with a step in flight is not compressed until its
scores are in, and one compressed between prefill chunks waits for its chunk's
scores before the next is scheduled, so every decision equals one process's.

Enabled with ``--scheduler-cls h2o_vllm.engine.scheduler.H2OScheduler`` (see
:func:`h2o_vllm.engine.settings.engine_kwargs`).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import asdict, dataclass, field

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from h2o_vllm import metrics, settings
from h2o_vllm.engine.kv_spec import BudgetedAttentionSpec
from h2o_vllm.engine.messages import PLAN_ATTR, SCORES_ATTR, ScoreRequest, StepPlan
from h2o_vllm.engine.settings import server_defaults
from h2o_vllm.footprint import Footprint
from h2o_vllm.ledger import BlockLedger
from h2o_vllm.patches import engine_seams
from h2o_vllm.policy import PolicyConfig, make_policy
from h2o_vllm.profiles import ENGINE_BLOCK_SIZE

logger = logging.getLogger("vllm.h2o_vllm.scheduler")


@dataclass
class RequestCounters:
    policy: str
    evicted_blocks: int = 0
    evicted_shared_blocks: int = 0  # of which another request held too: evicting them freed nothing
    cached_prefix_tokens: int | None = None  # prompt tokens taken from the prefix cache at admission
    resident_blocks: int = 0
    peak_resident_blocks: int = 0
    full_cache_blocks: int = 0  # what the request would hold without eviction


@dataclass
class EngineCounters:
    evicted_blocks: int = 0
    evicted_shared_blocks: int = 0
    finished_requests: int = 0
    requests_by_policy: collections.Counter = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class RequestSettings:
    """One request's configuration and the figures the scheduler derives from it, worked out once.

    Made when the request arrives (its ``h2o_*`` extra args over the server's defaults);
    kept until it finishes, across preemptions.
    """

    config: PolicyConfig
    num_prompt_tokens: int
    longest: int  # the longest its sequence may grow: prompt and max_tokens, within max_model_len
    can_evict: bool
    max_prefix_hit: int | None  # prompt tokens it may take from the prefix cache (None: no limit)

    @classmethod
    def of(cls, config: PolicyConfig, request: Request, max_model_len: int) -> RequestSettings:
        prompt, max_tokens = request.num_prompt_tokens, request.max_tokens
        longest = min(max_model_len, prompt + (max_tokens or 0))
        footprint = Footprint(config)
        can_evict = footprint.can_evict(prompt, max_tokens)
        hit = footprint.max_prefix_hit(prompt, longest) if can_evict else None
        return cls(config, prompt, longest, can_evict, hit)

    def peak_blocks(self, num_tokens: int, chunk_tokens: int, prefilling: bool = True) -> int | None:
        """:meth:`Footprint.peak_blocks` for this request, at ``num_tokens`` so far (None: unbounded)."""
        return Footprint(self.config).peak_blocks(max(self.longest, num_tokens), chunk_tokens, prefilling)


class RequestEviction:
    """One request's eviction state: its policy, block ledger and counters.

    Made when the request is first scheduled; dropped when it finishes or is
    preempted (a preempted request re-prefills from scratch and starts a new one).
    """

    def __init__(self, settings: RequestSettings):
        config = settings.config
        self.config = config
        self.policy = make_policy(config)
        self.ledger = BlockLedger(config.block_size, settings.num_prompt_tokens)
        self.counters = RequestCounters(config.policy)
        self.num_prompt_tokens = settings.num_prompt_tokens
        self.can_evict = settings.can_evict
        self.needs_scores = self.can_evict and config.needs_scores
        self.needs_key_norms = self.can_evict and config.needs_key_norms
        # Set at the first eviction: the blocks below it were computed over the full context
        # and may be shared through the prefix cache; nothing at or above it is ever offered.
        self.cache_cap_tokens: int | None = None


def check_engine_config(vllm_config) -> None:
    """Refuse what paged H2O cannot do, and force what fights it (with the reason in the log)."""
    problems = []
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding (the draft's KV would not follow the evictions)")
    parallel = vllm_config.parallel_config
    # Tensor and pipeline parallelism: every rank's scores are reduced before they reach us
    # (engine/ranks.py); with pipeline parallelism a request's evictions wait for its steps in flight.
    if parallel.pipeline_parallel_size > 1 and engine_seams.eager_model(vllm_config):
        problems.append(
            "pipeline parallelism with --enforce-eager (vLLM's CPU runner then never allocates a later "
            "stage's input buffer and fails on the first request; leave --enforce-eager out)"
        )
    if parallel.data_parallel_size > 1:  # only expert-parallel (MoE) engines keep it: dense ones are independent
        problems.append("data parallelism across the experts of one MoE engine")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV connectors (they would move KV the scheduler has evicted)")
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("async scheduling (evictions must be applied before the step that follows)")
    if vllm_config.use_v2_model_runner:
        problems.append("the V2 model runner (unset VLLM_USE_V2_MODEL_RUNNER)")
    block_size = vllm_config.cache_config.block_size
    if block_size != ENGINE_BLOCK_SIZE:
        problems.append(f"block size {block_size} (start with --block-size {ENGINE_BLOCK_SIZE})")
    if problems:
        raise ValueError("H2O eviction cannot run with " + "; ".join(problems))
    logger.info(
        "H2O engine settings: block size %d (CPU attention needs a multiple of 32; smaller blocks evict "
        "finer); async scheduling off (evictions apply before the next step is scheduled); prefix caching %s",
        block_size,
        "on (only KV computed before a request's first eviction is shared)"
        if vllm_config.cache_config.enable_prefix_caching
        else "off",
    )


class H2OScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        check_engine_config(vllm_config)
        engine_seams.check_single_full_attention_group(kv_cache_config, BudgetedAttentionSpec)
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.h2o_defaults = server_defaults(vllm_config.additional_config)
        self.h2o_settings: dict[str, RequestSettings] = {}  # every request not finished
        self.h2o_requests: dict[str, RequestEviction] = {}  # those scheduled since (re)admission
        self.h2o_totals = EngineCounters()
        self.h2o_metrics = metrics.writer_from_env(engine_seams.data_parallel_engine(vllm_config))
        # A prefill chunk is at most a step's token budget; no sequence is longer than max_model_len.
        self.h2o_chunk_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.h2o_max_len = vllm_config.model_config.max_model_len
        # Only with pipeline parallelism does vLLM schedule a step before the last one's output is
        # back (async scheduling is refused above): prompt chunks are held back then alone.
        self.h2o_steps_overlap = vllm_config.parallel_config.pipeline_parallel_size > 1
        engine_seams.gate_admission(self, self._admission_blocks)
        if engine_seams.prefix_caching_enabled(self):
            engine_seams.cap_prefix_caching(self, self._cache_cap)
            engine_seams.cap_prefix_hits(self, self._max_prefix_hit)
        self._publish(force=True)
        logger.info("H2O scheduler: defaults %s, block size %d", self.h2o_defaults, self.block_size)

    # -- request life cycle ----------------------------------------------------------

    def request_settings(self, request: Request) -> RequestSettings:
        """The request's settings, parsed once when it arrived."""
        found = self.h2o_settings.get(request.request_id)
        if found is None:
            extra = request.sampling_params.extra_args if request.sampling_params else None
            config = settings.for_request(self.h2o_defaults, extra)
            found = self.h2o_settings[request.request_id] = RequestSettings.of(config, request, self.h2o_max_len)
        return found

    def request_config(self, request: Request) -> PolicyConfig:
        return self.request_settings(request).config

    def add_request(self, request: Request) -> None:
        # Bad settings never get here: patches/request_validation.py refuses them at the door.
        config = self.request_config(request)
        super().add_request(request)
        self.h2o_totals.requests_by_policy[config.policy] += 1

    def _peak_blocks(self, request: Request, decoding: bool = False) -> int | None:
        """Most blocks a request holds at once: prefilling, one chunk beyond what it keeps between
        chunks (prefill "staged": its working set); decoding, one block beyond its budget.

        What it keeps is sized for its longest possible sequence (a fraction budget grows with it).
        """
        chunk = 1 if decoding else self.h2o_chunk_tokens
        return self.request_settings(request).peak_blocks(request.num_tokens, chunk, prefilling=not decoding)

    def _eviction_state(self, request: Request) -> RequestEviction:
        state = self.h2o_requests.get(request.request_id)
        if state is None:
            state = self.h2o_requests[request.request_id] = RequestEviction(self.request_settings(request))
        return state

    def _cache_cap(self, req_id: str) -> int | None:
        state = self.h2o_requests.get(req_id)
        return None if state is None else state.cache_cap_tokens

    def _max_prefix_hit(self, request: Request) -> int | None:
        return self.request_settings(request).max_prefix_hit

    def _admission_blocks(self, req_id: str) -> int | None:
        """Free blocks a waiting request needs to start (None: vLLM's rule, its whole prompt).

        A chunked-prefill request needs its peak (budget + one chunk), plus what the
        chunked requests already running may still take before they reach theirs (once a
        request decodes, it takes one block at a time, not a chunk). A block a running
        request shares with another (a cached prefix) frees nothing when it evicts it, so
        what it may still take is its peak less the blocks only it holds.
        """
        request = self.requests.get(req_id)
        peak = None if request is None else self._peak_blocks(request)
        if peak is None or peak * self.block_size >= request.num_tokens:
            return None
        outstanding = 0
        for running in self.running:
            state = self.h2o_requests.get(running.request_id)
            decoding = running.num_computed_tokens >= running.num_prompt_tokens
            their_peak = None if state is None else self._peak_blocks(running, decoding)
            if their_peak is not None:
                outstanding += max(0, their_peak - engine_seams.private_blocks(self, running.request_id))
        return peak + outstanding

    def _free_request_blocks(self, request: Request):
        # Finish and preemption both end here: a preempted request re-prefills from scratch.
        super()._free_request_blocks(request)
        state = self.h2o_requests.pop(request.request_id, None)
        if request.is_finished():
            self.h2o_settings.pop(request.request_id, None)
            if state is not None:
                self.h2o_totals.finished_requests += 1

    # -- one step ----------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        plan = StepPlan()
        for request in self.running:
            state = self._eviction_state(request)
            # A step in flight (only with pipeline parallelism, when vLLM schedules the next step):
            # its scores are not in yet, and its decision waits for them.
            if not state.can_evict or engine_seams.in_flight(request):
                continue
            # A prompt (or a preempted request's re-prefill) is compressed once it is whole,
            # or with prefill "chunked" or "staged" after each chunk; then one block at a time as it decodes.
            if not state.config.evicts_after(request.num_computed_tokens, request.num_tokens):
                continue
            state.ledger.grow(request.num_computed_tokens)
            evicted = state.ledger.evict(state.policy)
            if evicted:
                _, shared = engine_seams.free_as_holes(self, request.request_id, evicted)
                plan.evictions[request.request_id] = evicted
                if state.cache_cap_tokens is None:
                    # Every full block so far was hashed when it was scheduled, before this eviction.
                    state.cache_cap_tokens = request.num_computed_tokens // self.block_size * self.block_size
                state.counters.evicted_blocks += len(evicted)
                state.counters.evicted_shared_blocks += shared
                self.h2o_totals.evicted_blocks += len(evicted)
                self.h2o_totals.evicted_shared_blocks += shared
        output = super().schedule(*args, **kwargs)
        for req_id, num_scheduled in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            state = self._eviction_state(request)
            if (
                self.h2o_steps_overlap
                and state.can_evict
                and state.config.compresses_while_prefilling
                and request.num_computed_tokens < request.num_tokens
            ):
                # Its next chunk is compressed on this one's scores: vLLM would pipeline it now.
                engine_seams.hold_request(request)
            end = request.num_computed_tokens  # vLLM has already counted this step's tokens: the chunk's end
            if state.needs_scores and state.config.ranks_by_keys(end, state.num_prompt_tokens):
                plan.key_norms.add(req_id)  # a "staged" working set ranked by its keys, before the question
            elif state.needs_scores:
                if state.config.resets_scores(end - num_scheduled, end, state.num_prompt_tokens):
                    state.ledger.reset_scores()  # "staged": the prompt's last rows rank what was kept
                first = state.config.first_scored_position(end - num_scheduled, end, state.num_prompt_tokens)
                plan.score_requests[req_id] = ScoreRequest(first, state.config.score_reduce)
            elif state.needs_key_norms:
                plan.key_norms.add(req_id)  # every token it runs this step writes a key
            counters = state.counters
            if counters.cached_prefix_tokens is None:  # first scheduled since (re)admission
                counters.cached_prefix_tokens = request.num_computed_tokens - num_scheduled
            # Every hole is a block this request evicted since it was (re)admitted.
            counters.full_cache_blocks = len(engine_seams.request_blocks(self, req_id))
            counters.resident_blocks = counters.full_cache_blocks - counters.evicted_blocks
            counters.peak_resident_blocks = max(counters.peak_resident_blocks, counters.resident_blocks)
        setattr(output, PLAN_ATTR, plan)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        scores = getattr(model_runner_output, SCORES_ATTR, None)
        result = super().update_from_output(scheduler_output, model_runner_output)
        if self.h2o_steps_overlap:  # a held request's chunk is back: it may be scheduled again
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests.get(req_id)
                if request is not None and not engine_seams.in_flight(request):
                    engine_seams.release_request(request)
        for req_id, block_scores in (scores or {}).items():
            state = self.h2o_requests.get(req_id)
            request = self.requests.get(req_id)
            if state is None or request is None or request.is_finished():
                continue
            state.ledger.grow(request.num_computed_tokens)
            state.ledger.add_blocks(block_scores.blocks, block_scores.mass, block_scores.visibility)
        self._publish(force=not self.running and not self.waiting)
        return result

    def finish_requests(self, *args, **kwargs):
        result = super().finish_requests(*args, **kwargs)  # aborts (client gone) end here
        self._publish(force=True)
        return result

    # -- counters ----------------------------------------------------------------------

    def _publish(self, force: bool = False) -> None:
        if self.h2o_metrics is not None and (force or self.h2o_metrics.due()):
            self.h2o_metrics.write(self.h2o_snapshot())

    def h2o_snapshot(self) -> dict:
        """Engine-wide figures for /metrics (see h2o_vllm.metrics)."""
        full = 0
        running_by_policy: collections.Counter = collections.Counter()
        for request in self.running:
            full += len(engine_seams.request_blocks(self, request.request_id))
            state = self.h2o_requests.get(request.request_id)
            running_by_policy[state.config.policy if state else self.request_config(request).policy] += 1
        resident, shared = engine_seams.held_blocks(self, (r.request_id for r in self.running))
        return {
            "evicted_blocks": self.h2o_totals.evicted_blocks,
            "evicted_shared_blocks": self.h2o_totals.evicted_shared_blocks,
            "requests_by_policy": dict(self.h2o_totals.requests_by_policy),
            "running_by_policy": dict(running_by_policy),
            "resident_kv_blocks": resident,
            "shared_kv_blocks": shared,
            "full_cache_kv_blocks": full,
            "kv_free_blocks": engine_seams.num_free_blocks(self),
            "kv_total_blocks": engine_seams.num_total_blocks(self),
        }

    def h2o_counters(self) -> dict:
        """Engine-wide and per-request counters (running requests), as plain data."""
        per_request = {rid: asdict(s.counters) for rid, s in self.h2o_requests.items()}
        return {**self.h2o_snapshot(), "finished_requests": self.h2o_totals.finished_requests, "requests": per_request}
