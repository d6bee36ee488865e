"""A tiny random-weight Llama for tests where the weights do not matter.

Same tokenizer and architecture family as the default model, a few MB, built
from a seed in a second, so engine tests run fast and never need a hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from h2o_vllm import assets

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,  # a head size the CPU attention kernel supports
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    # Larger than the usual 0.02 so logits and attention are peaked, not near-uniform:
    # fewer greedy near-ties in exactness tests.
    initializer_range=0.2,
)
MANIFEST = "h2o-vllm-tiny.json"


def build_tiny_llama(out_dir: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Write a seeded random Llama with the default model's tokenizer to ``out_dir``.

    Reuses ``out_dir`` when it already holds the model for this seed.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    manifest = {"seed": seed, "config": TINY_CONFIG}
    marker = out_dir / MANIFEST
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return out_dir

    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else assets.prepare_default_model(log=lambda *_: None).path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(manifest))
    return out_dir
