"""`asr bench`: every model on every dataset, one record per (model, dataset), written as JSON, JSONL and a table."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from asr.bench.transcribe import transcribe
from asr.bench.wer import error_rates, normalize
from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.models.loading import load_processor, load_whisper


def load_eval_samples(data: str, limit: int | None) -> tuple[str, list, SkipStats]:
    """Decode a dataset's clips once, so every model sees identical audio."""
    ref = DatasetRef.parse(data)
    stats = SkipStats()
    samples = list(tqdm(iter_samples(open_dataset(ref), stats, limit=limit), desc=f"loading {ref.label}",
                        total=limit, unit="clip", leave=False))
    return ref.label, samples, stats


def score_records(model: str, dataset: str, samples, hyps) -> tuple[dict, list[dict]]:
    """Corpus and per-language error rates, plus the per-clip rows kept for inspection."""
    clips = [{"id": s.id, "language": s.language, "reference": s.text, "hypothesis": h.text,
              "ref_norm": normalize(s.text, s.language), "hyp_norm": normalize(h.text, s.language),
              "tokens": len(h.tokens), "capped": h.capped} for s, h in zip(samples, hyps)]
    record = {"model": model, "dataset": dataset, "n": len(clips),
              **error_rates([c["ref_norm"] for c in clips], [c["hyp_norm"] for c in clips]),
              "capped_rate": sum(c["capped"] for c in clips) / max(len(clips), 1),
              "per_language": {}}
    for language in sorted({c["language"] for c in clips}):
        subset = [c for c in clips if c["language"] == language]
        record["per_language"][language] = {"n": len(subset), **error_rates(
            [c["ref_norm"] for c in subset], [c["hyp_norm"] for c in subset])}
    return record, clips


def markdown_table(records: Sequence[dict]) -> str:
    """The bench table: one row per (model, dataset)."""
    lines = ["| model | dataset | n | WER | CER | sub | del | ins | capped |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        lines.append(f"| {r['model']} | {r['dataset']} | {r['n']} | {pct(r['wer'])} | {pct(r['cer'])} | "
                     f"{r['substitutions']} | {r['deletions']} | {r['insertions']} | {pct(r['capped_rate'])} |")
    return "\n".join(lines) + "\n"


def run_bench(models: Sequence[str], datasets: Sequence[str], out_dir: Path, limit: int | None = None,
              batch_size: int = 8, max_new_tokens: int = 128) -> list[dict]:
    """Benchmark models on datasets; writes bench.json, bench.md and clips-<model>-<dataset>.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = [load_eval_samples(d, limit) for d in datasets]
    for label, samples, stats in loaded:
        print(f"{label}: {len(samples)} clips; {stats.summary()}")
    records = []
    started = time.perf_counter()
    for model_ref in models:
        model, processor = load_whisper(model_ref), load_processor(model_ref)
        name = Path(model_ref).name if Path(model_ref).exists() else model_ref
        for label, samples, _ in loaded:
            with tqdm(total=len(samples), desc=f"{name} on {label}", unit="clip") as bar:
                hyps = transcribe(model, processor, samples, batch_size, max_new_tokens, progress=bar.update)
            record, clips = score_records(name, label, samples, hyps)
            records.append(record)
            with open(out_dir / f"clips-{name}-{label}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in clips)
    (out_dir / "bench.json").write_text(json.dumps(records, indent=2))
    table = markdown_table(records)
    (out_dir / "bench.md").write_text(table)
    print(table)
    print(f"benchmarked {len(models)} model(s) on {len(datasets)} dataset(s) in "
          f"{time.perf_counter() - started:.0f} s; results in {out_dir}")
    return records
