"""H2O engine settings: defaults, per-request overrides, validation (h2o_vllm.settings). No engine."""

import math

import pytest

from h2o_vllm import settings
from h2o_vllm.engine.settings import engine_config, engine_kwargs, server_defaults
from h2o_vllm.policy import Budget
from h2o_vllm.settings import H2OSettingError, for_request


def test_defaults_round_trip_through_additional_config():
    config = engine_config(
        policy="streaming", budget=Budget(tokens=512), n_sink=64, n_recent=128, prompt_window=32, score_reduce="max"
    )
    again = server_defaults({"h2o": settings.to_dict(config)})
    assert again == config


def test_request_overrides_only_what_it_names():
    defaults = engine_config(budget=Budget(fraction=0.2), n_sink=32)
    req = for_request(defaults, {"h2o_budget": "50%", "h2o_prompt_window": 64, "other_plugin_key": 1})
    assert req.budget == Budget(fraction=0.5) and req.prompt_window == 64
    assert req.n_sink == 32 and req.policy == "h2o"
    assert for_request(defaults, None) is defaults
    assert for_request(defaults, {"h2o_prompt_window": 0}).prompt_window is None
    assert for_request(defaults, {"h2o_score_reduce": "max"}).score_reduce == "max"


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
        ({"h2o_score_reduce": "mean"}, "h2o_score_reduce"),
        ({"h2o_prefill": "lazy"}, "h2o_prefill"),
        ({"h2o_budgett": 0.2}, "h2o_budgett"),
    ],
)
def test_bad_values_name_the_field(extra, param):
    with pytest.raises(H2OSettingError) as info:
        for_request(engine_config(), extra)
    assert info.value.param == param


def test_engine_kwargs_force_what_fights_eviction():
    kwargs = engine_kwargs(engine_config(budget=Budget(tokens=256)), additional_config={"x": 1}, max_num_seqs=8)
    assert kwargs["block_size"] == 32 and "enable_prefix_caching" not in kwargs  # vLLM's default: on
    assert kwargs["scheduler_cls"].endswith("H2OScheduler") and kwargs["worker_cls"].endswith("H2OCPUWorker")
    assert kwargs["additional_config"] == {"x": 1, "h2o": settings.to_dict(engine_config(budget=Budget(tokens=256)))}
    assert kwargs["max_num_seqs"] == 8


def _config(**changes):
    from types import SimpleNamespace

    from vllm.config import CompilationMode

    config = SimpleNamespace(
        speculative_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1),
        kv_transfer_config=None,
        scheduler_config=SimpleNamespace(async_scheduling=False),
        use_v2_model_runner=False,
        cache_config=SimpleNamespace(block_size=32, enable_prefix_caching=True),
        compilation_config=SimpleNamespace(mode=CompilationMode.VLLM_COMPILE),
    )
    for path, value in changes.items():
        target = config
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"speculative_config": object()}, "speculative decoding"),
        (
            {"parallel_config.pipeline_parallel_size": 2, "compilation_config.mode": 0},  # CompilationMode.NONE
            "pipeline parallelism with --enforce-eager",
        ),
        ({"parallel_config.data_parallel_size": 2}, "data parallelism across the experts"),
        ({"kv_transfer_config": object()}, "KV connectors"),
        ({"scheduler_config.async_scheduling": True}, "async scheduling"),
        ({"use_v2_model_runner": True}, "V2 model runner"),
        ({"cache_config.block_size": 128}, "--block-size 32"),
    ],
)
def test_engine_refuses_what_it_cannot_do(change, message):
    from h2o_vllm.engine.scheduler import check_engine_config

    with pytest.raises(ValueError, match=message):
        check_engine_config(_config(**change))


def test_engine_takes_tensor_and_pipeline_parallelism():
    from h2o_vllm.engine.scheduler import check_engine_config

    check_engine_config(_config(**{"parallel_config.tensor_parallel_size": 2}))
    check_engine_config(_config(**{"parallel_config.pipeline_parallel_size": 2}))
    check_engine_config(_config(**{"compilation_config.mode": 0}))  # eager is fine without stages


@pytest.mark.parametrize("enabled", [True, False])
def test_engine_leaves_prefix_caching_as_the_user_set_it(enabled):
    from h2o_vllm.engine.scheduler import check_engine_config

    config = _config(**{"cache_config.enable_prefix_caching": enabled})
    check_engine_config(config)
    assert config.cache_config.enable_prefix_caching is enabled
