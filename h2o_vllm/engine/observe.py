"""Watch an engine's scheduler step by step (tests and benchmarks).

vLLM runs its engine core in a child process by default; here it runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so its scheduler can be read after
every step: requests running, blocks free, what was evicted. What it reads inside
vLLM it reads through :mod:`h2o_vllm.patches.engine_seams`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from h2o_vllm.patches import engine_seams


@contextlib.contextmanager
def inprocess_llm(model: str, **kwargs):
    """A ``vllm.LLM`` whose engine core (and scheduler) live in this process; shut down on exit."""
    from vllm import LLM

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(model=model, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    try:
        yield llm
    finally:
        engine_seams.shutdown_llm(llm)
        del llm


def scheduler_of(llm):
    """The scheduler of an :func:`inprocess_llm` engine."""
    return engine_seams.inprocess_scheduler(llm)


def num_free_blocks(scheduler) -> int:
    return engine_seams.num_free_blocks(scheduler)


def resident_blocks(scheduler, req_id: str) -> int:
    """Blocks the request holds in the pool (its block list less the holes evictions left)."""
    return engine_seams.resident_blocks(scheduler, req_id)


@dataclass
class StepLog:
    steps: int = 0
    max_running: int = 0
    running: list[int] = field(default_factory=list)  # requests running after each step's scheduling
    free_blocks: list[int] = field(default_factory=list)
    preemptions: int = 0
    evictions: dict[str, list[int]] = field(default_factory=dict)  # req_id -> logical blocks, in order
    scheduled: dict[str, list[int]] = field(default_factory=dict)  # req_id -> tokens scheduled, step by step


class StepObserver:
    """Wraps one scheduler's ``schedule()``; calls ``checks`` after each step's scheduling."""

    def __init__(self, scheduler, checks: list[Callable] | None = None):
        self.scheduler = scheduler
        self.log = StepLog()
        self.checks = list(checks or [])
        self._schedule = scheduler.schedule
        scheduler.schedule = self._observed_schedule

    def _observed_schedule(self, *args, **kwargs):
        before = {r.request_id: (r.num_computed_tokens, r.num_tokens) for r in self.scheduler.running}
        output = self._schedule(*args, **kwargs)
        log = self.log
        log.steps += 1
        log.running.append(len(self.scheduler.running))
        log.max_running = max(log.max_running, len(self.scheduler.running))
        log.free_blocks.append(num_free_blocks(self.scheduler))
        log.preemptions += len(output.preempted_req_ids or ())
        plan = getattr(output, "h2o_plan", None)
        for req_id, blocks in plan.evictions.items() if plan else ():
            log.evictions.setdefault(req_id, []).extend(blocks)
        for req_id, num in output.num_scheduled_tokens.items():
            log.scheduled.setdefault(req_id, []).append(num)
        for check in self.checks:
            check(self.scheduler, output, before)
        return output

    def close(self) -> None:
        self.scheduler.schedule = self._schedule
