"""CTranslate2 engine: the same greedy decode as `HfEngine`, on `ctranslate2.models.Whisper`.

It takes the same log-mel features as every other engine (never faster-whisper's own pipeline, which pads
differently and changes transcripts) and must return the same tokens as HF greedy decoding, so the two
engines differ only in speed. Checked token for token against `HfEngine` in tests/test_export.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from asr.data.features import log_mel, timestamp_token
from asr.data.loading import SAMPLE_RATE
from asr.infer.engines import Decoded, split_rows
from asr.infer.transcribe import segments_of, text_of
from asr.errors import AsrError
from asr.models.loading import prompt_ids


def ct2_max_length(max_new_tokens: int, prompt_length: int) -> int:
    """The `max_length` that makes ctranslate2 4.x Whisper generate exactly `max_new_tokens` steps at most.

    ctranslate2 (src/models/whisper.cc) runs the prompt minus its last token as a prefix and then decodes
    min(max_length // 2, max_length - (prompt_length - 1)) steps, end-of-text included, like HF's
    max_new_tokens.
    """
    start_step = prompt_length - 1
    return max(2 * max_new_tokens, max_new_tokens + start_step)


class Ct2Engine:
    """Greedy decoding on a CTranslate2 export (CPU, or CUDA when ctranslate2 sees a GPU)."""

    def __init__(self, model_dir: Path, name: str):
        import ctranslate2
        from transformers import GenerationConfig

        model_dir = Path(model_dir)
        if not (model_dir / "generation_config.json").is_file():
            raise AsrError(f"{model_dir}: no generation_config.json next to model.bin; export the model with "
                           "`asr export --model M --format ct2 --out DIR`")
        self.name, self.model_dir = name, model_dir
        self.device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.model = ctranslate2.models.Whisper(str(model_dir), device=self.device,
                                                intra_threads=torch.get_num_threads())
        self.generation_config = GenerationConfig.from_pretrained(model_dir)
        self.eos_token_id = self.generation_config.eos_token_id
        self.max_positions = self.generation_config.max_length  # 448: the decoder's learned positions

    @classmethod
    def for_model(cls, ref: str, name: str) -> "Ct2Engine":
        """Load a CTranslate2 directory as is, or export any other model reference once (cached) and load that."""
        if (Path(ref) / "model.bin").is_file():
            return cls(Path(ref), name)
        from asr.models.export import export_cached

        return cls(export_cached(ref), name)

    def encode(self, features: torch.Tensor):
        """Encoder states as a ctranslate2 StorageView (copied to the CPU, so the encoder has finished)."""
        import ctranslate2

        array = np.ascontiguousarray(features.numpy(), dtype=np.float32)
        return self.model.encode(ctranslate2.StorageView.from_array(array), to_cpu=True)

    def decode(self, encoded, language: str, max_new_tokens: int) -> list[Decoded]:
        """Greedy tokens per clip; suppression as HF: config suppress_ids always, suppress_ids_begin at step 0."""
        prompt = prompt_ids(None, self.generation_config, language)  # prompt_ids reads only the config
        if len(prompt) + max_new_tokens > self.max_positions:
            raise AsrError(f"max_new_tokens={max_new_tokens} plus the {len(prompt)}-token prompt exceeds the "
                           f"decoder's {self.max_positions} positions; lower max_new_tokens")
        results = self.model.generate(encoded, [prompt] * encoded.shape[0], beam_size=1,
                                      max_length=ct2_max_length(max_new_tokens, len(prompt)),
                                      suppress_blank=True, suppress_tokens=[-1])
        return split_rows([r.sequences_ids[0] for r in results], self.eos_token_id, max_new_tokens)

    def transcribe_long(self, processor, audio: np.ndarray, language: str, max_new_tokens: int = 216
                        ) -> list[tuple[float, float, str]]:
        """(start_s, end_s, text) segments of audio of any length. ctranslate2 has no long-form loop of its own, so
        this is Whisper's sequential algorithm at its minimum: decode a 30 s window with timestamps, keep the
        segments it closes, resume at the last closed one (after the window when its last segment is complete);
        greedy, without the previous window's text or the temperature fallback."""
        prompt = prompt_ids(None, self.generation_config, language)[:-1]  # no <|notimestamps|>: timestamp rules on
        begin, window = timestamp_token(self.generation_config, 0.0), processor.feature_extractor.n_samples
        segments: list[tuple[float, float, str]] = []
        seek = 0
        while seek < len(audio):
            features = log_mel(processor.feature_extractor, [audio[seek:seek + window]])
            [result] = self.model.generate(self.encode(features), [prompt], beam_size=1, suppress_blank=True,
                                           max_length=ct2_max_length(max_new_tokens, len(prompt)), suppress_tokens=[-1])
            [decoded] = split_rows(result.sequences_ids, self.eos_token_id, max_new_tokens)
            tokens, offset = decoded.tokens, seek / SAMPLE_RATE
            closed_here, _ = segments_of(processor.tokenizer, tokens, self.eos_token_id, begin)
            segments += [(offset + start, offset + end, text) for start, end, text in closed_here]
            closed = closed_here[-1][1] if closed_here else 0.0
            if closed == 0.0 and any(t < begin for t in tokens):  # no timestamp pair: the window's text as one
                end = offset + min(window, len(audio) - seek) / SAMPLE_RATE
                segments.append((offset, end, text_of(processor.tokenizer, tokens, self.eos_token_id)))
            complete = len(tokens) > 1 and tokens[-1] >= begin > tokens[-2]  # ends on one timestamp: nothing cut
            seek += window if complete or closed == 0.0 else round(closed * SAMPLE_RATE)
        return segments
