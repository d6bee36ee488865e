"""What the H2O scheduler and the workers tell each other each step.

Both ride on vLLM's own step messages as one extra attribute (vLLM pickles
``SchedulerOutput`` and ``ModelRunnerOutput`` between processes, and neither
uses ``__slots__``, so an attribute survives the trip). Plain Python and numpy
only: no torch tensors cross the process boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PLAN_ATTR = "h2o_plan"  # on SchedulerOutput
SCORES_ATTR = "h2o_scores"  # on ModelRunnerOutput


@dataclass(frozen=True)
class ScoreRequest:
    """Which of one request's query rows to score this step, and how to combine heads and layers."""

    first_position: int  # first logical query position whose attention is scored
    reduce: str  # "sum" or "max" (h2o_vllm.policy.SCORE_REDUCE)


@dataclass
class StepPlan:
    """Scheduler -> worker, once per step."""

    # req_id -> logical block indices whose KV was freed this step (now holes).
    evictions: dict[str, list[int]] = field(default_factory=dict)
    # Requests whose attention is scored. Requests not listed are not scored at all
    # (policies that need no scores cost nothing).
    score_requests: dict[str, ScoreRequest] = field(default_factory=dict)
    # Requests whose new keys' L2 norms are summed per block this step (key-norm eviction).
    key_norms: set[str] = field(default_factory=set)


@dataclass
class BlockScores:
    """Worker -> scheduler: what one request's blocks scored in one step, to add to its ledger.

    Attention (h2o): the mass summed over layers, heads and the scored queries (or, for
    ``score_reduce="max"``, each query's largest block mass over layers and heads, summed
    over queries); ``visibility`` counts the (query, token) pairs that could see each
    block, also summed over layers. Key norms (keynorm): the L2 norms of the keys written
    this step, summed over layers and KV heads, and no visibility.
    """

    blocks: np.ndarray  # logical block indices
    mass: np.ndarray
    visibility: np.ndarray | None = None
