"""Turn samples into Whisper inputs: log-mel features, decoder inputs and labels, and padded batches.

Labels follow the teacher-forcing layout Whisper was trained with: the decoder reads
`[sot, (lang, transcribe,) notimestamps, text...]` and predicts `[..., text..., eot]`. The forced prefix
positions are masked out of the loss (-100), as is padding, so the loss covers exactly the transcript and eot.
Two variants teach what Whisper's long-form decoding needs (as distil-whisper trains them): timestamped targets
`[sot, lang, transcribe, <|t0|> text <|t1|> <|t2|> text <|t3|> ..., eot]` where the clip's sentences are timed,
and a previous-text prompt `[<|startofprev|> previous text..., sot, ...]` (timed, `<|t|> text <|t|> ...`, where the
clip was cut from a reading, as sequential decoding prompts a window with the one before), masked out. A clip
that cuts its last sentence (a 30 s window of a reading) ends on that sentence's start time alone,
`... <|t3|> <|t4|> eot`, Whisper's label for "the next window starts here".
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from asr.data.loading import SAMPLE_RATE, Sample
from asr.models.loading import prompt_ids

IGNORE_INDEX = -100  # the label of positions every loss skips (PyTorch's cross-entropy default)
TIME_STEP_S = 0.02  # Whisper's timestamp resolution
MAX_PREVIOUS_TOKENS = 223  # Whisper's prompt limit: half the decoder window, less <|startofprev|>
Prompt = str | Sequence[tuple[float, float, str]]  # earlier text, plain or timed as the window before saw it
DISTIL_PROBABILITY = 0.2  # distil-whisper's --timestamp_probability and --condition_on_prev_probability


@dataclass
class Encoded:
    """One training example: features (n_mels, 3000) and the decoder sequence."""

    id: str
    input_features: np.ndarray
    decoder_input_ids: list[int]
    labels: list[int]
    text: str
    language: str
    timestamped: bool = False
    prompted: bool = False


def log_mel(feature_extractor, audio: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """Whisper log-mel features padded to 30 s: the one feature pipeline every model and engine uses."""
    batch = audio if isinstance(audio, list) else [audio]
    return feature_extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def timestamp_token(generation_config, seconds: float) -> int:
    """The token of a time in the window: <|0.00|> follows <|notimestamps|>, then one per 20 ms up to 30 s."""
    steps = round(min(max(seconds, 0.0), 30.0) / TIME_STEP_S)
    return generation_config.no_timestamps_token_id + 1 + steps


def timed_ids(tokenizer, generation_config, segments: Sequence[tuple[float, float | None, str]]) -> list[int]:
    """`<|start|> text <|end|>` per segment; an open one (end None, cut by the clip) is its start time alone."""
    ids: list[int] = []
    for start, end, words in segments:
        if end is None:
            return ids + [timestamp_token(generation_config, start)]
        ids += [timestamp_token(generation_config, start), *tokenizer(" " + words, add_special_tokens=False).input_ids,
                timestamp_token(generation_config, end)]
    return ids


def previous_ids(tokenizer, generation_config, previous: Prompt, limit: int = MAX_PREVIOUS_TOKENS) -> list[int]:
    """`<|startofprev|>` and the last `limit` (at most MAX_PREVIOUS_TOKENS) tokens of earlier text or timed
    sentences: the prompt Whisper puts before its start token."""
    earlier = tokenizer(" " + previous.strip(), add_special_tokens=False).input_ids \
        if isinstance(previous, str) else timed_ids(tokenizer, generation_config, previous)
    return [generation_config.prev_sot_token_id, *earlier[-min(limit, MAX_PREVIOUS_TOKENS):]]


def label_layout(tokenizer, generation_config, text: str, language: str,
                 segments: Sequence[tuple[float, float | None, str]] | None = None,
                 previous: Prompt | None = None) -> tuple[list[int], list[int]]:
    """(decoder_input_ids, labels) of a transcript: the teacher-forcing layout every objective is computed on.
    `segments` (start_s, end_s, text): timestamped targets instead of `text`; `previous`: a prompt of earlier
    text, or of timed sentences as sequential decoding prompts a window with the one before (`previous_ids`),
    which the loss does not cover."""
    prefix = prompt_ids(tokenizer, generation_config, language)
    if segments is None:
        body = tokenizer(" " + text, add_special_tokens=False).input_ids
    else:
        prefix, body = prefix[:-1], timed_ids(tokenizer, generation_config, segments)  # no <|notimestamps|>
    if previous:
        prefix = previous_ids(tokenizer, generation_config, previous) + prefix
    sequence = prefix + body + [generation_config.eos_token_id]
    labels = [IGNORE_INDEX] * (len(prefix) - 1) + sequence[len(prefix):]
    return sequence[:-1], labels


@dataclass(frozen=True)
class LayoutPolicy:
    """How often a training sample gets timestamped targets or a previous-text prompt. None: distil-whisper's
    0.2 for a sample whose sentences are timed (`segments`), 0 for one without (it has no times to teach). A clip
    that cuts its last sentence is always timestamped: only the timestamped layout can say where the cut words are."""

    timestamp_probability: float | None = None
    condition_on_prev_probability: float | None = None
    seed: int = 0

    def draw(self, sample: Sample, previous: Prompt | None) -> tuple[bool, Prompt | None]:
        """(timestamped?, prompt text or None) for one sample: fixed by (seed, sample id), not by the order."""
        default = DISTIL_PROBABILITY if sample.segments else 0.0
        p_ts = default if self.timestamp_probability is None else self.timestamp_probability
        p_prev = default if self.condition_on_prev_probability is None else self.condition_on_prev_probability
        rng = np.random.default_rng([self.seed, zlib.crc32(sample.id.encode())])
        timestamped = bool(sample.segments) and (bool(rng.random() < p_ts) or sample.segments[-1][1] is None)
        prompted = previous if previous and rng.random() < p_prev else None
        return timestamped, prompted


def encode_sample(sample: Sample, processor, generation_config, max_label_tokens: int = 440,
                  timestamped: bool = False, previous: Prompt | None = None) -> Encoded | None:
    """Features and labels for one sample; None when the transcript is too long for the decoder. A prompt that
    would take the sequence past max_label_tokens keeps only its last tokens, as Whisper cuts a long prompt."""
    decoder_input_ids, labels = label_layout(processor.tokenizer, generation_config, sample.text, sample.language,
                                             sample.segments if timestamped else None)
    if len(decoder_input_ids) + 1 > max_label_tokens:
        return None
    room = max_label_tokens - len(decoder_input_ids) - 2  # less <|startofprev|> and the eot label
    prompted = bool(previous) and room > 0
    if prompted:
        prompt = previous_ids(processor.tokenizer, generation_config, previous, room)
        decoder_input_ids, labels = prompt + decoder_input_ids, [IGNORE_INDEX] * len(prompt) + labels
    features = sample.features
    if features is None:
        features = log_mel(processor.feature_extractor, sample.audio)[0].numpy()
    return Encoded(id=sample.id, input_features=features,
                   decoder_input_ids=decoder_input_ids, labels=labels, text=sample.text, language=sample.language,
                   timestamped=timestamped, prompted=prompted)


@dataclass
class WhisperCollator:
    """Stack features; right-pad decoder inputs with the pad token and labels with -100."""

    pad_token_id: int

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.decoder_input_ids) for e in batch)
        inputs = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.decoder_input_ids)
            inputs[i, :n] = torch.tensor(e.decoder_input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        features = torch.from_numpy(np.stack([e.input_features for e in batch]))
        return {"input_features": features, "decoder_input_ids": inputs,
                "decoder_attention_mask": mask, "labels": labels}
