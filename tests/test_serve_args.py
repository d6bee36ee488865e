"""h2o-vllm serve fills in defaults and passes every vllm serve argument through."""

import pytest

from h2o_vllm import serve


@pytest.fixture
def no_model_build(monkeypatch, tmp_path):
    from h2o_vllm import assets

    prepared = assets.PreparedModel(tmp_path / "default-model", reused=True)
    monkeypatch.setattr(assets, "prepare_default_model", lambda **_: prepared)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    return prepared.path


def test_defaults_serve_the_default_model_on_loopback(no_model_build):
    argv = serve.build_serve_argv([], cpu=True, log=lambda *_: None)
    assert argv[:2] == ["serve", str(no_model_build)]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags == {
        "--served-model-name": "smollm2-135m",
        "--host": "127.0.0.1",
        "--port": "8000",
        "--kv-cache-memory-bytes": serve.DEFAULT_CPU_KV_CACHE,
    }


def test_user_arguments_win_and_pass_through(no_model_build):
    user = ["--port=9001", "--host", "0.0.0.0", "--served-model-name", "mine", "--max_model_len", "2048",
            "--gpu-memory-utilization", "0.3", "--enforce-eager"]
    argv = serve.build_serve_argv(user, cpu=True, log=lambda *_: None)
    assert argv == ["serve", str(no_model_build), *user]


def test_named_model_is_served_as_given(no_model_build):
    argv = serve.build_serve_argv(["/models/other", "--dtype", "float32"], cpu=False, log=lambda *_: None)
    assert argv == ["serve", "/models/other", "--host", "127.0.0.1", "--port", "8000", "--dtype", "float32"]
    argv = serve.build_serve_argv(["--model=/models/x"], cpu=False, log=lambda *_: None)
    assert argv[:2] == ["serve", "/models/x"] and "--model=/models/x" not in argv
    argv = serve.build_serve_argv(["--seed", "3", "--model", "/models/y"], cpu=False, log=lambda *_: None)
    assert argv[:2] == ["serve", "/models/y"] and argv[-2:] == ["--seed", "3"]


def test_legacy_cpu_kv_env_is_respected(no_model_build, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    argv = serve.build_serve_argv([], cpu=True, log=lambda *_: None)
    assert "--kv-cache-memory-bytes" not in argv


def test_unknown_command_fails_with_usage(capsys):
    from h2o_vllm import cli

    assert cli.main(["srve"]) == 2
    assert "unknown command 'srve'" in capsys.readouterr().err
