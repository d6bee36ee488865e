"""One name grammar for a configuration (h2o_vllm.names), and one field table for its other forms (h2o_vllm.settings)."""

import pytest

from h2o_vllm import aliases, names, settings
from h2o_vllm.engine.settings import ENGINE_DEFAULTS
from h2o_vllm.policy import Budget, PolicyConfig
from h2o_vllm.profiles import SERVER


@pytest.mark.parametrize(
    "name, expected",
    [
        ("h2o_20%", dict(policy="h2o", budget=Budget(fraction=0.2))),
        ("h2o_256_sink8_recent32", dict(budget=Budget(tokens=256), n_sink=8, n_recent=32)),
        ("h2o_20%_window8_max", dict(budget=Budget(fraction=0.2), prompt_window=8, score_reduce="max")),
        ("h2o_0.5_mean_b32", dict(budget=Budget(fraction=0.5), score_norm="mean", block_size=32)),
        ("streaming_512", dict(policy="streaming", budget=Budget(tokens=512))),
        ("keynorm_20%_chunked", dict(policy="keynorm", budget=Budget(fraction=0.2), prefill="chunked")),
        ("snapkv_20%_window32", dict(policy="snapkv", budget=Budget(fraction=0.2), prompt_window=32)),
        (
            "h2o_20%_window8_staged3",
            dict(budget=Budget(fraction=0.2), prompt_window=8, prefill="staged", working_set=3),
        ),
        (
            "h2o_20%_window8_staged2_keys",
            dict(
                budget=Budget(fraction=0.2), prompt_window=8, prefill="staged", working_set=2, prefill_score="key_norm"
            ),
        ),
        (
            "h2o_20%_window8_staged2_attn",
            dict(
                budget=Budget(fraction=0.2), prompt_window=8, prefill="staged", working_set=2, prefill_score="attention"
            ),
        ),
        ("full", dict(policy="none")),
    ],
)
def test_names_set_what_they_say_over_the_base(name, expected):
    base = PolicyConfig(n_sink=4)
    assert names.parse_name(name, base).config == base.replace(**expected)


@pytest.mark.parametrize(
    "old, new",
    [
        ("h2o-0.2", "h2o_20%"),  # model-name aliases
        ("streaming-256", "streaming_256"),
        ("keynorm-0.2", "keynorm_20%"),
        ("keynorm_tokens_4096", "keynorm_4096"),  # the engine capacity benchmark's spelling
        ("h2o-window-max_20%", "h2o_20%_window8_max"),  # the first wave's evaluation policies
        ("h2o-window_10%", "h2o_10%_window8"),
        ("h2o-mean_50%", "h2o_50%_mean"),
        ("h2o_8_32_256_mean_head", "h2o_256_sink8_recent32_mean_head"),  # perplexity's sinks, recent, capacity
        ("streaming_8_504", "streaming_512_sink8_recent504"),
        ("h2o_20%_layer_max", "h2o_20%_max_layer"),  # options in any order
        ("baseline", "full"),
    ],
)
def test_older_spellings_parse_to_the_same_configuration(old, new):
    a, b = names.parse_name(old), names.parse_name(new)
    assert (a.config, a.per_layer, a.per_head) == (b.config, b.per_layer, b.per_head)
    assert a.name == new  # and print in the one canonical spelling


def test_canonical_names_round_trip_and_families_drop_the_budget():
    for name in [
        "h2o_20%_window8_max",
        "h2o_1024_sink32_recent64",
        "h2o_20%_r75_mean_layer",
        "streaming_10%",
        "keynorm_20%_sink64_head",
        "h2o_20%_window8_max_staged2",
        "h2o_20%_window8_max_staged2_keys",
        "h2o_20%_window8_max_staged2_attn",
    ]:
        assert names.parse_name(name).name == name
    named = names.parse_name("h2o_window8_max")
    assert not named.has_budget and named.family == "h2o_window8_max"
    assert named.with_budget(Budget(fraction=0.1)).name == "h2o_10%_window8_max"
    assert names.parse_name("h2o-window-max", window=16).name == "h2o_window16_max"


@pytest.mark.parametrize(
    "bad",
    [
        "lru_20%",
        "h2o_20%_foo",
        "h2o_20%_max_max",
        "h2o_0",
        "h2o-x",
        "h2o_20%_window0",
        "keynorm_20%_mean",
        "h2o_20%_chunked_staged2",
        "h2o_20%_staged0",
        "h2o_20%_window8_keys",
        "h2o_20%_staged2_keys",
        "h2o_20%_window8_staged2_keys_attn",
        "h2o_20%_window8_attn",
    ],
)
def test_bad_names_are_refused_with_the_name(bad):
    with pytest.raises(names.ConfigNameError, match=bad):
        names.parse_name(bad)


def test_each_field_has_one_name_and_its_spellings_derive_from_it():
    spellings = {(f.request_key, f.flag, f.env) for f in settings.FIELDS}
    assert ("h2o_prompt_window", "--h2o-prompt-window", "H2O_VLLM_PROMPT_WINDOW") in spellings
    assert len(spellings) == len(settings.FIELDS) == len({f.attr for f in settings.FIELDS})
    assert {f.attr for f in settings.FIELDS} <= set(PolicyConfig.__dataclass_fields__)
    config = ENGINE_DEFAULTS.replace(budget=Budget(tokens=300), prompt_window=8, score_reduce="max")
    assert settings.apply(ENGINE_DEFAULTS, settings.to_dict(config)) == config


def test_values_are_checked_in_one_place_whatever_the_form():
    """The same bad value fails in PolicyConfig, through the field table and through a name."""
    with pytest.raises(ValueError, match="score_reduce|'sum', 'max'"):
        PolicyConfig(score_reduce="mean")
    with pytest.raises(settings.H2OSettingError) as info:
        settings.for_request(ENGINE_DEFAULTS, {"h2o_score_reduce": "mean"})
    assert info.value.param == "h2o_score_reduce"
    with pytest.raises(names.ConfigNameError):
        names.parse_name("h2o_20%_window-3")


def test_needs_scores_is_the_policys_kind():
    assert PolicyConfig("h2o").needs_scores
    assert not PolicyConfig("streaming").needs_scores and not PolicyConfig("none").needs_scores
    assert not PolicyConfig("keynorm").needs_scores and PolicyConfig("keynorm").needs_key_norms


def test_keynorm_in_every_form():
    """A model-name alias, a request's extra args, the policy choices; mean is refused naming the field."""
    assert aliases.split_alias("m@keynorm-0.2") == ("m", {"h2o_policy": "keynorm", "h2o_budget": 0.2})
    base, args = aliases.split_alias("m@keynorm_20%_chunked")
    assert settings.for_request(ENGINE_DEFAULTS, args) == ENGINE_DEFAULTS.replace(
        policy="keynorm", budget=Budget(fraction=0.2), prefill="chunked"
    )
    with pytest.raises(settings.H2OSettingError, match="keynorm") as info:
        settings.for_request(ENGINE_DEFAULTS, {"h2o_policy": "lru"})
    assert info.value.param == "h2o_policy"
    with pytest.raises(settings.H2OSettingError) as info:
        settings.for_request(ENGINE_DEFAULTS, {"h2o_policy": "keynorm", "h2o_score_norm": "mean"})
    assert info.value.param == "h2o_score_norm"
    assert "keynorm" in next(f.help for f in settings.FIELDS if f.name == "policy")


def test_aliases_take_any_name_of_the_grammar():
    assert aliases.split_alias("m@h2o-0.2") == ("m", {"h2o_policy": "h2o", "h2o_budget": 0.2})
    base, args = aliases.split_alias("m@h2o_20%_window8_max")
    assert base == "m" and args == {
        "h2o_policy": "h2o",
        "h2o_budget": 0.2,
        "h2o_prompt_window": 8,
        "h2o_score_reduce": "max",
    }
    assert settings.for_request(ENGINE_DEFAULTS, args).prompt_window == 8
    with pytest.raises(settings.H2OSettingError, match="per-layer"):
        aliases.split_alias("m@h2o_20%_layer")


def test_a_name_becomes_server_options_that_serve_reads_back(monkeypatch):
    import json

    from h2o_vllm import serve

    named = names.parse_name("h2o_20%_window8_max", ENGINE_DEFAULTS)
    args = settings.to_server_args(named.config, named.named)
    assert args[:4] == ["--h2o-policy", "h2o", "--h2o-budget", "0.2"]
    flags, _ = serve.h2o_engine_args(serve.parse_args(args).values, ["m"], env={})
    section = json.loads(flags[flags.index("--additional-config") + 1])["h2o"]
    assert settings.apply(ENGINE_DEFAULTS, section) == named.config


@pytest.mark.parametrize(
    "name",
    [
        "h2o_20%",
        "h2o_20%_window8_max",
        "streaming_20%",
        "keynorm_20%_chunked",
        "h2o_20%_staged3",
        "h2o_20%_window8_max_staged2_keys",
        "h2o_20%_window8_max_staged2_attn",
        "h2o_20%_window8_max_staged2",
        "full",
    ],
)
def test_a_pinned_name_runs_as_named_whatever_the_servers_defaults(name):
    """What a benchmark starts a server with: the name over ENGINE_DEFAULTS (the paper's scoring for
    ``h2o_20%``), not over the server's own profile (an 8-row window, max)."""
    import json

    from h2o_vllm import serve

    named = names.parse_name(name, ENGINE_DEFAULTS)
    args = settings.to_server_args(named.config, named.pinned)
    flags, _ = serve.h2o_engine_args(serve.parse_args(args).values, ["m"], env={})
    section = json.loads(flags[flags.index("--additional-config") + 1])["h2o"]
    served = settings.apply(SERVER, section)  # the server fills in what the flags leave out from its profile
    attrs = ["policy"] if named.is_full else ["policy", "budget", "prefill"]
    if named.config.prefill == "staged":
        attrs += ["working_set", "prefill_score"]
    if named.config.needs_scores:
        attrs += ["prompt_window", "score_reduce", "score_norm"]
    for attr in attrs:
        assert getattr(served, attr) == getattr(named.config, attr), attr
    if name == "h2o_20%":
        assert "--h2o-prompt-window" in args and served.prompt_window is None and served.score_reduce == "sum"
