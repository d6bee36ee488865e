"""What the in-process engine benchmarks share (engine_capacity.py, scoring_cost.py): the default
model, the essay workload and the engine kwargs of a configuration name.

Imported as ``from inprocess import ...`` (``python benchmarks/X.py`` puts ``benchmarks/`` first
on ``sys.path``); vLLM and the model are only loaded when a function is called.
"""

from __future__ import annotations

FP8 = "+fp8"  # a configuration with an fp8 KV cache: twice the blocks in the same memory


def default_model_dir() -> str:
    """The default model's folder, prepared quietly (reused from the user cache when there)."""
    from h2o_vllm.assets import prepare_default_model

    return str(prepare_default_model(log=lambda *_: None).path)


def workload_prompts(num: int, length: int) -> list[list[int]]:
    """``num`` different ``length``-token slices of the essays, tokenized with the default model's tokenizer."""
    from transformers import AutoTokenizer

    from h2o_vllm.datasets import essays_text

    ids = AutoTokenizer.from_pretrained(default_model_dir())(essays_text())["input_ids"]
    stride = (len(ids) - length) // max(1, num - 1)
    return [ids[i * stride : i * stride + length] for i in range(num)]


def engine_config(name: str):
    """Engine kwargs for ``vanilla`` (vLLM as is) or a configuration name (h2o_vllm.names: none, h2o_20%, h2o_4096),
    either ending in ``+fp8`` (``--kv-cache-dtype fp8``)."""
    from h2o_vllm.engine import ENGINE_DEFAULTS, engine_kwargs
    from h2o_vllm.names import parse_name

    base = name.removesuffix(FP8)
    cache = {"kv_cache_dtype": "fp8"} if name.endswith(FP8) else {}
    if base == "vanilla":
        return cache
    return {**engine_kwargs(parse_name(base, ENGINE_DEFAULTS).config), **cache}
