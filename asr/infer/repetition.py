"""Repetition / hallucination detection: looping n-grams, or output far longer than the reference."""
from __future__ import annotations

from typing import Sequence

MAX_NGRAM = 8


def has_loop(words: Sequence[str], min_repeats: int = 4, max_ngram: int = MAX_NGRAM) -> bool:
    """True when some n-gram (n ≤ max_ngram) repeats back to back at least `min_repeats` times."""
    for n in range(1, max_ngram + 1):
        needed = n * min_repeats
        for start in range(0, len(words) - needed + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    return False


def is_hallucination(hypothesis: str, reference: str, capped: bool = False, length_ratio: float = 2.0,
                     slack_words: int = 5) -> bool:
    """A clip counts as looping/hallucinating if it loops, hit the token cap, or is far longer than the reference."""
    hyp, ref = hypothesis.split(), reference.split()
    return capped or has_loop(hyp) or len(hyp) > length_ratio * len(ref) + slack_words


def repetition_rate(hypotheses: Sequence[str], references: Sequence[str], capped: Sequence[bool]) -> float:
    """Share of clips flagged by `is_hallucination`."""
    flags = [is_hallucination(h, r, c) for h, r, c in zip(hypotheses, references, capped, strict=True)]
    return sum(flags) / max(len(flags), 1)
