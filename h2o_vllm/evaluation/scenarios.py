"""The evaluation scenarios: requests built from the packaged essays, and how answers are scored.

needle   Pass-key retrieval (Mohtashami & Jaggi, 2023): a five-digit key is hidden at a
         given depth of a long essay text; the prompt ends by asking for it. Exact match.
fidelity Greedy continuations of essay excerpts, ``ignore_eos``, compared with the
         full-cache continuation: tokens matched before the first divergence, ROUGE-L.
summary  Chat request to summarise one essay; ROUGE-L against the full-cache summary.
ruler    RULER-style synthetic tasks (:mod:`h2o_vllm.evaluation.ruler`); each case scores
         the fraction of expected strings found. Not run unless asked for.

Everything is deterministic: the same arguments and tokenizer give the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SCENARIOS = ("needle", "fidelity", "summary", "ruler")
DEFAULT_SCENARIOS = SCENARIOS[:3]

NEEDLE_INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
NEEDLE_QUESTION = "\n\nWhat is the pass key? The pass key is"
SUMMARY_INSTRUCTION = "Summarize the following essay in three sentences.\n\n"


@dataclass(frozen=True)
class Item:
    """One request of a scenario, the same for every configuration."""

    scenario: str
    key: str  # unique within the scenario
    max_tokens: int
    prompt: str | None = None  # /v1/completions
    messages: list[dict] | None = None  # /v1/chat/completions
    ignore_eos: bool = False
    answer: str | None = None  # what an exact-match scenario expects
    group: str = ""  # breakdown column (needle: context length)
    prompt_tokens: int = 0  # as counted by the tokenizer the items were built with
    meta: dict = field(default_factory=dict)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def needle_items(tokenizer, corpus: str, lengths, depths, samples: int, seed: int = 0) -> list[Item]:
    """``samples`` pass keys per (context length, depth); each sample starts at another place in the corpus."""
    corpus_ids = tokenizer(corpus)["input_ids"]
    fixed = len(tokenizer(NEEDLE_INTRO + NEEDLE.format(key="00000") + NEEDLE_QUESTION)["input_ids"])
    items = []
    for length in lengths:
        haystack = length - fixed
        if haystack < 16 or haystack > len(corpus_ids):
            raise ValueError(
                f"needle context length {length} does not fit between {fixed + 16} and {len(corpus_ids)} tokens"
            )
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle depth {depth} is not a fraction between 0 and 1")
            for s in range(samples):
                rng = random.Random(f"{seed}/{length}/{depth}/{s}")
                passkey = str(rng.randint(10000, 99999))
                start = rng.randrange(0, len(corpus_ids) - haystack + 1)
                cut = start + int(round(depth * haystack))
                prompt = (
                    NEEDLE_INTRO
                    + _decode(tokenizer, corpus_ids[start:cut])
                    + NEEDLE.format(key=passkey)
                    + _decode(tokenizer, corpus_ids[cut : start + haystack])
                    + NEEDLE_QUESTION
                )
                items.append(
                    Item(
                        "needle",
                        f"{length}/d{int(depth * 100)}/s{s}",
                        max_tokens=8,
                        prompt=prompt,
                        answer=passkey,
                        group=length_label(length),
                        prompt_tokens=len(tokenizer(prompt)["input_ids"]),
                        meta={"length": length, "depth": depth},
                    )
                )
    return items


def fidelity_items(tokenizer, corpus: str, prompts: int, prompt_tokens: int, new_tokens: int) -> list[Item]:
    """``prompts`` excerpts of ``prompt_tokens`` tokens, evenly spread over the corpus."""
    corpus_ids = tokenizer(corpus)["input_ids"]
    stride = (len(corpus_ids) - prompt_tokens) // max(1, prompts)
    items = []
    for i in range(prompts):
        text = _decode(tokenizer, corpus_ids[i * stride : i * stride + prompt_tokens])
        items.append(
            Item(
                "fidelity",
                f"p{i}",
                max_tokens=new_tokens,
                prompt=text,
                ignore_eos=True,
                prompt_tokens=len(tokenizer(text)["input_ids"]),
            )
        )
    return items


def summary_items(
    tokenizer, essays: list[tuple[str, str]], count: int, essay_tokens: int, new_tokens: int
) -> list[Item]:
    """The first ``count`` essays (by name) of at least ``essay_tokens`` tokens, cut to that length."""
    items = []
    for name, text in essays:
        ids = tokenizer(text)["input_ids"]
        if len(ids) < essay_tokens:
            continue
        content = SUMMARY_INSTRUCTION + _decode(tokenizer, ids[:essay_tokens])
        items.append(
            Item(
                "summary",
                name,
                max_tokens=new_tokens,
                messages=[{"role": "user", "content": content}],
                prompt_tokens=len(tokenizer(content)["input_ids"]),
            )
        )
        if len(items) == count:
            return items
    raise ValueError(f"only {len(items)} essays have {essay_tokens} tokens or more; asked for {count}")
