"""One name grammar for a configuration, used by aliases, the evaluation and the benchmarks.

    NAME    := "full" | POLICY ["_" BUDGET] {"_" OPTION}
    POLICY  := a name in h2o_vllm.policy.POLICIES other than "none": "h2o" | "keynorm" | "streaming"
    BUDGET  := P% | a fraction up to 1 (0.2) | a token count (256)
    OPTION  := sinkN            N sink tokens
             | recentN          N recent tokens
             | rNN              NN% of what the sinks leave goes to the recent window (benchmarks)
             | windowN          the prompt is scored by its last N query rows (observation window)
             | mean | max       score_norm="mean", score_reduce="max"
             | chunked          prefill="chunked": compressed after every prefill chunk
             | stagedN          prefill="staged", working_set=N: N budgets kept while prefilling,
                                then the budget, ranked by the prompt's last rows
             | keys | attn      prefill_score="key_norm" or "attention": what ranks the staged
                                working set (unset: "auto", key norms wherever they can)
             | bN               blocks of N tokens
             | layer | head     transformers only: per-layer, or per-layer-and-KV-head decisions

Examples: ``h2o_20%``, ``h2o_20%_window8_max``, ``streaming_256``, ``keynorm_20%``,
``h2o_1024_sink32_recent64``, ``h2o_20%_window8_max_staged2``, ``h2o_20%_window8_max_staged2_attn``.
A name without a budget (``h2o_window8_max``) is a *family*: the evaluation
crosses families with budgets. What a name leaves out comes from a base
configuration (the server's defaults, or a benchmark's).

Older spellings stay accepted: ``h2o-0.2``, ``streaming-256`` and ``keynorm-0.2``
(model-name aliases), ``h2o_tokens_4096`` (engine capacity benchmark), ``h2o-window``,
``h2o-window-max`` and ``h2o-mean`` (evaluation policies, with an ``_P%`` budget after
them), ``h2o_S_R_C`` and ``streaming_S_W`` (sinks, recent and capacity of the perplexity
benchmark), ``baseline`` and ``none`` for ``full``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from h2o_vllm.policy import POLICIES, Budget, PolicyConfig, PolicyConfigError
from h2o_vllm.profiles import OBSERVATION_WINDOW, PAPER

# The policies a name may start with ("full" is policy "none").
_POLICIES = tuple(sorted(name for name in POLICIES if name != "none"))  # "none" is spelled "full"
_POLICY = "|".join(_POLICIES)

# Canonical order of the options in a name.
_OPTIONS = (
    ("sink", r"sink(\d+)"),
    ("recent", r"recent(\d+)"),
    ("recent_share", r"r(\d+)"),
    ("window", r"window(\d+)"),
    ("mean", r"mean"),
    ("max", r"max"),
    ("chunked", r"chunked"),
    ("staged", r"staged(\d+)"),
    ("keys", r"keys"),
    ("attn", r"attn"),
    ("block", r"b(\d+)"),
    ("layer", r"layer"),
    ("head", r"head"),
)
# Evaluation policies of the first wave -> options of this grammar ({w}: the observation window).
_LEGACY_FAMILIES = {"h2o-window": "window{w}", "h2o-window-max": "window{w}_max", "h2o-mean": "mean"}
DEFAULT_WINDOW = OBSERVATION_WINDOW  # rows of the legacy h2o-window names


class ConfigNameError(ValueError):
    """A configuration name that does not parse."""


@dataclass(frozen=True)
class NamedConfig:
    """What a name says: a configuration, which of its fields the name set, and transformers-only options."""

    config: PolicyConfig
    named: frozenset = field(default_factory=frozenset)  # PolicyConfig attributes the name set
    per_layer: bool = False
    per_head: bool = False
    recent_share: float | None = None  # rNN: share of (budget - sinks) kept recent

    @property
    def is_full(self) -> bool:
        return self.config.policy == "none"

    @property
    def has_budget(self) -> bool:
        return "budget" in self.named

    def for_engine(self) -> NamedConfig:
        """This configuration, if the paged engine can run it (no per-layer, recent-share or block-size option)."""
        if self.per_layer or self.recent_share is not None or "block_size" in self.named:
            raise ConfigNameError(f"{self.name}: the engine has no per-layer, recent-share or block-size option")
        return self

    @property
    def pinned(self) -> frozenset:
        """The fields to send a server so that it runs this configuration whatever its defaults:
        those the name set, when a prompt is compressed for any evicting configuration, and
        the scoring fields for one that scores attention (the server's default scoring is not
        the base a name is read over)."""
        fields = set(self.named)
        if not self.is_full:
            fields.add("prefill")
        if self.config.prefill == "staged":
            fields |= {"working_set", "prefill_score"}
        if self.config.needs_scores:
            fields |= {"prompt_window", "score_reduce", "score_norm"}
        return frozenset(fields)

    def with_budget(self, budget: Budget) -> NamedConfig:
        return NamedConfig(
            self.config.replace(budget=budget),
            self.named | {"budget"},
            self.per_layer,
            self.per_head,
            self.recent_share,
        )

    @property
    def family(self) -> str:
        """The name without its budget."""
        return format_name(self, budget=False)

    @property
    def name(self) -> str:
        return format_name(self)


def _budget_text(budget: Budget) -> str:
    return f"{budget.tokens}" if budget.tokens is not None else f"{budget.fraction * 100:g}%"


def format_name(named: NamedConfig, budget: bool = True) -> str:
    """The canonical spelling of ``named``: only what it set, options in a fixed order."""
    if named.is_full:
        return "full"
    c, parts = named.config, [named.config.policy]
    if budget and named.has_budget:
        parts.append(_budget_text(c.budget))
    values = {
        "sink": c.n_sink if "n_sink" in named.named else None,
        "recent": c.n_recent if "n_recent" in named.named and named.recent_share is None else None,
        "recent_share": None if named.recent_share is None else round(named.recent_share * 100),
        "window": c.prompt_window if "prompt_window" in named.named else None,
        "mean": ("score_norm" in named.named and c.score_norm == "mean") or None,
        "max": ("score_reduce" in named.named and c.score_reduce == "max") or None,
        "chunked": ("prefill" in named.named and c.prefill == "chunked") or None,
        "staged": c.working_set if "prefill" in named.named and c.prefill == "staged" else None,
        "keys": ("prefill_score" in named.named and c.prefill_score == "key_norm") or None,
        "attn": ("prefill_score" in named.named and c.prefill_score == "attention") or None,
        "block": c.block_size if "block_size" in named.named else None,
        "layer": (named.per_layer and not named.per_head) or None,
        "head": named.per_head or None,
    }
    for key, pattern in _OPTIONS:
        value = values[key]
        if value is None:
            continue
        prefix = pattern.split("(")[0]
        parts.append(prefix if value is True else f"{prefix}{value}")
    return "_".join(parts)


def _legacy(name: str, window: int) -> str:
    """An older spelling rewritten in this grammar (unchanged if it is not one)."""
    if name in ("baseline", "none"):
        return "full"
    family, _, budget = name.partition("_")
    if family in _LEGACY_FAMILIES:  # h2o-window-max_20% -> h2o_20%_window8_max
        return "_".join(p for p in ("h2o", budget, _LEGACY_FAMILIES[family].format(w=window)) if p)
    if m := re.fullmatch(rf"({_POLICY})-([^_]+)", name):  # model-name aliases: h2o-0.2
        return f"{m.group(1)}_{m.group(2)}"
    if m := re.fullmatch(rf"({_POLICY})_tokens_(\d+)", name):  # the engine capacity benchmark: h2o_tokens_4096
        return f"{m.group(1)}_{m.group(2)}"
    if m := re.fullmatch(r"h2o_(\d+)_(\d+)_(\d+)((?:_\w+)?)", name):  # sinks, recent, capacity
        return f"h2o_{m.group(3)}_sink{m.group(1)}_recent{m.group(2)}{m.group(4)}"
    if m := re.fullmatch(r"streaming_(\d+)_(\d+)((?:_\w+)?)", name):  # sinks, window
        sink, recent = int(m.group(1)), int(m.group(2))
        return f"streaming_{sink + recent}_sink{sink}_recent{recent}{m.group(3)}"
    return name


def parse_name(name: str, base: PolicyConfig | None = None, *, window: int = DEFAULT_WINDOW) -> NamedConfig:
    """``name`` in this grammar (or an older spelling) over ``base``; ``window`` fills the legacy h2o-window names."""
    base = base or PAPER
    text = _legacy(name.strip(), window)
    if text == "full":
        return NamedConfig(base.replace(policy="none"), frozenset({"policy"}))
    policy, *parts = text.split("_")
    if policy not in _POLICIES:
        raise ConfigNameError(f"configuration {name!r}: it must start with {', '.join(_POLICIES)} or be full")
    changes: dict = {"policy": policy}
    found: dict[str, str | None] = {}
    if parts and re.fullmatch(r"\d+(?:\.\d+)?%?", parts[0]):
        try:
            changes["budget"] = Budget.parse(parts.pop(0))
        except ValueError as exc:
            raise ConfigNameError(f"configuration {name!r}: {exc}") from None
    for part in parts:
        key = next((k for k, pattern in _OPTIONS if re.fullmatch(pattern, part)), None)
        if key is None or key in found:
            options = ", ".join(p.replace(r"(\d+)", "N") for _, p in _OPTIONS)
            raise ConfigNameError(f"configuration {name!r}: unknown or repeated option {part!r}; options: {options}")
        match = re.fullmatch(dict(_OPTIONS)[key], part)
        found[key] = match.group(1) if match.groups() else None
    attrs = {"sink": "n_sink", "recent": "n_recent", "window": "prompt_window", "block": "block_size"}
    for key, attr in attrs.items():
        if key in found:
            changes[attr] = int(found[key])
    if "mean" in found:
        changes["score_norm"] = "mean"
    if "max" in found:
        changes["score_reduce"] = "max"
    if "chunked" in found and "staged" in found:
        raise ConfigNameError(f"configuration {name!r}: chunked and stagedN both set when a prompt is compressed")
    if "chunked" in found:
        changes["prefill"] = "chunked"
    if "staged" in found:
        changes["prefill"] = "staged"
        changes["working_set"] = int(found["staged"])
    if "keys" in found and "attn" in found:
        raise ConfigNameError(f"configuration {name!r}: keys and attn both set what ranks the working set")
    if "keys" in found:
        changes["prefill_score"] = "key_norm"
    if "attn" in found:
        changes["prefill_score"] = "attention"
    try:
        config = base.replace(**changes)
    except PolicyConfigError as exc:
        raise ConfigNameError(f"configuration {name!r}: {exc}") from None
    if "attn" in found and config.prefill != "staged":
        raise ConfigNameError(f"configuration {name!r}: attn ranks a staged working set; add stagedN")
    share = int(found["recent_share"]) / 100 if "recent_share" in found else None
    return NamedConfig(
        config,
        frozenset(changes),
        per_layer="layer" in found or "head" in found,
        per_head="head" in found,
        recent_share=share,
    )
