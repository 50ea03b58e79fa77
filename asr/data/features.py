"""Turn samples into Whisper inputs: log-mel features, decoder inputs and labels, and padded batches.

Labels follow the teacher-forcing layout Whisper was trained with: the decoder reads
`[sot, (lang, transcribe,) notimestamps, text...]` and predicts `[..., text..., eot]`. The forced prefix
positions are masked out of the loss (-100), as is padding, so the loss covers exactly the transcript and eot.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asr.data.loading import SAMPLE_RATE, Sample
from asr.models.loading import prompt_ids

IGNORE_INDEX = -100  # the label of positions every loss skips (PyTorch's cross-entropy default)


@dataclass
class Encoded:
    """One training example: features (n_mels, 3000) and the decoder sequence."""

    id: str
    input_features: np.ndarray
    decoder_input_ids: list[int]
    labels: list[int]
    text: str
    language: str


def log_mel(feature_extractor, audio: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """Whisper log-mel features padded to 30 s: the one feature pipeline every model and engine uses."""
    batch = audio if isinstance(audio, list) else [audio]
    return feature_extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def label_layout(tokenizer, generation_config, text: str, language: str) -> tuple[list[int], list[int]]:
    """(decoder_input_ids, labels) of a transcript: the teacher-forcing layout every objective is computed on."""
    prefix = prompt_ids(tokenizer, generation_config, language)
    text_ids = tokenizer(" " + text, add_special_tokens=False).input_ids
    sequence = prefix + text_ids + [generation_config.eos_token_id]
    labels = [IGNORE_INDEX] * (len(prefix) - 1) + sequence[len(prefix):]
    return sequence[:-1], labels


def encode_sample(sample: Sample, processor, generation_config, max_label_tokens: int = 440) -> Encoded | None:
    """Features and labels for one sample; None when the transcript is too long for the decoder."""
    decoder_input_ids, labels = label_layout(processor.tokenizer, generation_config, sample.text, sample.language)
    if len(decoder_input_ids) + 1 > max_label_tokens:
        return None
    return Encoded(id=sample.id, input_features=log_mel(processor.feature_extractor, sample.audio)[0].numpy(),
                   decoder_input_ids=decoder_input_ids, labels=labels, text=sample.text, language=sample.language)


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
