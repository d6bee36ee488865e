"""What each evaluated configuration asks of the server: a policy and a budget per request.

Configurations are named in the one grammar of :mod:`h2o_vllm.names`; the
evaluation crosses *families* (names without a budget) with budgets:

    full                the full cache, the reference
    streaming           StreamingLLM
    h2o                 H2O, prompt scored by every query row (the paper)
    h2o_window8         H2O, prompt scored by its last 8 rows only (observation window)
    h2o_window8_max     the same, each query's block score the max over heads and layers
                        (``h2o_score_reduce: max``) instead of their sum
    h2o_mean            H2O as the paper scores the prompt, each block's score divided by the
                        number of queries that saw it (``h2o_score_norm: mean``); not run by default

so ``h2o_20%_window8_max`` is the last one at 20% of the sequence. The first
wave's names (``h2o-window``, ``h2o-window-max``, ``h2o-mean``, with the window
from ``--window``) are accepted spellings. Selected per request with
``vllm_xargs`` (any h2o-vllm server), or with the ``MODEL@policy-budget``
model-name aliases that ``h2o-vllm serve`` lists (for clients that can only
choose a model name).
"""

from __future__ import annotations

from dataclasses import dataclass

from h2o_vllm import settings
from h2o_vllm.names import DEFAULT_WINDOW, NamedConfig, parse_name
from h2o_vllm.policy import Budget

POLICIES = ("streaming", "h2o", "h2o-window", "h2o-window-max", "h2o-mean")  # the first wave's families
DEFAULT_POLICIES = POLICIES[:4]
SELECT_MODES = ("xargs", "alias")
# Fields every H2O configuration sends, whatever the server's defaults (a window of 0 = every prompt row).
SCORING_FIELDS = frozenset({"prompt_window", "score_reduce", "score_norm"})

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_WINDOW",
    "POLICIES",
    "SELECT_MODES",
    "EvalConfig",
    "EvalConfigError",
    "eval_configs",
]


class EvalConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EvalConfig:
    named: NamedConfig

    @classmethod
    def of(cls, family: str, budget: float | None = None, window: int = DEFAULT_WINDOW) -> EvalConfig:
        """``family`` (a name without a budget, or ``full``) at ``budget`` (a fraction of the sequence)."""
        try:
            named = parse_name(family, window=window).for_engine()
        except ValueError as exc:
            raise EvalConfigError(str(exc)) from None
        if named.is_full:
            return cls(named)
        if named.has_budget:
            raise EvalConfigError(f"{family!r}: give the policy without a budget, and the budgets with --budgets")
        if budget is None or not 0.0 < budget < 1.0:
            raise EvalConfigError(f"budget {budget!r} must be a fraction between 0 and 1 (0.2 = 20%)")
        return cls(named.with_budget(Budget(fraction=budget)))

    @property
    def policy(self) -> str:
        """The family: the row this configuration takes in the tables."""
        return self.named.family

    @property
    def budget(self) -> float | None:
        return None if self.named.is_full else self.named.config.budget.fraction

    @property
    def name(self) -> str:
        return self.named.name

    def xargs(self) -> dict:
        config = self.named.config
        fields = self.named.named | (SCORING_FIELDS if config.needs_scores else frozenset())
        return settings.to_request_args(config, fields)

    def alias(self, model: str) -> str:
        if self.named.is_full:
            return f"{model}@full"
        if self.named.named != {"policy", "budget"}:
            raise EvalConfigError(
                f"{self.policy} has no model-name alias among the server's defaults; use --select xargs"
            )
        return f"{model}@{self.named.config.policy}-{self.budget:g}"

    def request_fields(self, model: str, select: str) -> tuple[str, dict]:
        """(model name, extra JSON fields) of a request under this configuration."""
        if select == "alias":
            return self.alias(model), {}
        return model, {"vllm_xargs": self.xargs()}


def eval_configs(policies, budgets, window: int = DEFAULT_WINDOW) -> list[EvalConfig]:
    """The full cache first (the other configurations are scored against it), then policy x budget."""
    configs = [EvalConfig.of("full")]
    configs += [EvalConfig.of(p, float(b), window) for p in policies for b in budgets]
    return configs
