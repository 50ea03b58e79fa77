"""Streaming simulation: audio arrives in chunks and the whole buffer so far is re-decoded after each arrival.

This is the simplest live-captioning loop a Whisper model allows (no state carried between updates), so its
figures answer one question: can this model re-transcribe a growing buffer faster than the audio arrives?
Every update pays the full encoder, because `log_mel` pads the buffer to 30 s.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from asr.infer.engines import Engine
from asr.infer.transcribe import text_of, transcribe
from asr.infer.wer import error_rates, normalize
from asr.data.features import log_mel
from asr.data.loading import SAMPLE_RATE, Sample
from asr.errors import AsrError


def buffer_ends(num_samples: int, step: int) -> list[int]:
    """Buffer length (samples) at each update: one update per step of new audio, the last one at the clip's end."""
    return [min(k * step, num_samples) for k in range(1, math.ceil(num_samples / step) + 1)]


def _update(engine: Engine, processor, audio: np.ndarray, language: str, max_new_tokens: int) -> tuple[str, float]:
    """Hypothesis for one buffer and the ms it took (features, encoder and decoder: the work done per update)."""
    t0 = time.perf_counter()
    features = log_mel(processor.feature_extractor, audio)
    [decoded] = engine.decode(engine.encode(features), language, max_new_tokens)
    ms = 1e3 * (time.perf_counter() - t0)
    return text_of(processor.tokenizer, decoded.tokens, engine.eos_token_id), ms


def simulate_streaming(engine: Engine, processor, samples: Sequence[Sample], chunk_ms: int = 300, overlap_ms: int = 0,
                       max_new_tokens: int = 128, progress: Callable[[int], object] | None = None) -> dict:
    """Per-update latency, real-time factor, whether the model keeps up, and the WER of the final hypotheses.

    A chunk of `chunk_ms` arrives every `chunk_ms - overlap_ms` (the step); since each update re-decodes the
    whole buffer, overlap only makes updates more frequent. Updates run one after another on a simulated clock
    (an update starts when its audio has arrived and the previous update is done), which gives the time to the
    first non-empty text and the lag of the final hypothesis after the audio ends. `progress` is called once
    per update; without it a tqdm bar is shown.
    """
    if chunk_ms <= 0 or not 0 <= overlap_ms < chunk_ms:
        raise AsrError(f"streaming chunk {chunk_ms} ms with overlap {overlap_ms} ms: need chunk > 0 and "
                       "0 <= overlap < chunk; lower --overlap-ms or raise --chunk-ms")
    if not samples:
        raise AsrError("streaming simulation got no clips; check the dataset and --latency-clips")
    step_ms = chunk_ms - overlap_ms
    step = step_ms * SAMPLE_RATE // 1000
    plans = [buffer_ends(len(s.audio), step) for s in samples]
    _update(engine, processor, samples[0].audio[:plans[0][0]], samples[0].language, max_new_tokens)  # warm-up

    bar = tqdm(total=sum(map(len, plans)), desc=f"{engine.name}: streaming {chunk_ms} ms chunks", unit="update",
               leave=False, disable=progress is not None)
    latencies, first_text, final_lag, finals = [], [], [], []
    for sample, ends in zip(samples, plans):
        clock, first, text = 0.0, None, ""
        for end in ends:
            text, ms = _update(engine, processor, sample.audio[:end], sample.language, max_new_tokens)
            clock = max(clock, 1e3 * end / SAMPLE_RATE) + ms  # start when audio is in and the decoder is free
            latencies.append(ms)
            if first is None and text:
                first = clock
            (progress or bar.update)(1)
        finals.append(text)
        final_lag.append(clock - 1e3 * len(sample.audio) / SAMPLE_RATE)
        if first is not None:
            first_text.append(first)
    bar.close()

    offline = [h.text for h in transcribe(engine, processor, samples, batch_size=1, max_new_tokens=max_new_tokens)]
    lat = np.array(latencies)
    audio_ms = 1e3 * sum(len(s.audio) for s in samples) / SAMPLE_RATE
    p95 = float(np.percentile(lat, 95))
    wer = error_rates([normalize(s.text, s.language) for s in samples],
                      [normalize(t, s.language) for s, t in zip(samples, finals)])["wer"]
    return {"chunk_ms": chunk_ms, "overlap_ms": overlap_ms, "step_ms": step_ms, "clips": len(samples),
            "updates": len(latencies), "chunk_latency_ms_p50": float(np.median(lat)), "chunk_latency_ms_p95": p95,
            "chunk_latency_ms_max": float(lat.max()), "real_time_factor": float(lat.sum()) / audio_ms,
            "keeps_up": p95 <= step_ms, "wer": wer,
            "final_matches_offline": sum(f == o for f, o in zip(finals, offline)) / len(samples),
            "first_text_ms_p50": float(np.median(first_text)) if first_text else None,
            "final_lag_ms_p50": float(np.median(final_lag))}
