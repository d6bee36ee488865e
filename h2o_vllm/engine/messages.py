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


@dataclass
class StepPlan:
    """Scheduler -> worker, once per step."""

    # req_id -> logical block indices whose KV was freed this step (now holes).
    evictions: dict[str, list[int]] = field(default_factory=dict)
    # req_id -> first logical query position whose attention is scored. Requests that
    # are not listed are not scored at all (policies that need no scores cost nothing).
    score_from: dict[str, int] = field(default_factory=dict)
    # Scored requests whose block score is each query's max over heads and layers (else the sum).
    score_max: set[str] = field(default_factory=set)


@dataclass
class BlockScores:
    """Worker -> scheduler: attention mass one request's blocks received in one step.

    Summed over layers, heads and the scored queries (or, for ``score_reduce="max"``,
    each query's largest block mass over layers and heads, summed over queries); ``visibility`` counts the
    (query, token) pairs that could see each block, also summed over layers.
    """

    blocks: np.ndarray  # logical block indices
    mass: np.ndarray
    visibility: np.ndarray
