"""Batched greedy transcription through any engine, with a token cap so a collapsed student cannot run away."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterator, Sequence

from asr.infer.engines import Engine
from asr.data.features import TIME_STEP_S, log_mel
from asr.data.loading import Sample


@dataclass
class Hypothesis:
    """A model's output for one clip; `capped` means it hit `max_new_tokens` without end-of-text."""

    id: str
    text: str
    tokens: list[int]
    capped: bool


def text_of(tokenizer, tokens: list[int], eos: int) -> str:
    """Decoded text of the text tokens (specials and timestamps sort above end-of-text and are dropped)."""
    return tokenizer.decode([t for t in tokens if t < eos], skip_special_tokens=True).strip()


def segments_of(tokenizer, tokens: Sequence[int], eos: int, begin: int) -> tuple[list[tuple[float, float, str]], bool]:
    """The (start_s, end_s, text) segments a window's tokens close (text between two timestamp tokens; `begin` is
    <|0.00|>), in window time, and whether text follows the last timestamp (a segment left open at the window's
    end)."""
    stamps = [i for i, t in enumerate(tokens) if t >= begin]
    segments = [((tokens[a] - begin) * TIME_STEP_S, (tokens[b] - begin) * TIME_STEP_S,
                 text_of(tokenizer, tokens[a + 1:b], eos)) for a, b in zip(stamps, stamps[1:]) if b > a + 1]
    tail = tokens[stamps[-1] + 1:] if stamps else tokens
    return segments, any(t < eos for t in tail)


def language_batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[tuple[int, Sample]]]:
    """(index, sample) batches of at most batch_size clips of one language each: a batch shares its prompt. Longest
    clips first: a batch decodes until its longest transcript ends, so clips of like length batch together."""
    indexed = sorted(enumerate(samples), key=lambda item: (item[1].language, -len(item[1].audio)))
    for _, group in groupby(indexed, key=lambda item: item[1].language):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def transcribe(engine: Engine, processor, samples: Sequence[Sample], batch_size: int = 8,
               max_new_tokens: int = 128, progress: Callable[[int], object] | None = None) -> list[Hypothesis]:
    """Transcribe samples, batching clips of the same language together; results in input order."""
    out: dict[int, Hypothesis] = {}
    for batch in language_batches(samples, batch_size):
        features = log_mel(processor.feature_extractor, [s.audio for _, s in batch])
        decoded = engine.decode(engine.encode(features), batch[0][1].language, max_new_tokens)
        for (i, sample), d in zip(batch, decoded):
            out[i] = Hypothesis(sample.id, text_of(processor.tokenizer, d.tokens, engine.eos_token_id),
                                d.tokens, d.capped)
        if progress is not None:
            progress(len(batch))
    return [out[i] for i in range(len(samples))]
