"""Per-clip latency at batch size 1: warm-up first, fixed threads, encoder and decoder timed separately.

Decoder time is reported per generated token (end-of-text included), the figure pruning the decoder changes;
peak memory is the process's resident set sampled while the engine runs.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
import psutil

from asr.bench.engines import Engine
from asr.data.features import log_mel
from asr.data.loading import SAMPLE_RATE, Sample


class PeakRss:
    """Highest resident set size (MB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> "PeakRss":
        self._proc, self._stop, self.peak_mb = psutil.Process(), threading.Event(), 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


def time_clip(engine: Engine, processor, sample: Sample, max_new_tokens: int) -> dict:
    """Encoder ms, decoder ms, generated tokens for one clip (features are computed outside the timers)."""
    features = log_mel(processor.feature_extractor, sample.audio)
    t0 = time.perf_counter()
    encoded = engine.encode(features)
    t1 = time.perf_counter()
    [decoded] = engine.decode(encoded, sample.language, max_new_tokens)
    t2 = time.perf_counter()
    tokens = len(decoded.tokens) + (0 if decoded.capped else 1)  # end-of-text is a generated token too
    return {"id": sample.id, "encoder_ms": 1e3 * (t1 - t0), "decoder_ms": 1e3 * (t2 - t1),
            "tokens": tokens, "audio_s": len(sample.audio) / SAMPLE_RATE}


def measure_latency(engine: Engine, processor, samples: Sequence[Sample], warmup: int = 2,
                    max_new_tokens: int = 128, progress=None) -> tuple[dict, list[dict]]:
    """Latency summary (p50/p95, per-token decoder time, real-time factor, peak RSS) and per-clip rows."""
    for sample in samples[:warmup]:
        time_clip(engine, processor, sample, max_new_tokens)
    with PeakRss() as rss:
        rows = []
        for sample in samples:
            rows.append(time_clip(engine, processor, sample, max_new_tokens))
            if progress is not None:
                progress(1)
    enc = np.array([r["encoder_ms"] for r in rows])
    dec_per_token = np.array([r["decoder_ms"] / max(r["tokens"], 1) for r in rows])
    total = enc + np.array([r["decoder_ms"] for r in rows])
    audio_s = sum(r["audio_s"] for r in rows)
    summary = {"clips": len(rows), "warmup": warmup,
               "encoder_ms_p50": float(np.median(enc)), "decoder_ms_per_token_p50": float(np.median(dec_per_token)),
               "total_ms_p50": float(np.median(total)), "total_ms_p95": float(np.percentile(total, 95)),
               "rtfx": audio_s / (total.sum() / 1e3), "peak_rss_mb": rss.peak_mb,
               "tokens_per_clip_mean": float(np.mean([r["tokens"] for r in rows]))}
    return summary, rows
