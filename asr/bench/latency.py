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
import torch

from asr.infer.engines import Engine, HfEngine
from asr.data.features import log_mel
from asr.data.loading import SAMPLE_RATE, Sample
from asr.models.loading import synchronize


class PeakRss:
    """Highest resident set size (MB) of this process, sampled every 5 ms and charged to the current engine."""

    def __init__(self, slots: int):
        self.peak_mb, self.current = [0.0] * slots, 0

    def __enter__(self) -> "PeakRss":
        self._proc, self._stop = psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss / 2**20
            self.peak_mb[self.current] = max(self.peak_mb[self.current], rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class TokenClock:
    """A `generate` streamer that only notes when each decoding step finishes (batch 1)."""

    def __init__(self, device: torch.device):
        self.stamps: list[float] = []
        self.device = device

    def put(self, value) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_clip(engine: Engine, processor, sample: Sample, max_new_tokens: int) -> dict:
    """Encoder ms, decoder ms, generated tokens for one clip (features are computed outside the timers).

    Where the engine can report each step (HF), the decoder time is split into the first step (prompt and the
    cross-attention keys/values of every layer, computed once per clip) and the steady per-token cost of the
    later steps, which is what the weights-read ratio predicts."""
    features = log_mel(processor.feature_extractor, sample.audio)
    device = engine.model.device if isinstance(engine, HfEngine) else torch.device("cpu")  # ct2 returns synced
    t0 = time.perf_counter()
    encoded = engine.encode(features)
    synchronize(device)
    t1 = time.perf_counter()
    clock = TokenClock(device) if isinstance(engine, HfEngine) else None
    kwargs = {"streamer": clock} if clock is not None else {}
    [decoded] = engine.decode(encoded, sample.language, max_new_tokens, **kwargs)
    t2 = time.perf_counter()
    tokens = len(decoded.tokens) + (0 if decoded.capped else 1)  # end-of-text is a generated token too
    row = {"id": sample.id, "encoder_ms": 1e3 * (t1 - t0), "decoder_ms": 1e3 * (t2 - t1),
           "tokens": tokens, "audio_s": len(sample.audio) / SAMPLE_RATE}
    steps = clock.stamps[1:] if clock is not None else []  # the first put() is the prompt
    if len(steps) >= 3:
        row["decoder_first_ms"] = 1e3 * (steps[0] - t1)
        row["decoder_steady_ms_per_token"] = 1e3 * (steps[-1] - steps[0]) / (len(steps) - 1)
    return row


def _summary(rows: list[dict], warmup: int, peak_mb: float) -> dict:
    enc = np.array([r["encoder_ms"] for r in rows])
    dec_per_token = np.array([r.get("decoder_steady_ms_per_token", r["decoder_ms"] / max(r["tokens"], 1))
                              for r in rows])
    first = [r["decoder_first_ms"] for r in rows if "decoder_first_ms" in r]
    total = enc + np.array([r["decoder_ms"] for r in rows])
    audio_s = sum(r["audio_s"] for r in rows)
    return {"clips": len(rows), "warmup": warmup,
            "encoder_ms_p50": float(np.median(enc)), "decoder_ms_per_token_p50": float(np.median(dec_per_token)),
            "total_ms_p50": float(np.median(total)), "total_ms_p95": float(np.percentile(total, 95)),
            "rtfx": audio_s / (total.sum() / 1e3), "peak_rss_mb": peak_mb,
            "tokens_per_clip_mean": float(np.mean([r["tokens"] for r in rows])),
            "decoder_first_step_ms_p50": float(np.median(first)) if first else None,
            "decoder_ms_per_clip_p50": float(np.median([r["decoder_ms"] for r in rows]))}


def measure_latency(engines: Sequence[Engine], processors: Sequence, samples: Sequence[Sample], warmup: int = 2,
                    max_new_tokens: int = 128, progress=None) -> list[tuple[dict, list[dict]]]:
    """Latency summary (p50/p95, per-token decoder time, real-time factor, peak RSS) and per-clip rows for each
    engine. Engines are timed interleaved, clip by clip, so load from elsewhere on the machine hits all of them
    alike and their ratios stay meaningful."""
    for sample in samples[:warmup]:
        for engine, processor in zip(engines, processors):
            time_clip(engine, processor, sample, max_new_tokens)
    rows: list[list[dict]] = [[] for _ in engines]
    with PeakRss(len(engines)) as rss:
        for sample in samples:
            for i, (engine, processor) in enumerate(zip(engines, processors)):
                rss.current = i
                rows[i].append(time_clip(engine, processor, sample, max_new_tokens))
            if progress is not None:
                progress(1)
    return [(_summary(r, warmup, rss.peak_mb[i]), r) for i, r in enumerate(rows)]
