"""Greedy transcription in batches, with a cap on new tokens so a collapsed student cannot run away."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Sequence

import torch

from asr.data.features import log_mel
from asr.data.loading import Sample


@dataclass
class Hypothesis:
    """A model's output for one clip; `capped` means it hit `max_new_tokens` without end-of-text."""

    id: str
    text: str
    tokens: list[int]
    capped: bool


def generate_kwargs(model, language: str) -> dict:
    """Language/task arguments for `generate`: English-only models take none."""
    if getattr(model.generation_config, "is_multilingual", False):
        return {"language": language, "task": "transcribe"}
    return {}


@torch.inference_mode()
def transcribe(model, processor, samples: Sequence[Sample], batch_size: int = 8,
               max_new_tokens: int = 128, progress=None) -> list[Hypothesis]:
    """Transcribe samples greedily, batching clips of the same language together."""
    out: dict[str, Hypothesis] = {}
    eos = model.generation_config.eos_token_id
    ordered = sorted(samples, key=lambda s: s.language)
    for language, group in groupby(ordered, key=lambda s: s.language):
        group = list(group)
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            features = log_mel(processor.feature_extractor, [s.audio for s in batch]).to(model.dtype)
            ids = model.generate(features, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 **generate_kwargs(model, language))
            for sample, row in zip(batch, ids.tolist()):
                row = row[:row.index(eos)] if eos in row else row  # generate drops the final eot, pads with it
                tokens = [t for t in row if t < eos]  # text tokens only: specials and timestamps sort above eot
                text = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                out[sample.id] = Hypothesis(sample.id, text, tokens, capped=len(row) >= max_new_tokens)
            if progress is not None:
                progress(len(batch))
    return [out[s.id] for s in samples]
