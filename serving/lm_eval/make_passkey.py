"""Write h2o_passkey.jsonl, the data of the tiny lm-evaluation-harness task next to it.

    python serving/lm_eval/make_passkey.py

The documents are h2o-vllm's own needle scenario (``h2o-vllm eval``) at 400 tokens,
depths 10..90%, two pass keys each, so both tools ask the same questions.
"""

import json
from pathlib import Path

from h2o_vllm.evaluation.scenarios import NEEDLE_QUESTION, needle_items

OUT = Path(__file__).with_name("h2o_passkey.jsonl")


def documents(tokenizer) -> list[dict]:
    from h2o_vllm.datasets import essays_text

    items = needle_items(tokenizer, essays_text(), [400], [0.1, 0.3, 0.5, 0.7, 0.9], samples=2)
    assert all(i.prompt.endswith(NEEDLE_QUESTION) for i in items)
    return [{"id": i.key, "prompt": i.prompt, "passkey": i.answer} for i in items]


if __name__ == "__main__":
    from transformers import AutoTokenizer

    from h2o_vllm.assets import prepare_default_model

    docs = documents(AutoTokenizer.from_pretrained(prepare_default_model(log=lambda *_: None).path))
    OUT.write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"{OUT}: {len(docs)} documents")
