"""The tiny random-weight Llama: small, seeded, and a model both transformers and vLLM run."""

import hashlib
import json

from h2o_vllm.tiny_model import build_tiny_llama


def _weights_digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_small_and_shares_the_default_tokenizer(tiny_model_dir, default_model_dir):
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 16 * 2**20
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (default_model_dir / "tokenizer.json").read_bytes()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2


def test_tiny_model_is_deterministic_in_its_seed(tmp_path, tiny_model_dir, default_model_dir):
    same = build_tiny_llama(tmp_path / "same", seed=0, tokenizer_dir=default_model_dir)
    other = build_tiny_llama(tmp_path / "other", seed=1, tokenizer_dir=default_model_dir)
    assert _weights_digest(same) == _weights_digest(tiny_model_dir)
    assert _weights_digest(other) != _weights_digest(tiny_model_dir)


def test_tiny_model_generates_in_transformers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = tok("Hello there, how are", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
