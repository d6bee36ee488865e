import os
import signal
from pathlib import Path

import pytest

# Nothing may come from a model hub, in tests least of all.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def pytest_configure(config):
    """SIGTERM ends the run as Ctrl-C does, so the fixtures' teardown still stops what they started
    (servers, engines); a second SIGTERM ends it at once. (A server a test started dies with this
    process in any case: h2o_vllm/local_server.py. tests/test_local_server.py checks both.)"""
    main = os.getpid()

    def interrupt(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        if os.getpid() != main:  # a forked child (an engine core, a worker) that kept this handler
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, prepared once (reused from the user cache when there)."""
    from h2o_vllm.assets import prepare_default_model

    return prepare_default_model().path


@pytest.fixture(scope="session")
def second_model_dir() -> Path:
    """The second model (Qwen2.5-Coder-0.5B-Instruct), assembled and converted once (about a minute)."""
    from h2o_vllm.assets import QWEN_CODER_05B, prepare_model

    return prepare_model(QWEN_CODER_05B).path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    from h2o_vllm.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0, tokenizer_dir=default_model_dir)


@pytest.fixture(scope="session")
def essay_ids(default_model_dir) -> list[int]:
    """The essays (h2o_vllm.datasets) as the default model's token ids, tokenized once."""
    from transformers import AutoTokenizer

    from h2o_vllm.datasets import essays_text

    return AutoTokenizer.from_pretrained(default_model_dir)(essays_text())["input_ids"]


@pytest.fixture
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")
