"""RULER-style synthetic tasks (Hsieh et al., 2024), generated offline from the packaged essays.

Each task hides what the question asks for in a long context and checks the answer by
string match, as RULER does; the haystack is Paul Graham's essays (RULER's own for its
essay needles), the keys and word values are words of those essays, and everything is
drawn from a seeded generator: the same arguments and tokenizer give the same cases.

    task              RULER's     what is hidden; what is asked
    niah_number       niah_single_2  one "special magic number" (7 digits) for a key
    niah_word         (a variant)    the same with a word as the value
    niah_uuid         niah_single_3  the same with a UUID as the value
    niah_multikey     niah_multikey_1  the needle among three of other keys (distractors)
    niah_multivalue   niah_multivalue  four values for one key; all four asked
    niah_multiquery   niah_multiquery  four needles of four keys; all four values asked
    vt                vt          a chain of variable assignments (VAR A = 12345, VAR B = VAR A,
                                  ...); every variable that holds the value asked
    cwe               cwe         a numbered word list in which ten words recur; the ten asked

A case scores the fraction of expected strings its answer contains (RULER's
``string_match_all``): 0 or 1 for a single needle, steps of 1/4 for four values, and so on.
Prompts are completions that end with the start of the answer, as RULER's templates do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from h2o_vllm.evaluation.scenarios import Item, length_label

TASKS = (
    "niah_number",
    "niah_word",
    "niah_uuid",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
)
NEEDLES_PER_CASE = 4  # distractors + 1, values of one key, or keys asked (RULER's defaults)
VT_HOPS = 4  # variable tracking: assignments after the first (five variables hold the value)
# RULER's cwe: 10 words x 30, the others x 3; a list too short for 300 common words (1K tokens)
# repeats each common word as often as half the list allows (at least 5 times).
CWE_COMMON, CWE_COMMON_FREQ, CWE_RARE_FREQ, CWE_MIN_FREQ = 10, 30, 3, 5

_NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
_NEEDLE = " One of the special magic {kind_one} for {key} is: {value}. "
_ASK_ONE = (
    "\nWhat is the special magic {kind_one} for {key} mentioned in the provided text? "
    "The special magic {kind_one} for {key} mentioned in the provided text is"
)
_ASK_ALL = (
    "\nWhat are all the special magic {kind} for {keys} mentioned in the provided text? "
    "The special magic {kind} for {keys} mentioned in the provided text are"
)
_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_ASK = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assigned the value {value}, they are:"
)
_CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_ASK = (
    "\nQuestion: What are the 10 most common words in the above list? "
    "Answer: The top 10 words that appear most often in the list are:"
)
_MAX_TOKENS = {"niah_uuid": 40, "niah_multivalue": 96, "niah_multiquery": 96, "vt": 48, "cwe": 120}


@dataclass(frozen=True)
class Vocabulary:
    """Words of the essays to draw keys and values from: lower-case, alphabetic, 4 to 10 letters."""

    words: tuple[str, ...]

    @classmethod
    def of(cls, corpus: str, minimum: int = 500) -> Vocabulary:
        words = sorted({w for w in re.findall(r"\b[a-z]{4,10}\b", corpus)})
        if len(words) < minimum:
            raise ValueError(f"the corpus has {len(words)} distinct words; RULER-style keys need {minimum}")
        return cls(tuple(words))

    def key(self, rng: random.Random) -> str:
        return f"{rng.choice(self.words)}-{rng.choice(self.words)}"

    def distinct(self, rng: random.Random, count: int, make) -> list[str]:
        """``count`` different values of ``make(rng)``, in the order drawn."""
        seen: dict[str, None] = {}
        while len(seen) < count:
            seen.setdefault(make(rng))
        return list(seen)


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _niah(task: str, rng: random.Random, vocab: Vocabulary) -> tuple[str, list[str], str, list[str]]:
    """(intro, needles, question, expected) of one needle-in-a-haystack case."""
    value_of = {"niah_word": lambda r: r.choice(vocab.words), "niah_uuid": _uuid}.get(task, _number)
    kind_one = {"niah_word": "word", "niah_uuid": "uuid"}.get(task, "number")
    kind = {"niah_word": "words", "niah_uuid": "uuids"}.get(task, "numbers")
    if task == "niah_multikey":
        keys = vocab.distinct(rng, NEEDLES_PER_CASE, vocab.key)
        values = vocab.distinct(rng, NEEDLES_PER_CASE, value_of)
        needles = [_NEEDLE.format(kind_one=kind_one, key=k, value=v) for k, v in zip(keys, values)]
        rng.shuffle(needles)  # the asked needle is anywhere among the distractors
        asked, expected = keys[0], [values[0]]
        return _NIAH_INTRO.format(kind=kind), needles, _ASK_ONE.format(kind_one=kind_one, key=asked), expected
    if task == "niah_multivalue":
        key = vocab.key(rng)
        values = vocab.distinct(rng, NEEDLES_PER_CASE, value_of)
        needles = [_NEEDLE.format(kind_one=kind_one, key=key, value=v) for v in values]
        return _NIAH_INTRO.format(kind=kind), needles, _ASK_ALL.format(kind=kind, keys=key), values
    if task == "niah_multiquery":
        keys = vocab.distinct(rng, NEEDLES_PER_CASE, vocab.key)
        values = vocab.distinct(rng, NEEDLES_PER_CASE, value_of)
        needles = [_NEEDLE.format(kind_one=kind_one, key=k, value=v) for k, v in zip(keys, values)]
        asked = ", ".join(keys[:-1]) + f", and {keys[-1]}"
        return _NIAH_INTRO.format(kind=kind), needles, _ASK_ALL.format(kind=kind, keys=asked), values
    key, value = vocab.key(rng), value_of(rng)
    needle = _NEEDLE.format(kind_one=kind_one, key=key, value=value)
    return _NIAH_INTRO.format(kind=kind), [needle], _ASK_ONE.format(kind_one=kind_one, key=key), [value]


def _vt(rng: random.Random) -> tuple[str, list[str], str, list[str]]:
    names = []
    while len(names) < VT_HOPS + 1:
        name = _variable(rng)
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    needles = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    return _VT_INTRO, needles, _VT_ASK.format(value=value, count=len(names)), names


def _fill(tokenizer, corpus_ids: list[int], budget: int, rng: random.Random, needles: list[str]) -> tuple[str, list]:
    """``budget`` tokens of essay text from a random place with ``needles`` at random depths, in
    order (a chain stays in order); the text and the depths used."""
    if budget < 16 or budget > len(corpus_ids):
        raise ValueError(f"a haystack of {budget} tokens does not fit between 16 and {len(corpus_ids)}")
    start = rng.randrange(0, len(corpus_ids) - budget + 1)
    cuts = sorted(rng.randrange(0, budget + 1) for _ in needles)
    pieces, last = [], start
    for cut, needle in zip(cuts, needles):
        pieces += [tokenizer.decode(corpus_ids[last : start + cut], skip_special_tokens=True), needle]
        last = start + cut
    pieces.append(tokenizer.decode(corpus_ids[last : start + budget], skip_special_tokens=True))
    return "".join(pieces), [round(c / budget, 3) for c in cuts]


def _cwe(tokenizer, length: int, rng: random.Random, vocab: Vocabulary) -> tuple[str, list[str]]:
    """A numbered word list of about ``length`` prompt tokens: ten words 30 times each (fewer in a
    short list), the rest 3."""
    common = vocab.distinct(rng, CWE_COMMON, lambda r: r.choice(vocab.words))
    fixed = len(tokenizer(_CWE_INTRO + _CWE_ASK)["input_ids"])
    per_word = len(tokenizer("\n123. example")["input_ids"])  # a list line, about
    pool = [w for w in rng.sample(vocab.words, len(vocab.words)) if w not in common]  # the rare words, in turn
    order = rng.random()

    def listing(total: int) -> str:
        freq = min(CWE_COMMON_FREQ, max(CWE_MIN_FREQ, total // (2 * CWE_COMMON)))
        rare_count = min(len(pool), max(0, (total - CWE_COMMON * freq) // CWE_RARE_FREQ))
        words = common * freq + pool[:rare_count] * CWE_RARE_FREQ
        random.Random(order).shuffle(words)
        return _CWE_INTRO + "".join(f"\n{i + 1}. {w}" for i, w in enumerate(words)) + _CWE_ASK

    smallest = CWE_COMMON * CWE_MIN_FREQ
    total = max(smallest, (length - fixed) // per_word)
    measured = len(tokenizer(listing(total))["input_ids"])
    total = max(smallest, total * (length - fixed) // max(1, measured - fixed))  # one correction
    return listing(total), common


def ruler_items(tokenizer, corpus: str, tasks, lengths, samples: int, seed: int = 0) -> list[Item]:
    """``samples`` cases per (task, context length); a case's ``meta["expected"]`` is what its
    answer must contain, ``meta["depths"]`` where the needles sit (fractions of the haystack)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    corpus_ids = tokenizer(corpus)["input_ids"]
    vocab = Vocabulary.of(corpus)
    items = []
    for task in tasks:
        for length in lengths:
            for s in range(samples):
                rng = random.Random(f"ruler/{seed}/{task}/{length}/{s}")
                depths: list = []
                if task == "cwe":
                    prompt, expected = _cwe(tokenizer, length, rng, vocab)
                else:
                    intro, needles, question, expected = _vt(rng) if task == "vt" else _niah(task, rng, vocab)
                    fixed = len(tokenizer(intro + "".join(needles) + question)["input_ids"])
                    text, depths = _fill(tokenizer, corpus_ids, length - fixed, rng, needles)
                    prompt = intro + text + question
                items.append(
                    Item(
                        "ruler",
                        f"{task}/{length}/s{s}",
                        max_tokens=_MAX_TOKENS.get(task, 24),
                        prompt=prompt,
                        group=f"{task} {length_label(length)}",
                        prompt_tokens=len(tokenizer(prompt)["input_ids"]),
                        meta={"task": task, "length": length, "expected": expected, "depths": depths},
                    )
                )
    return items


def case_score(answer: str | None, expected: list[str]) -> float:
    """The fraction of ``expected`` strings ``answer`` contains, case-insensitively (0 for no answer)."""
    if not answer:
        return 0.0
    text = answer.lower()
    return sum(e.lower() in text for e in expected) / len(expected)
