"""H2O engine settings: defaults, per-request overrides, validation. No engine."""

import math

import pytest

from h2o_vllm.engine.settings import H2OSettingError, H2OSettings, engine_kwargs
from h2o_vllm.policy import Budget


def test_defaults_round_trip_through_additional_config():
    settings = H2OSettings(policy="streaming", budget=Budget(tokens=512), n_sink=64, n_recent=128, prompt_window=32)
    again = H2OSettings.from_additional_config({"h2o": settings.to_config()})
    assert again == settings


def test_request_overrides_only_what_it_names():
    defaults = H2OSettings(budget=Budget(fraction=0.2), n_sink=32)
    req = defaults.for_request({"h2o_budget": "50%", "h2o_prompt_window": 64, "other_plugin_key": 1})
    assert req.budget == Budget(fraction=0.5) and req.prompt_window == 64
    assert req.n_sink == 32 and req.policy == "h2o"
    assert defaults.for_request(None) is defaults
    assert defaults.for_request({"h2o_prompt_window": 0}).prompt_window is None


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"h2o_policy": "lru"}, "h2o_policy"),
        ({"h2o_budget": 0}, "h2o_budget"),
        ({"h2o_budget": -1}, "h2o_budget"),
        ({"h2o_budget": math.nan}, "h2o_budget"),
        ({"h2o_budget": "lots"}, "h2o_budget"),
        ({"h2o_sink": -4}, "h2o_sink"),
        ({"h2o_recent": 2.5}, "h2o_recent"),
        ({"h2o_prompt_window": True}, "h2o_prompt_window"),
        ({"h2o_score_norm": "max"}, "h2o_score_norm"),
        ({"h2o_budgett": 0.2}, "h2o_budgett"),
    ],
)
def test_bad_values_name_the_field(extra, param):
    with pytest.raises(H2OSettingError) as info:
        H2OSettings().for_request(extra)
    assert info.value.param == param


def test_engine_kwargs_force_what_fights_eviction():
    kwargs = engine_kwargs(H2OSettings(budget=Budget(tokens=256)), additional_config={"x": 1}, max_num_seqs=8)
    assert kwargs["block_size"] == 32 and kwargs["enable_prefix_caching"] is False
    assert kwargs["scheduler_cls"].endswith("H2OScheduler") and kwargs["worker_cls"].endswith("H2OCPUWorker")
    assert kwargs["additional_config"] == {"x": 1, "h2o": H2OSettings(budget=Budget(tokens=256)).to_config()}
    assert kwargs["max_num_seqs"] == 8
