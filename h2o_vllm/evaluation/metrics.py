"""Scores of one answer: passkey exact match, ROUGE-L, and tokens matched before the first divergence."""

from __future__ import annotations

import re
from collections.abc import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def passkey_found(answer: str, passkey: str) -> bool:
    """Exact match: the first number in the answer is the pass key."""
    match = re.search(r"\d+", answer)
    return match is not None and match.group(0) == passkey


def words(text: str) -> list[str]:
    """Lower-cased ASCII alphanumeric words: the tokenisation of Google's rouge-score, without stemming."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over words; 1.0 for two empty texts."""
    c, r = words(candidate), words(reference)
    if not c and not r:
        return 1.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def matched_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading elements two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
