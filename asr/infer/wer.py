"""WER/CER with Whisper's normalizers: English for English, the basic one for every other language."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import jiwer


@lru_cache(maxsize=None)
def normalizer_for(language: str) -> Callable[[str], str]:
    """OpenAI's EnglishTextNormalizer (spelling map, numbers) for en; BasicTextNormalizer otherwise."""
    if language == "en":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalize(text: str, language: str) -> str:
    """Normalized text with whitespace collapsed (the form WER is computed on)."""
    return " ".join(normalizer_for(language)(text).split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus-level WER/CER and edit counts on already-normalized text; empty references are not scored."""
    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r]
    if not pairs:
        return {"wer": None, "cer": None, "substitutions": 0, "deletions": 0, "insertions": 0,
                "reference_words": 0, "scored": 0}
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {"wer": words.wer, "cer": chars.cer, "substitutions": words.substitutions,
            "deletions": words.deletions, "insertions": words.insertions,
            "reference_words": sum(len(r.split()) for r in refs), "scored": len(pairs)}
