"""Long prompts with prefill "chunked": admitted by their budget, compressed chunk by chunk (tiny model).

One engine: a pool of 96 blocks of 32 tokens, prefill chunks of 256 tokens, a budget of 256
tokens. A 1,900-token prompt needs 60 blocks whole; compressed after each chunk it never holds
more than its peak (budget, sinks and recent window, plus one chunk), 16 blocks, and it is
admitted when that peak is free (plus what the chunked requests already running may still take),
not its whole prompt.
"""

import pytest
from engine_support import BLOCK, generate, random_prompts, start_engine

from h2o_vllm.engine import engine_config
from h2o_vllm.engine.observe import StepObserver, num_free_blocks, resident_blocks, scheduler_of
from h2o_vllm.footprint import Footprint
from h2o_vllm.policy import Budget

CHUNK, POOL = 256, 96
CONFIG = engine_config(budget=Budget(tokens=256), n_sink=BLOCK, prefill="chunked")
PEAK = Footprint(CONFIG).peak_blocks(2048, CHUNK)
PROMPT, NEW, NUM = 1900, 64, 6


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with start_engine(
        tiny_model_dir,
        CONFIG,
        num_gpu_blocks_override=POOL + 1,  # +1: vLLM's null block
        max_num_batched_tokens=CHUNK,
    ) as llm:
        yield llm


def run(llm, extra_args=None):
    prompts = random_prompts([PROMPT] * NUM)
    scheduler = scheduler_of(llm)
    start = num_free_blocks(scheduler)
    peaks: dict[str, int] = {}

    def record(scheduler, output, before):
        for request in scheduler.running:
            held = resident_blocks(scheduler, request.request_id)
            peaks[request.request_id] = max(peaks.get(request.request_id, 0), held)

    observer = StepObserver(scheduler, [record])
    try:
        outputs = generate(llm, prompts, NEW, extra_args)
    finally:
        observer.close()
    assert [len(o.outputs[0].token_ids) for o in outputs] == [NEW] * NUM
    assert num_free_blocks(scheduler) == start and scheduler.h2o_requests == {}
    return observer.log, peaks


def test_chunked_prompts_are_admitted_by_their_budget(engine):
    assert PEAK == 16 and PEAK * BLOCK < PROMPT
    log, peaks = run(engine)
    assert max(peaks.values()) <= PEAK  # budget + one chunk, from the first chunk on
    assert log.preemptions == 0
    assert log.max_running == NUM  # by their peaks all six fit at once
    assert sum(len(b) for b in log.evictions.values()) >= NUM * (PROMPT // BLOCK - 16)


def test_whole_prompts_are_admitted_by_their_prompt(engine):
    """The same requests prefilled whole: each holds its whole prompt before it is compressed, and
    vLLM admits one only when its 60 prompt blocks are free, so fewer run at once."""
    log, peaks = run(engine, {"h2o_prefill": "whole"})
    assert max(peaks.values()) >= PROMPT // BLOCK
    assert log.max_running < NUM


def test_a_preempted_chunked_request_compresses_again_as_it_re_prefills(engine):
    """Two full-cache requests (policy none) that outgrow the pool together, then a chunked one:
    vLLM preempts the newest running request to make room, and the chunked request, restarted
    from its first token, is compressed chunk by chunk again (the same blocks evicted twice),
    never above its peak, and finishes; the pool returns."""
    prompts = random_prompts([1000, 1000, 1200], seed=5)
    scheduler = scheduler_of(engine)
    start = num_free_blocks(scheduler)
    preempted, peaks = [], {}

    def record(scheduler, output, before):
        preempted.extend(output.preempted_req_ids or ())
        for request in scheduler.running:
            rid = request.request_id
            peaks[rid] = max(peaks.get(rid, 0), resident_blocks(scheduler, rid))

    observer = StepObserver(scheduler, [record])
    try:
        full = {"h2o_policy": "none"}
        # The chunked request is long enough to still run when the full-cache requests fill the pool.
        outputs = generate(engine, prompts, [1000, 1000, 800], [full, full, None])
    finally:
        observer.close()
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1000, 1000, 800]
    (rid,) = [r for r in observer.log.evictions if r.split("-")[0] == outputs[2].request_id]
    assert rid in preempted
    evicted = observer.log.evictions[rid]
    assert len(evicted) > len(set(evicted))  # its first life's blocks went again after the restart
    assert peaks[rid] <= PEAK
    assert num_free_blocks(scheduler) == start and scheduler.h2o_requests == {}
