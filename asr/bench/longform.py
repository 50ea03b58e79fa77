"""Long-form benchmark: files longer than Whisper's 30 s window, decoded by Whisper's sequential algorithm (HF
`generate` on the whole log-mel input, each window conditioned on the previous one's text and advancing on its
last timestamp) or by chunked decoding (the HF pipeline: overlapping 30 s chunks, batched, merged on the stride).

Reported per (model, set, algorithm): WER, RTFx, the repetition rate and whether the predicted segments are sane.
The `short-form` algorithm is the reference on the same speech: each file cut at the middle of the pauses between
its timed sentences into pieces of at most 30 s, each transcribed alone as a short clip (greedy, no timestamps),
so a long-form WER can be read against the model's own short-form WER on identical audio.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from asr.bench.outputs import longform_table
from asr.bench.run import BenchOptions, clip_rows, load_engine, load_eval_samples, model_labels, score, write_clips
from asr.config import LONG_FORM_ALGORITHMS
from asr.data.loading import SAMPLE_RATE, Sample
from asr.errors import AsrError
from asr.infer.engines import HfEngine
from asr.infer.transcribe import Hypothesis, language_batches, transcribe

ALGORITHMS = LONG_FORM_ALGORITHMS
# sequential-fallback: Whisper's sequential algorithm with its temperature fallback, as OpenAI's `transcribe` runs by
# default: a window whose tokens compress too well (a loop) or score too low is decoded again by sampling at rising
# temperatures. 1.35 is HF's threshold for its ratio, taken over token bytes (OpenAI's 2.4 is over the text).
# sequential-independent: each window decoded without the previous window's text (HF generate's default,
# condition_on_prev_tokens=False): a student that loops on its own earlier text reads on without it.
FALLBACK = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "compression_ratio_threshold": 1.35,
            "logprob_threshold": -1.0}
CHUNK_S, STRIDE_S = 30.0, 5.0  # the pipeline's chunk and its overlap on each side (HF's default: a sixth)
EDGE_TOLERANCE_S = 0.1  # timestamps are quantized to 20 ms; a file's end is known to the sample
GAP_TOLERANCE_S = 1.0  # a predicted gap may exceed the longest pause read by this much before speech was skipped


@dataclass
class LongHypothesis:
    """A model's transcript of one long file and its predicted segments (end None: the model left it open)."""

    text: str
    segments: list[tuple[float, float | None]]


def window_tokens(model) -> int:
    """Tokens per 30 s window: HF keeps up to half the decoder's positions for the previous window's text, so
    the new tokens (and the start tokens) must fit in the other half; a looping student stops there."""
    return model.config.max_target_positions // 2 - 8


def transcribe_sequential(engine: HfEngine, processor, samples: Sequence[Sample], language: str,
                          fallback: bool = False, condition: bool = True) -> list[LongHypothesis]:
    """Whisper's sequential long-form algorithm on a batch of files of one language, un-truncated; `fallback`:
    with its temperature fallback (sampling seeded, so a benchmark repeats); `condition`: each window prompted
    with the text decoded before it."""
    extractor = processor.feature_extractor
    longest = max(len(s.audio) for s in samples)
    features = extractor([s.audio for s in samples], sampling_rate=SAMPLE_RATE, truncation=False,
                         padding="longest" if longest > extractor.n_samples else "max_length",
                         return_attention_mask=True, return_tensors="pt")
    if fallback:
        torch.manual_seed(0)
    with torch.inference_mode():
        out = engine.model.generate(features.input_features.to(engine.model.device),
                                    attention_mask=features.attention_mask.to(engine.model.device),
                                    return_timestamps=True, condition_on_prev_tokens=condition, return_segments=True,
                                    max_new_tokens=window_tokens(engine.model), **engine.language_kwargs(language),
                                    **(FALLBACK if fallback else {}))
    texts = processor.batch_decode(out["sequences"], skip_special_tokens=True)
    return [LongHypothesis(text.strip(), [(round(float(s["start"]), 2), round(float(s["end"]), 2)) for s in segments])
            for text, segments in zip(texts, out["segments"])]


def chunked_pipeline(engine: HfEngine, processor, batch_size: int):
    """The HF ASR pipeline over the engine's model: 30 s chunks overlapping by the stride, `batch_size` at once."""
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=engine.model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, chunk_length_s=CHUNK_S,
                    stride_length_s=STRIDE_S, batch_size=batch_size, device=engine.model.device)


def transcribe_chunked(engine: HfEngine, pipe, sample: Sample) -> LongHypothesis:
    """Chunked decoding of one file with timestamps, through the pipeline."""
    kwargs = {"max_new_tokens": window_tokens(engine.model), **engine.language_kwargs(sample.language)}
    out = pipe({"raw": sample.audio, "sampling_rate": SAMPLE_RATE}, return_timestamps=True, generate_kwargs=kwargs)
    return LongHypothesis(out["text"].strip(), [tuple(c["timestamp"]) for c in out.get("chunks", [])])


def cut_at_pauses(sample: Sample) -> list[Sample]:
    """A long file as consecutive pieces of at most 30 s, cut at the middle of the pauses between its timed
    sentences (a sentence longer than the window is a piece of its own, truncated by the features)."""
    if not sample.segments:
        raise AsrError(f"{sample.id}: short-form needs the file's timed sentences (the `segments` column that "
                       "`asr data synth --long` writes); use sequential or chunked for this set")
    cuts = [0] + [round((a[1] + b[0]) / 2 * SAMPLE_RATE) for a, b in zip(sample.segments, sample.segments[1:])] \
        + [len(sample.audio)]
    pieces, start = [], 0
    for i in range(1, len(cuts)):
        last = i == len(cuts) - 1
        if last or cuts[i + 1] - cuts[start] > CHUNK_S * SAMPLE_RATE:
            texts = " ".join(text for _, _, text in sample.segments[start:i])
            pieces.append(Sample(f"{sample.id}#{len(pieces)}", sample.audio[cuts[start]:cuts[i]], texts,
                                 sample.language))
            start = i
    return pieces


def transcribe_short_form(engine: HfEngine, processor, sample: Sample, batch_size: int) -> LongHypothesis:
    """One file's pieces (`cut_at_pauses`) transcribed as short clips; their texts joined, no timestamps."""
    pieces = cut_at_pauses(sample)
    hyps = transcribe(engine, processor, pieces, batch_size, window_tokens(engine.model))
    return LongHypothesis(" ".join(h.text for h in hyps if h.text), [])


def transcribe_long(engine: HfEngine, processor, samples: Sequence[Sample], algorithm: str, batch_size: int,
                    progress=None) -> list[LongHypothesis]:
    """Transcribe long files with one algorithm; results in input order."""
    if algorithm not in ALGORITHMS:
        raise AsrError(f"unknown long-form algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "short-form":
        hyps = []
        for sample in samples:
            hyps.append(transcribe_short_form(engine, processor, sample, batch_size))
            if progress is not None:
                progress(1)
        return hyps
    out: dict[int, LongHypothesis] = {}
    if algorithm == "chunked":
        pipe = chunked_pipeline(engine, processor, batch_size)
        batches = [[(i, sample)] for i, sample in enumerate(samples)]  # the pipeline batches a file's chunks
    else:
        batches = list(language_batches(samples, batch_size))
    for batch in batches:
        if algorithm == "chunked":
            hyps = [transcribe_chunked(engine, pipe, batch[0][1])]
        else:
            hyps = transcribe_sequential(engine, processor, [s for _, s in batch], batch[0][1].language,
                                         fallback=algorithm == "sequential-fallback",
                                         condition=algorithm != "sequential-independent")
        out.update((i, hyp) for (i, _), hyp in zip(batch, hyps))
        if progress is not None:
            progress(len(batch))
    return [out[i] for i in range(len(samples))]


def timestamp_checks(predicted: Sequence[tuple[float, float | None]], duration: float,
                     reference: Sequence[tuple[float, float, str]] | None) -> dict:
    """Whether predicted segments are monotonic (each ends after it starts and before the next starts), inside
    the audio, and leave no gap longer than the longest pause between the reference's sentences (plus a
    tolerance): a longer gap means speech was skipped. Without timed references the gap check is None."""
    edges = [x for segment in predicted for x in segment]
    closed = None not in edges
    monotonic = closed and all(b - a >= -EDGE_TOLERANCE_S for a, b in zip(edges, edges[1:]))
    inside = closed and all(-EDGE_TOLERANCE_S <= x <= duration + EDGE_TOLERANCE_S for x in edges)
    gaps = [b[0] - a[1] for a, b in zip(predicted, predicted[1:]) if a[1] is not None]
    silence = max((b[0] - a[1] for a, b in zip(reference, reference[1:])), default=0.0) if reference else None
    gaps_ok = None if silence is None else max(gaps, default=0.0) <= silence + GAP_TOLERANCE_S
    return {"monotonic": monotonic, "inside": inside, "gaps_ok": gaps_ok, "max_gap_s": max(gaps, default=0.0),
            "reference_max_silence_s": silence, "sane": monotonic and inside and gaps_ok is not False}


def long_form_rows(engine: HfEngine, processor, label: str, samples: Sequence[Sample], algorithm: str,
                   batch_size: int, show_progress: bool = True) -> tuple[list[dict], float]:
    """Per-file rows (transcript, predicted segments and their checks) of one algorithm, and the seconds it took:
    the part of the long-form bench that each rank of a sharded evaluation runs on its stride of the files."""
    start = time.perf_counter()
    with tqdm(total=len(samples), desc=f"{engine.name} on {label}: long-form {algorithm}", unit="file",
              disable=not show_progress) as bar:
        hyps = transcribe_long(engine, processor, samples, algorithm, batch_size, progress=bar.update)
    seconds = time.perf_counter() - start
    clips = clip_rows(samples, [Hypothesis(s.id, h.text, [], False) for s, h in zip(samples, hyps)])
    for clip, sample, hyp in zip(clips, samples, hyps):
        duration = len(sample.audio) / SAMPLE_RATE
        checks = timestamp_checks(hyp.segments, duration, sample.segments) if algorithm != "short-form" else \
            dict.fromkeys(("monotonic", "inside", "gaps_ok", "max_gap_s", "reference_max_silence_s", "sane"))
        clip.update(duration=duration, segments=hyp.segments, **checks)  # short-form predicts no timestamps
    return clips, seconds


def long_form_record(name: str, label: str, clips: list[dict], seconds: float, algorithm: str, model,
                     batch_size: int, out_dir: Path) -> dict:
    """One (model, set, algorithm) record from every file's rows (gathered in file order); `seconds` of decoding
    summed over the ranks, so RTFx is one device's. Per-file rows go to clips-<model>-<set>-<algorithm>.jsonl."""
    record = score(name, label, clips)
    for clip in clips:
        del clip["tokens"], clip["capped"]  # the pipeline returns no tokens; a window's cap is not reported
    audio_seconds = sum(c["duration"] for c in clips)
    del record["capped_rate"]
    record.update(algorithm=algorithm, audio_seconds=audio_seconds, seconds=seconds, rtfx=audio_seconds / seconds,
                  window_tokens=window_tokens(model), batch_size=batch_size,
                  **{f"{key}_rate": _share(clips, key) for key in ("sane", "monotonic", "inside", "gaps_ok")})
    if algorithm == "chunked":
        record.update(chunk_s=CHUNK_S, stride_s=STRIDE_S)
    write_clips(out_dir / f"clips-{name}-{label}-{algorithm}.jsonl", clips)
    return record


def bench_long_form(engine: HfEngine, processor, label: str, samples: Sequence[Sample], algorithm: str,
                    batch_size: int, out_dir: Path) -> dict:
    """One (model, set, algorithm) record in this process."""
    clips, seconds = long_form_rows(engine, processor, label, samples, algorithm, batch_size)
    return long_form_record(engine.name, label, clips, seconds, algorithm, engine.model, batch_size, out_dir)


def _share(clips: list[dict], key: str) -> float | None:
    values = [c[key] for c in clips if c[key] is not None]
    return sum(values) / len(values) if values else None


def run_long_form_bench(models: Sequence[str], datasets: Sequence[str], out_dir: Path,
                        opts: BenchOptions) -> list[dict]:
    """Benchmark models on long-form sets with opts.long_form's algorithms; writes longform.json, longform.md
    and the per-file jsonl."""
    if opts.engine != "hf" or opts.fallback or opts.streaming or opts.assistant:
        raise AsrError("--long-form runs on the Hugging Face engine alone; drop --engine ct2, --fallback, "
                       "--streaming and --assistant")
    labels = model_labels(models)
    torch.set_num_threads(opts.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = [load_eval_samples(d, opts.limit, max_seconds=None) for d in datasets]
    for data in loaded:
        seconds = sum(len(s.audio) for s in data.samples) / SAMPLE_RATE
        print(f"{data.label}: {len(data.samples)} files, {seconds:.0f} s; {data.stats.summary()}")
    records = []
    for ref, name in zip(models, labels):
        engine, processor, _ = load_engine(ref, "hf", name)
        records += [bench_long_form(engine, processor, data.label, data.samples, algorithm, opts.batch_size, out_dir)
                    for data in loaded for algorithm in opts.long_form]
    (out_dir / "longform.json").write_text(json.dumps(records, indent=2))
    (out_dir / "bench-options.json").write_text(json.dumps(asdict(opts), indent=2))
    table = longform_table(records)
    (out_dir / "longform.md").write_text(table)
    print(table)
    print(f"long-form: {len(labels)} model(s) on {len(datasets)} set(s) in {time.perf_counter() - started:.0f} s; "
          f"results in {out_dir}")
    return records
