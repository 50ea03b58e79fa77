"""`asr bench`: every model on every dataset; one record per (model, dataset) in bench.json, a table and a plot.

Every model sees the same decoded audio and the same log-mel features. WER comes from a batched greedy pass
with a token cap; latency from a separate batch-1 pass after warm-up, on a fixed number of threads.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from asr.infer.engines import HfEngine, MemoizedEncoder
from asr.bench.latency import measure_latency
from asr.bench.physics import decoder_weights_per_token
from asr.infer.repetition import repetition_rate
from asr.bench.outputs import log_to_wandb, markdown_table, plot_wer_vs_latency
from asr.infer.fallback import FallbackEngine
from asr.infer.transcribe import transcribe
from asr.infer.wer import error_rates, normalize
from asr.data.loading import MAX_SECONDS, DatasetRef, Sample, SkipStats, iter_samples, open_dataset
from asr.errors import AsrError
from asr.models.loading import load_processor, load_whisper, weights_fingerprint


@dataclass
class BenchOptions:
    """Knobs of one benchmark run (all recorded in bench.json)."""

    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 128
    engine: str = "hf"
    latency_clips: int = 24
    warmup: int = 2
    threads: int = 2
    streaming: bool = False
    chunk_ms: int = 300
    overlap_ms: int = 0
    assistant: str | None = None
    fallback: bool = False  # also score with Whisper's temperature fallback (HF engine), beside plain greedy
    long_form: list[str] = field(default_factory=list)  # long-form algorithms (asr.bench.longform) instead


@dataclass
class EvalSet:
    """One dataset's decoded clips as this process holds them: `samples` is its stride clips[rank::world] of a
    sharded evaluation (all of them in a world of one), `timed` the first clips for latency (rank 0 only), and
    `references` every clip's transcript, which the token cap is taken from so that it is the same on every rank."""

    label: str
    samples: list[Sample]
    timed: list[Sample]
    references: list[str]
    stats: SkipStats


def load_eval_samples(data: str, limit: int | None, language: str = "en", timed: int = 0, rank: int = 0,
                      world: int = 1, max_seconds: float | None = MAX_SECONDS) -> EvalSet:
    """Decode a dataset's clips once, so every model sees identical audio; `language` for rows without one
    (max_seconds None: long-form files). Each rank keeps only its stride's audio (and rank 0 the first `timed`
    clips), so a rank holds 1/world of the set."""
    ref = DatasetRef.parse(data)
    stats = SkipStats()
    out = EvalSet(ref.label, [], [], [], stats)
    clips = iter_samples(open_dataset(ref), stats, language, limit=limit, max_seconds=max_seconds)
    for i, sample in enumerate(tqdm(clips, desc=f"loading {ref.label}", total=limit, unit="clip", leave=False,
                                    disable=rank != 0)):
        out.references.append(sample.text)
        if i % world == rank:
            out.samples.append(sample)
        if rank == 0 and i < timed:
            out.timed.append(sample)
    return out


def unstride(parts: Sequence[list]) -> list:
    """Rows gathered from every rank's stride (rank order) back in dataset order: the inverse of the split in
    `load_eval_samples`."""
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(map(len, parts)))]


def model_label(ref: str) -> str:
    """Short display name: the registry name or the directory name."""
    path = Path(ref)
    return ref if not path.exists() else (path.parent.name if path.name == "final" else path.name)


def model_labels(refs: Sequence[str]) -> list[str]:
    """Unique display names (they key records and name files): a name shared by several folders (two `pruned/`)
    takes on parent folders, `a-pruned` and `b-pruned`, until it is unique."""
    seen = {}
    for ref in refs:
        key = str(Path(ref).resolve()) if Path(ref).exists() else ref
        if key in seen:
            raise AsrError(f"--model {ref} is given twice (as {seen[key]}); pass each model once")
        seen[key] = ref
    labels = [model_label(r) for r in refs]
    for depth in range(1, 64):
        clashes = {label for label in labels if labels.count(label) > 1}
        if not clashes:
            return labels
        for i, ref in enumerate(refs):
            if labels[i] in clashes and Path(ref).exists():
                parts = Path(ref).resolve().parts[-depth - 1:]
                labels[i] = "-".join(parts)
    raise AsrError(f"cannot give the models {', '.join(refs)} distinct names; rename one of their folders")


def load_engine(ref: str, engine: str, name: str):
    """(engine, processor, HF model) for a model reference; ct2 exports HF models on the fly (cached).

    A CTranslate2 directory made by `asr export` is benchmarked as is; its HF source supplies the size figures.
    """
    if engine == "ct2":
        from asr.infer.ct2_engine import Ct2Engine
        from asr.models.export import EXPORT_STAMP

        stamp = Path(ref) / EXPORT_STAMP
        source = json.loads(stamp.read_text())["source"] if stamp.is_file() else ref
        if (Path(ref) / "model.bin").is_file() and not stamp.is_file():
            raise AsrError(f"{ref}: CTranslate2 directory without {EXPORT_STAMP}; make it with `asr export`")
        model = load_whisper(source)
        return Ct2Engine.for_model(ref, name), load_processor(source), model
    if engine != "hf":
        raise AsrError(f"unknown engine '{engine}'; choose hf or ct2")
    model = load_whisper(ref)
    return HfEngine(model, name), load_processor(ref), model


def teacher_of(ref: str, models: Sequence[str]) -> str:
    """The model another is compared against (latency ratios): its pruning.json teacher if that is benchmarked
    too, else the first --model."""
    pruning = Path(ref) / "pruning.json"
    if pruning.is_file():
        teacher = json.loads(pruning.read_text())["teacher"]
        if teacher in models:
            return teacher
    return models[0]


def transcribe_clips(engine, processor, samples: Sequence[Sample], batch_size: int, cap: int,
                     progress: str | None) -> list[dict]:
    """The accuracy pass: per-clip rows (reference, hypothesis, both normalized, tokens, capped) that `score`
    reads and clips-*.jsonl keeps for inspection. `progress` labels the progress bar (None: no bar)."""
    with tqdm(total=len(samples), desc=progress, unit="clip", disable=progress is None) as bar:
        return clip_rows(samples, transcribe(engine, processor, samples, batch_size, cap, progress=bar.update))


def clip_rows(samples: Sequence[Sample], hyps) -> list[dict]:
    """Per-clip rows of samples and their hypotheses, normalized in each clip's language."""
    return [{"id": s.id, "language": s.language, "reference": s.text, "hypothesis": h.text,
             "ref_norm": normalize(s.text, s.language), "hyp_norm": normalize(h.text, s.language),
             "tokens": len(h.tokens), "capped": h.capped} for s, h in zip(samples, hyps)]


def score(model: str, dataset: str, clips: list[dict]) -> dict:
    """Corpus and per-language error rates and the repetition rate of a whole set's per-clip rows."""
    refs, hyps_norm = [c["ref_norm"] for c in clips], [c["hyp_norm"] for c in clips]
    record = {"model": model, "dataset": dataset, "n": len(clips), **error_rates(refs, hyps_norm),
              "repetition_rate": repetition_rate(hyps_norm, refs, [c["capped"] for c in clips]),
              "capped_rate": sum(c["capped"] for c in clips) / max(len(clips), 1), "per_language": {}}
    for language in sorted({c["language"] for c in clips}):
        subset = [c for c in clips if c["language"] == language]
        record["per_language"][language] = {"n": len(subset), **error_rates(
            [c["ref_norm"] for c in subset], [c["hyp_norm"] for c in subset])}
    return record


def interleaved_latency(pairs: Sequence[tuple], timed: Sequence[Sample], label: str, opts: BenchOptions) -> list[dict]:
    """Latency summaries of (engine, processor) pairs timed clip by clip in turn on the `timed` clips."""
    names = ", ".join(engine.name for engine, _ in pairs)
    with tqdm(total=len(timed), desc=f"latency on {label} ({names})", unit="clip") as bar:
        results = measure_latency([e for e, _ in pairs], [p for _, p in pairs], timed, opts.warmup,
                                  opts.max_new_tokens, progress=bar.update)
    return [summary for summary, _ in results]


def token_cap(tokenizer, references: Sequence[str], floor: int, window: int) -> int:
    """The accuracy pass's token cap: `floor`, raised to cover the dataset's longest reference with room (x1.25 + 8
    tokens), so a long prompt is never cut short (real Italian/Russian prompts reach 300 tokens); a collapsed
    student still stops there. `window`: the decoder's positions (448), minus room for the prompt."""
    longest = max((len(tokenizer(text, add_special_tokens=False).input_ids) for text in references), default=0)
    return min(max(floor, math.ceil(1.25 * longest) + 8), window - 8)


def bench_one(engine, processor, model, data: EvalSet, opts: BenchOptions, out_dir: Path,
              encoder_memo: dict | None = None) -> dict:
    """One (model, dataset) record: accuracy and the optional fallback / streaming figures (latency is timed
    afterwards, every model interleaved).

    With `encoder_memo` (shared only among models with identical encoder weights) the accuracy pass reuses
    encoder states; the latency pass always runs the real encoder.
    """
    accuracy_engine = engine if encoder_memo is None else MemoizedEncoder(engine, encoder_memo)
    cap = token_cap(processor.tokenizer, data.references, opts.max_new_tokens, model.config.max_target_positions)
    clips = transcribe_clips(accuracy_engine, processor, data.samples, opts.batch_size, cap,
                             f"{engine.name} on {data.label}: WER")
    record = accuracy_record(engine.name, data, clips, cap, model, opts, out_dir)
    if opts.fallback:
        record["fallback"] = fallback_pass(accuracy_engine, processor, model, data, opts, cap, out_dir)
    if opts.streaming:
        from asr.bench.streaming import simulate_streaming

        record["streaming"] = simulate_streaming(engine, processor, data.timed, opts.chunk_ms, opts.overlap_ms,
                                                 opts.max_new_tokens)
    return record


def accuracy_record(name: str, data: EvalSet, clips: list[dict], cap: int, model, opts: BenchOptions,
                    out_dir: Path) -> dict:
    """A (model, dataset) record from the whole set's per-clip rows in dataset order (gathered from the ranks in a
    sharded evaluation): scores, the cap, skipped clips and the model's size figures; the rows go to clips-*.jsonl."""
    record = score(name, data.label, clips)
    record.update(max_new_tokens=cap, skipped_clips=dict(data.stats.counts),
                  params=sum(p.numel() for p in model.parameters()), encoder_layers=model.config.encoder_layers,
                  decoder_layers=model.config.decoder_layers, engine=opts.engine,
                  decoder_weights_per_token=decoder_weights_per_token(model.config))
    write_clips(out_dir / f"clips-{name}-{data.label}.jsonl", clips)
    return record


def write_clips(path: Path, clips: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in clips)


def fallback_pass(engine, processor, model, data: EvalSet, opts: BenchOptions, cap: int, out_dir: Path) -> dict:
    """The accuracy pass again under the temperature-fallback safeguard; its repetition rate is reported too,
    so a safeguard cannot hide a looping student. Per-clip rows go to clips-<model>+fallback-<dataset>.jsonl,
    for `benchmarks/paired_wer.py` against the greedy ones."""
    safeguarded = FallbackEngine(engine, model, processor.tokenizer)
    clips = transcribe_clips(safeguarded, processor, data.samples, opts.batch_size, cap,
                             f"{engine.name} on {data.label}: WER with fallback")
    record = score(f"{engine.name}+fallback", data.label, clips)
    write_clips(out_dir / f"clips-{engine.name}+fallback-{data.label}.jsonl", clips)
    keep = ("wer", "cer", "substitutions", "deletions", "insertions", "repetition_rate", "capped_rate")
    return {**{k: record[k] for k in keep}, "fallback_rate": safeguarded.fallback_clips / max(safeguarded.clips, 1)}


def add_ratios(records: list[dict], teachers: dict[str, str]) -> None:
    """Measured and predicted decoder ms/token relative to each model's teacher on the same dataset."""
    by_key = {(r["model"], r["dataset"]): r for r in records}
    for r in records:
        teacher = by_key.get((teachers[r["model"]], r["dataset"]))
        r["teacher"] = teachers[r["model"]]
        if teacher is None or "latency" not in r:  # dev sets (they only choose final/) are not timed
            continue
        r["predicted_decoder_ratio"] = r["decoder_weights_per_token"] / teacher["decoder_weights_per_token"]
        # a teacher timing taken interleaved with this model's (training checkpoints) beats the teacher's own row
        base = r.get("paired_teacher_latency") or teacher["latency"]
        r["measured_decoder_ratio"] = r["latency"]["decoder_ms_per_token_p50"] / base["decoder_ms_per_token_p50"]


def run_bench(models: Sequence[str], datasets: Sequence[str], out_dir: Path, opts: BenchOptions | None = None) -> list[dict]:
    """Benchmark models on datasets; writes bench.json, bench.md, bench.png and clips-<model>-<dataset>.jsonl."""
    opts = opts or BenchOptions()
    labels = model_labels(models)  # before any work: a clash would only surface when the records are joined
    if opts.fallback and opts.engine != "hf":
        raise AsrError("--fallback runs on the Hugging Face engine only; drop --engine ct2 or --fallback")
    torch.set_num_threads(opts.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = [load_eval_samples(d, opts.limit, timed=opts.latency_clips) for d in datasets]
    for data in loaded:
        print(f"{data.label}: {len(data.samples)} clips; {data.stats.summary()}")
    teachers = {name: labels[list(models).index(teacher_of(m, models))] for name, m in zip(labels, models)}
    records, engines = [], []
    memos: dict[tuple[str, str], dict] = {}  # (encoder weights, dataset) -> encoder states per clip
    for ref, name in zip(models, labels):
        engine, processor, model = load_engine(ref, opts.engine, name)
        engines.append((engine, processor))
        encoder = weights_fingerprint(model.model.encoder)
        for data in loaded:
            memo = memos.setdefault((encoder, data.label), {}) if opts.engine == "hf" else None
            records.append(bench_one(engine, processor, model, data, opts, out_dir, memo))
        if opts.assistant is not None and engine.name == teachers[engine.name]:
            from asr.bench.speculative import speculative_check

            for data in loaded:
                record = next(r for r in records if r["model"] == engine.name and r["dataset"] == data.label)
                record["speculative"] = speculative_check(model, load_whisper(opts.assistant), processor,
                                                          data.timed, opts.max_new_tokens,
                                                          assistant_name=model_label(opts.assistant))
        del model
    for data in (d for d in loaded if d.timed):  # all models timed clip by clip in turn: comparable ratios
        for (engine, _), summary in zip(engines, interleaved_latency(engines, data.timed, data.label, opts)):
            next(r for r in records if r["model"] == engine.name and r["dataset"] == data.label)["latency"] = summary
    add_ratios(records, teachers)
    (out_dir / "bench.json").write_text(json.dumps(records, indent=2))
    (out_dir / "bench-options.json").write_text(json.dumps(asdict(opts), indent=2))
    table = markdown_table(records)
    (out_dir / "bench.md").write_text(table)
    plot_wer_vs_latency(records, set(teachers.values()), out_dir / "bench.png")
    log_to_wandb(records)
    print(table)
    print(f"benchmarked {len(labels)} model(s) on {len(datasets)} dataset(s) in "
          f"{time.perf_counter() - started:.0f} s; results in {out_dir}")
    return records
