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
    keynorm             key-norm eviction: the blocks whose keys have the largest L2 norms go
                        first (no attention scores); not run by default

so ``h2o_20%_window8_max`` is the last one at 20% of the sequence and
``h2o_1024_window8_max`` at 1024 tokens (budgets as :meth:`Budget.parse
<h2o_vllm.policy.Budget.parse>` reads them: ``0.2``, ``20%`` or ``1024``). Any
family may end in ``_chunked`` (``h2o_window8_max_chunked``): the prompt is
compressed after every prefill chunk. Every evicting configuration sends its
``h2o_prefill`` (``whole`` unless the name says ``chunked``), H2O ones their
scoring fields too, so results do not depend on the server's defaults. The first
wave's names (``h2o-window``, ``h2o-window-max``, ``h2o-mean``, with the window
from ``--window``) are accepted spellings. Selected per request with
``vllm_xargs`` (any h2o-vllm server), or with the ``MODEL@policy-budget``
model-name aliases that ``h2o-vllm serve`` lists (for clients that can only
choose a model name): ``h2o-0.2`` and the other defaults, or ``h2o-1024`` and
any other budget the server was given with ``--h2o-aliases``.

Every configuration asks for the same prompts, so with vLLM's prefix caching on (its
default) a request may take a prompt another configuration computed. The server caps that
hit so that it changes no decision (``Footprint.max_prefix_hit``), except for H2O scored by
every prompt row with the prompt compressed whole (the paper's scoring): a hit of H tokens
then decides as a prompt window of N - H rows would. Those configurations send a
``cache_salt`` of their own name (:attr:`EvalConfig.cache_salt`), so they never take a
prompt computed for another configuration and are measured as a prompt never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2o_vllm import settings
from h2o_vllm.names import DEFAULT_WINDOW, NamedConfig, parse_name
from h2o_vllm.policy import Budget

POLICIES = ("streaming", "h2o", "h2o-window", "h2o-window-max", "h2o-mean")  # the first wave's families
DEFAULT_POLICIES = POLICIES[:4]
SELECT_MODES = ("xargs", "alias")

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
    def of(cls, family: str, budget: Budget | float | str | None = None, window: int = DEFAULT_WINDOW) -> EvalConfig:
        """``family`` (a name without a budget, or ``full``) at ``budget``: a fraction below 1 or a token count."""
        try:
            named = parse_name(family, window=window).for_engine()
        except ValueError as exc:
            raise EvalConfigError(str(exc)) from None
        if named.is_full:
            return cls(named)
        if named.has_budget:
            raise EvalConfigError(f"{family!r}: give the policy without a budget, and the budgets with --budgets")
        return cls(named.with_budget(_budget(budget)))

    @property
    def policy(self) -> str:
        """The family: the row this configuration takes in the tables."""
        return self.named.family

    @property
    def budget(self) -> Budget | None:
        return None if self.named.is_full else self.named.config.budget

    @property
    def name(self) -> str:
        return self.named.name

    @property
    def cache_salt(self) -> str | None:
        """A ``cache_salt`` for configurations whose decisions a prefix-cache hit would change
        (every prompt row scores, prompt compressed whole), so that they take no hit another
        configuration left; None for the others."""
        config = self.named.config
        if self.named.is_full or not config.needs_scores or config.prefill != "whole":
            return None
        # vLLM refuses a salt with '/', '@', '\\' or NUL, or over 128 characters; names have none of those.
        return f"h2o-vllm-eval-{self.name}" if config.prompt_window is None else None

    def xargs(self) -> dict:
        """The request's ``vllm_xargs``: every field that must not come from the server's defaults
        (:attr:`NamedConfig.pinned`; a window of 0 is every prompt row)."""
        return settings.to_request_args(self.named.config, self.named.pinned)

    def alias(self, model: str) -> str:
        if self.named.is_full:
            return f"{model}@full"
        if self.named.named != {"policy", "budget"}:
            raise EvalConfigError(
                f"{self.policy} has no model-name alias among the server's defaults; use --select xargs"
            )
        budget = self.budget  # spelled as the server's default aliases: h2o-0.2 (and h2o-1024 for tokens)
        value = budget.tokens if budget.tokens is not None else f"{budget.fraction:g}"
        return f"{model}@{self.named.config.policy}-{value}"

    def request_fields(self, model: str, select: str) -> tuple[str, dict]:
        """(model name, extra JSON fields) of a request under this configuration."""
        salt = {} if self.cache_salt is None else {"cache_salt": self.cache_salt}
        if select == "alias":
            return self.alias(model), salt
        return model, {"vllm_xargs": self.xargs(), **salt}


def eval_configs(policies, budgets, window: int = DEFAULT_WINDOW) -> list[EvalConfig]:
    """The full cache first (the other configurations are scored against it), then policy x budget."""
    configs = [EvalConfig.of("full")]
    configs += [EvalConfig.of(p, b, window) for p in policies for b in budgets]
    return list({c.name: c for c in configs}.values())  # 0.2 and 20% are one configuration


def _budget(value: Budget | float | str | None) -> Budget:
    """``value`` as :meth:`Budget.parse` reads it, if the evaluation can use it (not the whole sequence)."""
    hint = "give a fraction below 1 (0.2, 20%) or a token count (1024)"
    if value is None:
        raise EvalConfigError(f"a policy needs a budget: {hint}")
    try:
        budget = Budget.parse(value)
    except (TypeError, ValueError) as exc:
        raise EvalConfigError(f"bad budget {value!r} ({exc}): {hint}") from None
    if budget.fraction == 1.0:
        raise EvalConfigError(f"budget {value!r} is the whole sequence, the full cache (already run): {hint}")
    return budget
