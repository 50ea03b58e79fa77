"""Speculative decoding check: a pruned student drafts tokens, the teacher verifies them (HF assisted generation).

Greedy assisted generation must reproduce the teacher's greedy tokens exactly, only faster when the student's
drafts are accepted often enough. When the assistant's encoder equals the teacher's (a student pruned from the
decoder only), its decoder runs on the teacher's encoder states as a WhisperForCausalLM, the distil-whisper
set-up; otherwise HF runs the assistant's own encoder once per clip.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asr.infer.engines import HfEngine
from asr.data.features import log_mel
from asr.data.loading import Sample
from asr.errors import AsrError
from asr.models.loading import same_encoder


def decoder_only_assistant(assistant):
    """The assistant's decoder and output projection (shared, not copied) as a WhisperForCausalLM."""
    from transformers import WhisperForCausalLM

    with torch.device("meta"):  # the modules below replace every parameter, so allocate none
        draft = WhisperForCausalLM(copy.deepcopy(assistant.config))
    draft.model.decoder, draft.proj_out = assistant.model.decoder, assistant.proj_out
    draft.generation_config = copy.deepcopy(assistant.generation_config)
    return draft.eval()


class CallCounter:
    """Forward calls of a module while the block runs (a teacher call is one greedy step or one verification)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, 0

    def __enter__(self) -> "CallCounter":
        self._handle = self.module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _timed_generate(teacher, features: torch.Tensor, kwargs: dict) -> tuple[list[int], float, int]:
    """Tokens, ms and teacher forward calls of one `generate` from features (encoder included)."""
    with CallCounter(teacher) as counter, torch.inference_mode():
        t0 = time.perf_counter()
        ids = teacher.generate(input_features=features, **kwargs)
        ms = 1e3 * (time.perf_counter() - t0)
    return ids[0].tolist(), ms, counter.calls


def speculative_check(teacher, assistant, processor, samples: Sequence[Sample], max_new_tokens: int = 128,
                      assistant_name: str | None = None) -> dict:
    """Per clip at batch 1: teacher greedy vs teacher + assistant; token identity, p50 times and speedup."""
    if assistant.config.vocab_size != teacher.config.vocab_size:
        raise AsrError(f"assistant vocabulary ({assistant.config.vocab_size} tokens) differs from the teacher's "
                       f"({teacher.config.vocab_size}); use a student pruned from this teacher as the assistant")
    if not samples:
        raise AsrError("speculative check got no clips; check the dataset and --latency-clips")
    engine = HfEngine(teacher, "teacher")  # on this process's GPU if it has one; the assistant joins it
    assistant = assistant.to(teacher.device)
    shared = assistant is teacher or same_encoder(teacher, assistant)
    draft = decoder_only_assistant(assistant) if shared else assistant
    saved_config = copy.deepcopy(draft.generation_config)  # HF writes its draft-length state into it
    rows = []
    try:
        for i, sample in enumerate([samples[0], *samples]):  # the first pass is the warm-up
            features = log_mel(processor.feature_extractor, sample.audio).to(teacher.device, teacher.dtype)
            # force_unique_generate_call: both calls return [prompt, tokens, eot] (HF sets it for assisted runs)
            kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                          force_unique_generate_call=True, **engine.language_kwargs(sample.language))
            greedy = _timed_generate(teacher, features, kwargs)
            speculative = _timed_generate(teacher, features, {**kwargs, "assistant_model": draft})
            if i > 0:
                rows.append((sample.id, greedy, speculative))
    finally:
        draft.generation_config = saved_config
    greedy_ms = float(np.median([g[1] for _, g, _ in rows]))
    speculative_ms = float(np.median([s[1] for _, _, s in rows]))
    mismatched = [clip for clip, g, s in rows if g[0] != s[0]]
    return {"assistant": assistant_name or Path(assistant.name_or_path).name or "assistant",
            "assistant_decoder_layers": assistant.config.decoder_layers,
            "assistant_encoder": "shared" if shared else "own", "n": len(rows),
            "identical": len(rows) - len(mismatched), "mismatched": mismatched,
            "greedy_ms_p50": greedy_ms, "speculative_ms_p50": speculative_ms, "speedup": greedy_ms / speculative_ms,
            # greedy makes one teacher call per token, so this is tokens per verification (1.0 = no draft accepted)
            "tokens_per_teacher_call": sum(g[2] for _, g, _ in rows) / max(sum(s[2] for _, _, s in rows), 1)}
