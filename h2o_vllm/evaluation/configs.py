"""What each evaluated configuration asks of the server: a policy and a budget per request.

    full            policy none: the full cache, the reference
    streaming_20%   StreamingLLM at 20% of the sequence
    h2o_20%         H2O, prompt scored by every query row (the paper)
    h2o-window_20%  H2O, prompt scored by its last ``window`` rows only (observation window)
    h2o-window-max_20%  the same, each query's block score the max over heads and layers
                    (``h2o_score_reduce: max``) instead of their sum
    h2o-mean_20%    H2O as the paper scores the prompt, each block's score divided by the
                    number of queries that saw it (``h2o_score_norm: mean``); not run by default

Selected per request with ``vllm_xargs`` (any h2o-vllm server), or with the
``MODEL@policy-budget`` model-name aliases that ``h2o-vllm serve`` lists (for
clients that can only choose a model name).
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("streaming", "h2o", "h2o-window", "h2o-window-max", "h2o-mean")
DEFAULT_POLICIES = POLICIES[:4]
DEFAULT_WINDOW = 8  # query rows: the needle's question ("What is the pass key? The pass key is")
SELECT_MODES = ("xargs", "alias")


class EvalConfigError(ValueError):
    pass


@dataclass(frozen=True)
class EvalConfig:
    policy: str  # "full" or one of POLICIES
    budget: float | None = None  # fraction of the sequence; None for full
    window: int = DEFAULT_WINDOW  # observation window of the h2o-window policies, in query rows

    def __post_init__(self):
        if self.policy == "full":
            return
        if self.policy not in POLICIES:
            raise EvalConfigError(f"unknown policy {self.policy!r}; choose from full, {', '.join(POLICIES)}")
        if self.budget is None or not 0.0 < self.budget < 1.0:
            raise EvalConfigError(f"budget {self.budget!r} must be a fraction between 0 and 1 (0.2 = 20%)")

    @property
    def name(self) -> str:
        return "full" if self.policy == "full" else f"{self.policy}_{self.budget * 100:g}%"

    def xargs(self) -> dict:
        if self.policy == "full":
            return {"h2o_policy": "none"}
        if self.policy == "streaming":
            return {"h2o_policy": "streaming", "h2o_budget": self.budget}
        # Every H2O field explicit, whatever the server's defaults (a window of 0 = every prompt row).
        windowed = self.policy.startswith("h2o-window")
        return {
            "h2o_policy": "h2o",
            "h2o_budget": self.budget,
            "h2o_prompt_window": self.window if windowed else 0,
            "h2o_score_reduce": "max" if self.policy == "h2o-window-max" else "sum",
            "h2o_score_norm": "mean" if self.policy == "h2o-mean" else "sum",
        }

    def alias(self, model: str) -> str:
        if self.policy == "full":
            return f"{model}@full"
        if self.policy not in ("streaming", "h2o"):
            raise EvalConfigError(f"{self.policy} has no model-name alias; use --select xargs")
        return f"{model}@{self.policy}-{self.budget:g}"

    def request_fields(self, model: str, select: str) -> tuple[str, dict]:
        """(model name, extra JSON fields) of a request under this configuration."""
        if select == "alias":
            return self.alias(model), {}
        return model, {"vllm_xargs": self.xargs()}


def eval_configs(policies, budgets, window: int = DEFAULT_WINDOW) -> list[EvalConfig]:
    """The full cache first (the other configurations are scored against it), then policy x budget."""
    configs = [EvalConfig("full")]
    configs += [EvalConfig(p, float(b), window) for p in policies for b in budgets]
    return configs
