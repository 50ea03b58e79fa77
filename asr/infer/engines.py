"""Inference engines behind one interface, so every engine gets identical features and identical timing.

An engine splits transcription into `encode` (once per clip) and `decode` (autoregressive, per token), which
is what lets the benchmark time the encoder and the decoder separately.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from asr.models.loading import local_device, prompt_ids


@dataclass
class Decoded:
    """Tokens a model produced for one clip, up to (not including) end-of-text."""

    tokens: list[int]
    capped: bool  # hit max_new_tokens without emitting end-of-text


class Engine(Protocol):
    name: str
    eos_token_id: int

    def encode(self, features: torch.Tensor) -> Any: ...

    def decode(self, encoded: Any, language: str, max_new_tokens: int) -> list[Decoded]: ...


def split_rows(rows: list[list[int]], eos: int, max_new_tokens: int) -> list[Decoded]:
    """Cut each generated row at end-of-text; a row that never reached it was capped."""
    out = []
    for row in rows:
        row = row[:row.index(eos)] if eos in row else row
        out.append(Decoded(tokens=row, capped=len(row) >= max_new_tokens))
    return out


class HfEngine:
    """Hugging Face `generate` (greedy) on precomputed encoder states, on this process's GPU if it has one."""

    def __init__(self, model, name: str, device: torch.device | None = None):
        self.model, self.name = model.to(device or local_device()), name
        self.eos_token_id = model.generation_config.eos_token_id

    def language_kwargs(self, language: str) -> dict:
        if getattr(self.model.generation_config, "is_multilingual", False):
            return {"language": language, "task": "transcribe"}
        return {}

    @torch.inference_mode()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.encoder(features.to(self.model.device, self.model.dtype)).last_hidden_state

    @torch.inference_mode()
    def decode(self, encoded: torch.Tensor, language: str, max_new_tokens: int, **generate_kwargs) -> list[Decoded]:
        from transformers.modeling_outputs import BaseModelOutput

        # One generate pass, as for any <=30 s clip. Without force_unique_generate_call, Whisper's long-form loop
        # re-enters when a (collapsed) student ends a segment on a timestamp token, and then fails without
        # input_features (transformers 5.23). With it, the rows start with the prompt: cut it off.
        options = {"do_sample": False, "num_beams": 1, **generate_kwargs}  # greedy unless asked (the fallback)
        ids = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded),
                                  max_new_tokens=max_new_tokens, force_unique_generate_call=True,
                                  **self.language_kwargs(language), **options)
        # the forced prompt ends in <|notimestamps|> unless timestamps are asked for
        prompt = len(prompt_ids(None, self.model.generation_config, language)) - bool(options.get("return_timestamps"))
        return split_rows(ids[:, prompt:].tolist(), self.eos_token_id, max_new_tokens)


class MemoizedEncoder:
    """Wraps an engine so encoder states are computed once per clip and reused by later models with the same
    encoder weights (every checkpoint of a frozen-encoder run): benchmarks then pay only for decoding.
    The memo must only be shared between engines whose encoders are identical (see `weights_fingerprint`)."""

    def __init__(self, engine, memo: dict[str, torch.Tensor]):
        self.engine, self.memo = engine, memo
        self.name, self.eos_token_id = engine.name, engine.eos_token_id

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in features]
        missing = [i for i, k in enumerate(keys) if k not in self.memo]
        if missing:
            for i, states in zip(missing, self.engine.encode(features[missing])):
                self.memo[keys[i]] = states
        return torch.stack([self.memo[k] for k in keys])

    def decode(self, encoded, language: str, max_new_tokens: int, **generate_kwargs) -> list[Decoded]:
        return self.engine.decode(encoded, language, max_new_tokens, **generate_kwargs)
