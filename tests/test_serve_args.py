"""h2o-vllm serve fills in defaults and passes every vllm serve argument through."""

import pytest

from h2o_vllm import serve


@pytest.fixture
def no_model_build(monkeypatch, tmp_path):
    from h2o_vllm import assets

    prepared = assets.PreparedModel(tmp_path / "default-model", reused=True)
    monkeypatch.setattr(
        assets,
        "prepare_model",
        lambda spec, **_: assets.PreparedModel(
            tmp_path / spec.title if spec is not assets.DEFAULT_MODEL else prepared.path, reused=True
        ),
    )
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return prepared.path


def build(args, cpu=True, env=None):
    return serve.build_serve_argv(args, cpu=cpu, log=lambda *_: None, env=env or {})


def flag_values(argv, flag):
    """Values following ``flag`` up to the next flag."""
    i = argv.index(flag)
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    return argv[i + 1 : j]


def test_defaults_serve_the_default_model_with_h2o_on_loopback(no_model_build):
    import json

    argv = build([])
    assert argv[:2] == ["serve", str(no_model_build)]
    assert flag_values(argv, "--host") == ["127.0.0.1"] and flag_values(argv, "--port") == ["8000"]
    assert flag_values(argv, "--kv-cache-memory-bytes") == [serve.DEFAULT_CPU_KV_CACHE]
    assert flag_values(argv, "--shutdown-timeout") == [serve.DEFAULT_SHUTDOWN_TIMEOUT]
    names = flag_values(argv, "--served-model-name")
    assert names[0] == "smollm2-135m" and "smollm2-135m@h2o-0.2" in names and "smollm2-135m@full" in names
    assert flag_values(argv, "--scheduler-cls") == ["h2o_vllm.engine.scheduler.H2OScheduler"]
    assert flag_values(argv, "--worker-cls") == ["h2o_vllm.engine.worker.H2OCPUWorker"]
    assert flag_values(argv, "--block-size") == ["32"]
    assert "--no-enable-prefix-caching" not in argv and "--enable-prefix-caching" not in argv  # vLLM's default
    h2o = json.loads(flag_values(argv, "--additional-config")[0])["h2o"]
    assert h2o["policy"] == "h2o" and h2o["budget"] == 1024  # profiles.SERVER
    # the defaults chosen by measurement (results/defaults): an 8-row prompt window and max
    assert (h2o["prompt_window"], h2o["score_reduce"], h2o["score_norm"]) == (8, "max", "sum")


def test_the_papers_scoring_is_one_option_away(no_model_build):
    import json

    argv = build(["--h2o-prompt-window", "0"], env={"H2O_VLLM_SCORE_REDUCE": "sum"})
    h2o = json.loads(flag_values(argv, "--additional-config")[0])["h2o"]
    assert (h2o["prompt_window"], h2o["score_reduce"]) == (None, "sum")


def test_user_arguments_win_and_pass_through(no_model_build):
    user = [
        "--port=9001",
        "--host",
        "0.0.0.0",
        "--max_model_len",
        "2048",
        "--gpu-memory-utilization",
        "0.3",
        "--enforce-eager",
    ]
    argv = build(user + ["--served-model-name", "mine", "--no-h2o"])
    grace = ["--shutdown-timeout", serve.DEFAULT_SHUTDOWN_TIMEOUT]
    assert argv == ["serve", str(no_model_build), "--served-model-name", "mine", *grace, *user]
    assert "--shutdown-timeout" not in build(user + ["--shutdown-timeout=3"])  # the user's grace wins
    argv = build(user + ["--served-model-name", "mine"])
    assert argv[-len(user) :] == user and "mine@h2o-0.5" in flag_values(argv, "--served-model-name")
    for flag in ("--no-enable-prefix-caching", "--enable-prefix-caching"):  # vLLM parses them, with H2O too
        assert build([flag])[-1] == flag


def test_named_model_is_served_as_given(no_model_build):
    argv = build(["/models/other", "--dtype", "float32", "--no-h2o"], cpu=False)
    grace = ["--shutdown-timeout", serve.DEFAULT_SHUTDOWN_TIMEOUT]
    assert argv == ["serve", "/models/other", "--host", "127.0.0.1", "--port", "8000", *grace, "--dtype", "float32"]
    argv = build(["--model=/models/x", "--no-h2o"], cpu=False)
    assert argv[:2] == ["serve", "/models/x"] and "--model=/models/x" not in argv
    argv = build(["--seed", "3", "--model", "/models/y", "--no-h2o"], cpu=False)
    assert argv[:2] == ["serve", "/models/y"] and argv[-2:] == ["--seed", "3"]


def test_legacy_cpu_kv_env_is_respected(no_model_build, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert "--kv-cache-memory-bytes" not in build([])


def test_h2o_options_and_their_environment_variables(no_model_build):
    import json

    argv = build(
        ["--h2o-policy", "streaming", "--h2o-budget=20%", "--h2o-sink", "64", "--h2o-aliases", "h2o-256,full"]
        + ["--h2o-prefill", "staged"],
        env={
            "H2O_VLLM_PROMPT_WINDOW": "32",
            "H2O_VLLM_POLICY": "h2o",
            "H2O_VLLM_SCORE_REDUCE": "max",
            "H2O_VLLM_WORKING_SET": "3",
        },
    )
    h2o = json.loads(flag_values(argv, "--additional-config")[0])["h2o"]
    assert h2o == {
        "policy": "streaming",
        "budget": 0.2,
        "sink": 64,
        "recent": None,
        "prompt_window": 32,
        "score_norm": "sum",
        "score_reduce": "max",
        "prefill": "staged",
        "working_set": 3,
        "prefill_score": "auto",
    }
    assert flag_values(argv, "--served-model-name") == ["smollm2-135m", "smollm2-135m@h2o-256", "smollm2-135m@full"]
    assert not any(a.startswith("--h2o") for a in argv)
    argv = build([], env={"H2O_VLLM_DISABLE": "1"})
    assert "--scheduler-cls" not in argv


@pytest.mark.parametrize(
    "args, message",
    [
        (["--h2o-budget", "0"], "h2o-budget"),
        (["--h2o-policy", "lru"], "h2o-policy"),
        (["--h2o-aliases", "h2o-x"], "h2o-aliases"),
        (["--block-size", "16"], "--block-size 32"),
    ],
)
def test_bad_h2o_options_fail_before_vllm_starts(no_model_build, args, message):
    with pytest.raises(serve.ServeArgumentError, match=message):
        build(args)


def test_h2o_refused_on_a_gpu_build_with_a_way_out(no_model_build):
    with pytest.raises(serve.ServeArgumentError, match="--no-h2o"):
        build([], cpu=False)


def test_unknown_command_fails_with_usage(capsys):
    from h2o_vllm import cli

    assert cli.main(["srve"]) == 2
    assert "unknown command 'srve'" in capsys.readouterr().err


def test_a_short_model_name_serves_that_model_under_its_name(no_model_build):
    argv = build(["qwen2.5-coder-0.5b", "--max-model-len", "4096"])
    assert argv[1].endswith("Qwen2.5-Coder-0.5B-Instruct")
    names = flag_values(argv, "--served-model-name")
    assert names[0] == "qwen2.5-coder-0.5b" and "qwen2.5-coder-0.5b@h2o-0.2" in names
    assert flag_values(argv, "--max-model-len") == ["4096"]
    # a path or hub-style name is passed through untouched
    assert build(["/models/other"])[1] == "/models/other"


def test_tensor_parallel_ranks_get_a_share_of_the_cpus_where_numa_cannot_give_one():
    assert serve.cpu_binding(["-tp", "2"], env={}, cpus=range(2), numa_nodes=1) == "0|1"
    assert serve.cpu_binding(["--tensor-parallel-size=2"], env={}, cpus=range(8), numa_nodes=1) == "0-3|4-7"
    assert serve.cpu_binding(["-tp", "2", "-pp", "2"], env={}, cpus=range(4), numa_nodes=1) == "0|1|2|3"
    assert serve.cpu_binding(["-tp", "2"], env={}, cpus=range(8), numa_nodes=2) is None  # vLLM's default works
    assert serve.cpu_binding(["-tp", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, cpus=range(2)) is None
    assert serve.cpu_binding(["--max-model-len", "2"], env={}, cpus=range(2), numa_nodes=1) is None
    with pytest.raises(serve.ServeArgumentError, match="at least 4 CPUs"):
        serve.cpu_binding(["-tp", "4"], env={}, cpus=range(2), numa_nodes=1)


def test_data_parallel_engines_get_one_api_server_and_a_share_of_the_cpus_each(no_model_build):
    argv = build(["-dp", "2"])
    assert flag_values(argv, "--api-server-count") == ["1"]  # H2O's /metrics and drain live in it
    assert "--api-server-count" not in build(["-dp", "2", "--no-h2o"])  # vanilla: vLLM's default
    assert "--api-server-count" not in build(["--max-model-len", "512"])
    assert flag_values(build(["-dp", "2", "-asc", "1"]), "-asc") == ["1"]
    assert "--api-server-count" not in build(["-dp", "2", "--headless", "--data-parallel-start-rank", "1"])
    with pytest.raises(serve.ServeArgumentError, match="one API server fronts the data-parallel engines"):
        build(["--data-parallel-size=2", "--api-server-count", "2"])
    # vLLM slices the list per engine ([DP, PP, TP]); "auto" would bind both engines to core 0.
    assert serve.cpu_binding(["-dp", "2"], env={}, cpus=range(2), numa_nodes=1) == "0|1"
    assert serve.cpu_binding(["-dp", "2", "-tp", "2"], env={}, cpus=range(8), numa_nodes=1) == "0-1|2-3|4-5|6-7"
    assert serve.cpu_binding(["-dp", "2"], env={}, cpus=range(8), numa_nodes=2) is None


@pytest.mark.parametrize("cache", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_an_fp8_cache_is_served_where_vllm_has_fp8_kernels_and_refused_with_why_elsewhere(
    no_model_build, monkeypatch, cache
):
    from h2o_vllm import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"sse4_2", "avx2", "fma"})  # an AVX2-only CPU
    with pytest.raises(serve.ServeArgumentError, match="needs vLLM's AVX-512 or AMX attention kernels"):
        build(["--kv-cache-dtype", cache])
    with pytest.raises(serve.ServeArgumentError, match="AVX2 at most"):
        build([f"--kv-cache-dtype={cache}"])
    build(["--kv-cache-dtype", cache, "--no-h2o"])  # vLLM as is: its own checks
    for flags in ({"avx2", "avx512f"}, {"avx2", "amx_tile", "avx512f"}):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert flag_values(build(["--kv-cache-dtype", cache]), "--kv-cache-dtype") == [cache]


def test_a_cache_dtype_h2o_cannot_read_is_refused(no_model_build):
    with pytest.raises(serve.ServeArgumentError, match="cannot score a 'int8' KV cache"):
        build(["--kv-cache-dtype", "int8"])


@pytest.mark.parametrize("flag", serve.FLAGS, ids=lambda flag: flag.name)
def test_every_flag_of_the_table_parses_alike_in_each_spelling(flag):
    if flag.values == 0:
        assert serve.parse_args([flag.name, "--seed", "3"]).values == {flag.name: True}
        with pytest.raises(serve.ServeArgumentError, match=f"{flag.name} takes no value"):
            serve.parse_args([f"{flag.name}=1"])
        return
    value = "v" if flag.values == 1 else ["v"]
    spellings = [[flag.name, "v"], [f"{flag.name}=v"], ["--" + flag.name[2:].replace("-", "_"), "v"]]
    spellings += [[flag.short, "v"], [f"{flag.short}=v"]] if flag.short else []
    for args in spellings:
        parsed = serve.parse_args(["--seed", "3", *args, "--enforce-eager"])
        assert parsed.values == {flag.name: value}, args
        taken = flag.owner in (serve.OURS, serve.H2O)
        assert parsed.rest(h2o=True) == ["--seed", "3", *([] if taken else args), "--enforce-eager"]
        assert parsed.rest(h2o=False) == ["--seed", "3", *([] if flag.owner == serve.OURS else args), "--enforce-eager"]
    with pytest.raises(serve.ServeArgumentError, match=f"{flag.name} needs (a value|one or more values)"):
        serve.parse_args(["--seed", "3", flag.name])


def test_arguments_the_table_does_not_name_pass_through_untouched_and_in_order():
    args = ["/models/m", "--seed", "3", "--max_model_len=512", "-O3", "--chat-template", "x=y", "--enforce-eager"]
    parsed = serve.parse_args(args)
    assert (parsed.model, parsed.values, parsed.rest(h2o=True)) == ("/models/m", {}, args[1:])
    # several served names up to the next flag; a repeated flag takes its last value, as vLLM's parser does
    parsed = serve.parse_args(["--served-model-name", "a", "b", "-tp", "2", "--port", "1", "--port=2"])
    assert parsed.values == {"--served-model-name": ["a", "b"], "--tensor-parallel-size": "2", "--port": "2"}
    assert parsed.rest(h2o=True) == ["-tp", "2", "--port", "1", "--port=2"]
    with pytest.raises(serve.ServeArgumentError, match="--served-model-name needs one or more values"):
        serve.parse_args(["--served-model-name", "--port", "1"])


def test_the_h2o_engines_own_flags_reach_vllm_as_given_with_no_h2o(no_model_build):
    argv = build(["--block-size", "16", "--additional-config", "{}", "--no-h2o"])
    assert argv[-4:] == ["--block-size", "16", "--additional-config", "{}"]
    with pytest.raises(serve.ServeArgumentError, match="--h2o-budget needs a value"):
        build(["--h2o-budget"])


def test_a_one_rank_server_on_a_small_machine_computes_on_every_cpu():
    """vLLM keeps one CPU per rank for its other processes; on 2 CPUs h2o-vllm keeps none (results/load-layout)."""
    assert serve.reserved_cpus([], env={}, cpus=range(2), numa_nodes=1) == "0"
    assert serve.reserved_cpus(["--no-h2o"], env={}, cpus=range(4), numa_nodes=1) == "0"  # vanilla alike
    assert serve.reserved_cpus([], env={}, cpus=range(16), numa_nodes=1) is None  # a big machine: vLLM's default
    assert serve.reserved_cpus([], env={}, cpus=range(2), numa_nodes=2) is None
    assert serve.reserved_cpus(["-tp", "2"], env={}, cpus=range(2), numa_nodes=1) is None  # cpu_binding's case
    assert serve.reserved_cpus(["--data-parallel-size=2"], env={}, cpus=range(2), numa_nodes=1) is None
    assert serve.reserved_cpus([], env={"VLLM_CPU_OMP_THREADS_BIND": "0"}, cpus=range(2), numa_nodes=1) is None
    assert serve.reserved_cpus([], env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, cpus=range(2), numa_nodes=1) is None
