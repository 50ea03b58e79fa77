"""Pseudo-labelling (distil-whisper's first stage): the teacher's greedy transcripts become training labels.

Clips whose transcript is empty, loops, is all upper case, or is further than a threshold from the reference
(normalized WER) are dropped and counted by reason. Kept clips become an audiofolder (audio hard-linked,
`metadata.csv` with file_name, transcription, pseudo_label, pseudo_label_segments, pseudo_wer, language) and the
teacher's targets at every label position of the pseudo-label (teacher-forced on the layout `label_layout` builds
for training), so KD can run without the teacher.

With `timestamps` the teacher decodes with timestamps (one pass, as distil-whisper labels): `pseudo_label` is the
text of its segments and `pseudo_label_segments` their times (JSON [[start_s, end_s, text], ...], what training
reads to teach timestamps), empty for a clip whose last segment the teacher left open. Its targets are stored for
the timestamped layout too ("ts.<kind>"), so a cached-target KD step lines up with whichever layout it draws.
The stored targets are:
- `top_k`: the top-K next-token log-probs at `temperature` (normalized over the whole vocabulary, so the mass
  outside the top K is known): compact (6 bytes × K per token) but approximate, see `kd_loss_topk`;
- `teacher_states`: the decoder's final hidden state (fp16, 2 bytes × d_model per token); the teacher's logits
  are exactly state · output embeddingᵀ, so KD from it is the live teacher's KD without the teacher forward.

Rows are split over N local processes (strided). Each process makes its finished clips durable every
`flush_every` clips: audio, then a top-K safetensors file, then lines in its own progress JSONL. A stopped
run re-run with the same command continues where it stopped; no clip is transcribed twice. A finished folder
(its summary.json went through every row of the data) is reused as it is, without reading the data again.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from asr.infer.engines import HfEngine
from asr.infer.repetition import has_loop
from asr.infer.transcribe import segments_of, text_of
from asr.infer.wer import error_rates, normalize
from asr.data.features import IGNORE_INDEX, TIME_STEP_S, label_layout, log_mel, timestamp_token
from asr.data.real import refuse_for_training
from asr.data.loading import SAMPLE_RATE, DatasetRef, Sample, SkipStats, iter_samples, open_dataset
from asr.errors import AsrError
from asr.label.targets import PROGRESS, SETTINGS, SUMMARY, TIMESTAMPED, TOPK, read_records, settings_of
from asr.models.loading import load_processor, load_whisper, local_device
from asr.models.registry import resolve_model

COLUMNS = ("file_name", "transcription", "pseudo_label", "pseudo_label_segments", "pseudo_wer", "language")
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac"}


@dataclass
class PseudoLabelOptions:
    """Knobs of one run; the first seven are part of the folder's identity (a resume must not change them)."""

    wer_threshold: float = 10.0  # percent, normalized WER of the teacher's transcript against the reference
    top_k: int | None = None
    temperature: float = 2.0  # of the stored top-K log-probs: the distilling recipe's objective.temperature
    teacher_states: bool = False  # store the teacher's final decoder states (exact KD without the teacher)
    max_new_tokens: int = 224  # openai-whisper's default sample_len (n_text_ctx // 2)
    language: str = "en"  # for datasets without a language column
    timestamps: bool = False  # decode with timestamps; keep the segments (and timestamped targets) too
    nproc: int = 1
    batch_size: int = 8
    limit: int | None = None  # only the first N rows of the dataset
    flush_every: int = 64  # clips per durable write (progress lines and one top-K file)
    task: tuple[int, int] | None = None  # (id, tasks) of an srun task: label rows with index % tasks == id only


# --- filters ---------------------------------------------------------------------------------------------
def is_all_uppercase(text: str) -> bool:
    """Two or more words with cased letters, none lower case: Whisper's shouted hallucinations on noise."""
    cased = [w for w in text.split() if any(c.lower() != c.upper() for c in w)]
    return len(cased) >= 2 and text == text.upper()


def drop_reason(hypothesis: str, reference: str, language: str, capped: bool,
                wer_threshold: float) -> tuple[str | None, float | None]:
    """Why a pseudo-label is dropped (None: kept), and its normalized WER in percent against the reference."""
    hyp, ref = normalize(hypothesis, language), normalize(reference, language)
    rates = error_rates([ref], [hyp])
    wer = None if rates["wer"] is None else round(100 * rates["wer"], 2)
    if not any(c.isalnum() for c in hyp):  # nothing, or only punctuation ('...' normalizes to '.')
        return "empty output", wer
    if has_loop(hyp.split()):
        return "repetition loop", wer
    if capped:
        return "hit the token cap", wer
    if is_all_uppercase(hypothesis):
        return "all-uppercase output", wer
    if wer is None:
        return "reference empty after normalization", wer
    if wer > wer_threshold:
        return "WER above threshold", wer
    return None, wer


# --- the teacher -----------------------------------------------------------------------------------------
@torch.inference_mode()
def teacher_targets(model, encoder_states: torch.Tensor, layouts: list[tuple[list[int], list[int]]],
                    opts: PseudoLabelOptions) -> list[dict[str, torch.Tensor]]:
    """The teacher's targets at each labelled position of each (decoder_input_ids, labels) layout, teacher-forced
    on precomputed encoder states: "ids" int32 [P, K] and "logprobs" fp16 [P, K] (top-K of softmax(logits / T))
    with `top_k`, "states" fp16 [P, d] (final decoder states, before the output projection) with `teacher_states`."""
    width = max(len(d) for d, _ in layouts)
    ids = torch.full((len(layouts), width), model.generation_config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (d, _) in enumerate(layouts):
        ids[i, :len(d)] = torch.tensor(d)
        mask[i, :len(d)] = 1
    hidden = model.model.decoder(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 encoder_hidden_states=encoder_states.to(model.dtype)).last_hidden_state
    out = []
    for i, (_, labels) in enumerate(layouts):
        positions = [j for j, label in enumerate(labels) if label != IGNORE_INDEX]
        targets = {}
        if opts.top_k:
            logits = model.proj_out(hidden[i, positions]).float()
            values, top = torch.log_softmax(logits / opts.temperature, dim=-1).topk(opts.top_k, dim=-1)
            targets["ids"], targets["logprobs"] = top.to(torch.int32), values.to(torch.float16)
        if opts.teacher_states:
            targets["states"] = hidden[i, positions].to(torch.float16)
        out.append({k: v.cpu().contiguous() for k, v in targets.items()})
    return out


def transcript(engine: HfEngine, processor, tokens: list[int], timestamps: bool, duration: float
               ) -> tuple[str, list | None]:
    """(text, segments) of the teacher's tokens: with timestamps the text is its segments' text joined (what the
    loader checks them against), and segments None when the last one was left open (no end time to teach).
    Times past the clip's end (Whisper overshoots by a step or two) are pulled back to its last 20 ms step."""
    if not timestamps:
        return text_of(processor.tokenizer, tokens, engine.eos_token_id), None
    begin = timestamp_token(engine.model.generation_config, 0.0)
    segments, left_open = segments_of(processor.tokenizer, tokens, engine.eos_token_id, begin)
    last = math.floor(duration / TIME_STEP_S) * TIME_STEP_S
    segments = [[round(min(start, last), 2), round(min(end, last), 2), text] for start, end, text in segments if text]
    if left_open or not segments:
        return text_of(processor.tokenizer, tokens, engine.eos_token_id), None
    return " ".join(text for _, _, text in segments), segments


def label_batch(engine: HfEngine, processor, samples: list[Sample],
                opts: PseudoLabelOptions) -> list[tuple[dict, Sample, dict | None]]:
    """Transcribe a batch (clips of one language decoded together), filter, and store the teacher's targets for
    the kept ones (for the timestamped layout too where the clip has segments)."""
    out = []
    config = engine.model.generation_config
    for language, group in groupby(sorted(samples, key=lambda s: s.language), key=lambda s: s.language):
        group = list(group)
        states = engine.encode(log_mel(processor.feature_extractor, [s.audio for s in group]))
        records, timings = [], []
        decoded_rows = engine.decode(states, language, opts.max_new_tokens,
                                     **({"return_timestamps": True} if opts.timestamps else {}))
        for sample, decoded in zip(group, decoded_rows):
            text, segments = transcript(engine, processor, decoded.tokens, opts.timestamps,
                                        len(sample.audio) / SAMPLE_RATE)
            timings.append(segments)
            reason, wer = drop_reason(text, sample.text, language, decoded.capped, opts.wer_threshold)
            name = sample.id if sample.path else Path(sample.id).stem + ".wav"  # in-memory audio is written as WAV
            records.append({"source_id": sample.id, "file_name": name, "kept": reason is None, "reason": reason,
                            "transcription": sample.text, "pseudo_label": text,
                            "pseudo_label_segments": json.dumps(segments, ensure_ascii=False) if segments else "",
                            "pseudo_wer": wer, "language": language})
        targets: list[dict | None] = [None] * len(group)
        kept = [i for i, r in enumerate(records) if r["kept"]]
        if (opts.top_k or opts.teacher_states) and kept:
            layouts = [label_layout(processor.tokenizer, config, records[i]["pseudo_label"], language) for i in kept]
            for i, clip_targets in zip(kept, teacher_targets(engine.model, states[kept], layouts, opts)):
                targets[i] = clip_targets
            timed = [i for i in kept if timings[i]]
            layouts = [label_layout(processor.tokenizer, config, records[i]["pseudo_label"], language, timings[i])
                       for i in timed]
            for i, clip_targets in zip(timed, teacher_targets(engine.model, states[timed], layouts, opts)
                                       if timed else []):
                targets[i].update({f"{TIMESTAMPED}{kind}": value for kind, value in clip_targets.items()})
        out.extend(zip(records, group, targets))
    return out


# --- durable output --------------------------------------------------------------------------------------
def place_audio(sample: Sample, dest: Path) -> None:
    """Hard-link the source file into the folder (copy across file systems; write WAV for in-memory audio)."""
    tmp = dest.with_name(dest.name + ".part")
    tmp.unlink(missing_ok=True)
    if sample.path:
        try:
            os.link(sample.path, tmp)
        except OSError:
            shutil.copyfile(sample.path, tmp)
    else:
        import soundfile as sf

        sf.write(tmp, sample.audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, dest)


@dataclass
class ShardWriter:
    """One shard's finished clips, made durable together: audio, then the teacher-target file, then the progress lines
    (a clip counts as finished only once its line is written, so a kill in between redoes it)."""

    out: Path
    tag: str
    teacher: str
    pending: list = field(default_factory=list)
    files: int = 0

    def add(self, record: dict, sample: Sample, targets: dict | None) -> None:
        self.pending.append((record, sample, targets))

    def flush(self) -> None:
        if not self.pending:
            return
        for record, sample, _ in self.pending:
            if record["kept"]:
                place_audio(sample, self.out / record["file_name"])
        tensors = {}
        for record, _, targets in self.pending:
            tensors.update({f"{record['file_name']}.{key}": value for key, value in (targets or {}).items()})
        if tensors:
            from safetensors.torch import save_file

            name = f"{self.tag}-{self.files:05d}.safetensors"
            path = self.out / TOPK / name
            save_file(tensors, path.with_suffix(".part"), metadata={"teacher": self.teacher})
            os.replace(path.with_suffix(".part"), path)
            self.files += 1
            for record, _, targets in self.pending:
                if targets:
                    record["topk_file"] = name
        with open(self.out / PROGRESS / f"{self.tag}.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r, _, _ in self.pending)
            f.flush()
            os.fsync(f.fileno())
        self.pending.clear()


# --- one shard (one process) -----------------------------------------------------------------------------
@dataclass
class ShardJob:
    """What one process labels: dataset row indices (its stride of the unfinished rows)."""

    teacher: str
    data: str
    out: str
    indices: list[int]
    rank: int
    tag: str
    opts: PseudoLabelOptions
    threads: int | None = None


def source_id(audio: dict | None, index: int) -> str:
    """The clip id `iter_samples` gives a row: its file name, or row<index>.wav for audio without a path."""
    path = (audio or {}).get("path")
    return Path(path).name if path else f"row{index}.wav"


def _rows(ds, indices: list[int], read: list[int]) -> Iterator[dict]:
    for i in indices:
        row = dict(ds[i])
        row["audio"] = {**(row["audio"] or {}), "path": (row["audio"] or {}).get("path") or source_id(None, i)}
        read[0] += 1
        yield row


def label_shard(job: ShardJob) -> dict:
    """Label this shard's rows, flushing as it goes; returns the loader's skip counts and examples."""
    if job.threads:
        torch.set_num_threads(job.threads)
    model, processor = load_whisper(job.teacher), load_processor(job.teacher)
    engine = HfEngine(model, "teacher", local_device(job.rank))  # one GPU per process where there are GPUs
    ds = open_dataset(DatasetRef.parse(job.data))
    stats = SkipStats()
    writer = ShardWriter(Path(job.out), f"{job.tag}-r{job.rank}", job.teacher)
    batch: list[Sample] = []
    read = [0]  # rows taken from the dataset so far, labelled or skipped by the loader
    with tqdm(total=len(job.indices), desc=f"pseudo-labelling (shard {job.rank})", unit="clip",
              position=job.rank) as bar:
        samples = iter_samples(_rows(ds, job.indices, read), stats, default_language=job.opts.language)
        for sample in samples:
            batch.append(sample)
            if len(batch) == job.opts.batch_size:
                for item in label_batch(engine, processor, batch, job.opts):
                    writer.add(*item)
                batch = []
                bar.update(read[0] - bar.n)
                if len(writer.pending) >= job.opts.flush_every:
                    writer.flush()
        if batch:
            for item in label_batch(engine, processor, batch, job.opts):
                writer.add(*item)
        writer.flush()
        bar.update(read[0] - bar.n)
    return {"counts": dict(stats.counts), "examples": stats.examples}


# --- the folder ------------------------------------------------------------------------------------------
def prepare_out(out: Path, settings: dict) -> None:
    """Create the folder, or check that an existing one is this run's (same settings) so it can resume."""
    stored = settings_of(out)
    if stored is None:
        if out.exists() and any(out.iterdir()):
            raise AsrError(f"{out}: exists and is not a pseudo-label folder; choose a new --out")
        (out / PROGRESS).mkdir(parents=True, exist_ok=True)
        (out / TOPK).mkdir(exist_ok=True)
        (out / SETTINGS).write_text(json.dumps(settings, indent=2))
        return
    changed = [k for k in settings if stored.get(k) != settings[k]]
    if changed:
        was = ", ".join(f"{k}={stored.get(k)!r}" for k in changed)
        raise AsrError(f"{out}: was made with different {', '.join(changed)} ({was}); use a new --out or the same "
                       "settings")


def write_metadata(out: Path, kept: list[dict]) -> None:
    """metadata.csv of the kept clips (atomically), in file-name order."""
    tmp = out / "metadata.csv.part"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in sorted(kept, key=lambda r: r["file_name"]):
            writer.writerow([r.get(c, "") for c in COLUMNS])  # a clip labelled before a column existed: empty
    os.replace(tmp, out / "metadata.csv")


def remove_orphans(out: Path, records: list[dict]) -> None:
    """Audio and top-K files a killed run wrote before its progress line (their clips were redone)."""
    kept = {r["file_name"] for r in records if r["kept"]}
    topk_files = {r.get("topk_file") for r in records}
    for path in out.iterdir():
        if path.is_file() and (path.suffix.lower() in AUDIO_SUFFIXES or path.name.endswith(".part")) \
                and path.name not in kept and path.name != "metadata.csv":
            path.unlink()
    for path in (out / TOPK).iterdir():
        if path.name not in topk_files:
            path.unlink()


def rows_to_label(ds, done: set[str], stats: SkipStats) -> list[int]:
    """Indices of rows not finished yet; a clip id seen before in the dataset is skipped and counted."""
    todo, seen = [], set()
    for i, row in enumerate(ds.select_columns(["audio"])):
        sid = source_id(row["audio"], i)
        if sid in seen:
            stats.skip("duplicate clip id", sid)
            continue
        seen.add(sid)
        if sid not in done:
            todo.append(i)
    return todo


def folder_settings(teacher: str, data: str, opts: PseudoLabelOptions) -> dict:
    """What makes a folder's labels what they are: a resume must not change any of it."""
    return {"teacher": teacher, "data": str(Path(data).resolve()) if Path(data).exists() else data,
            "wer_threshold": opts.wer_threshold, "top_k": opts.top_k, "max_new_tokens": opts.max_new_tokens,
            "language": opts.language, "temperature": opts.temperature if opts.top_k else None,  # of the top-K
            "teacher_states": opts.teacher_states or None,  # None: a folder made before the option matches
            "timestamps": opts.timestamps or None}


def pseudo_label(teacher: str, data: str, out: Path, opts: PseudoLabelOptions | None = None) -> dict:
    """Label `data` with `teacher` into the audiofolder `out` (resuming a stopped run there); returns the summary
    also written to out/summary.json. An srun task (`opts.task`) labels its stride and returns its own counts; the
    call after the srun step writes the folder's metadata and summary."""
    opts = opts or PseudoLabelOptions()
    started = time.perf_counter()
    resolve_model(teacher)  # a bad reference fails here, before any folder is made
    refuse_for_training(data, "pseudo-labels")
    settings = folder_settings(teacher, data, opts)
    out = Path(out)
    prepare_out(out, settings)
    ds = open_dataset(DatasetRef.parse(data))
    if opts.limit is not None:
        ds = ds.select(range(min(opts.limit, len(ds))))
    finished = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).is_file() else None
    if finished is not None and finished.get("rows") == len(ds):  # a run went through every row: nothing to scan
        return {**finished, "transcribed_this_run": 0, "seconds_this_run": round(time.perf_counter() - started, 1)}
    done = {r["source_id"] for r in read_records(out)}
    stats = SkipStats()
    todo = rows_to_label(ds, done, stats)
    tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if opts.task is not None:
        return label_task(teacher, data, out, opts, todo, tag, started)
    world = max(1, min(opts.nproc, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // world) if world > 1 else None
    jobs = [ShardJob(teacher, data, str(out), todo[rank::world], rank, tag, opts, threads) for rank in range(world)]
    if todo:
        if world == 1:
            results = [label_shard(jobs[0])]
            torch.cuda.empty_cache()  # the teacher's GPU memory back before training starts its own processes
        else:
            # a process pool that raises (BrokenProcessPool) if a worker is killed, instead of waiting forever
            with ProcessPoolExecutor(world, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(label_shard, jobs))
        for result in results:
            for reason, n in result["counts"].items():
                stats.counts[reason] += n
                names = stats.examples.setdefault(reason, [])
                names.extend(result["examples"][reason][:3 - len(names)])
    records = read_records(out)
    kept = [r for r in records if r["kept"]]
    write_metadata(out, kept)
    remove_orphans(out, records)
    dropped = Counter(r["reason"] for r in records if not r["kept"])
    kept_wer = [r["pseudo_wer"] for r in kept if r["pseudo_wer"] is not None]
    summary = {"teacher": teacher, "data": data, "out": str(out), "rows": len(ds), "wer_threshold": opts.wer_threshold,
               "top_k": opts.top_k, "temperature": settings["temperature"],
               "teacher_states": opts.teacher_states, "timestamps": opts.timestamps,
               "timestamped": sum(bool(r.get("pseudo_label_segments")) for r in kept),
               "labelled": len(records), "kept": len(kept),
               "dropped": dict(dropped.most_common()), "dropped_total": sum(dropped.values()),
               "loader_skipped": dict(stats.counts), "loader_skipped_examples": stats.examples,
               "kept_mean_clip_wer": sum(kept_wer) / len(kept_wer) if kept_wer else None,
               "transcribed_this_run": len(records) - len(done), "processes": world,
               "seconds_this_run": round(time.perf_counter() - started, 1)}
    (out / f"{SUMMARY}.part").write_text(json.dumps(summary, indent=2))
    os.replace(out / f"{SUMMARY}.part", out / SUMMARY)  # its presence marks the folder finished
    return summary


def label_task(teacher: str, data: str, out: Path, opts: PseudoLabelOptions, todo: list[int], tag: str,
               started: float) -> dict:
    """One srun task's share: the unfinished rows whose index is its id modulo the tasks, on its GPU."""
    rank, tasks = opts.task
    mine = [i for i in todo if i % tasks == rank]
    result = label_shard(ShardJob(teacher, data, str(out), mine, rank, tag, opts)) if mine else {"counts": {}}
    return {"task": rank, "tasks": tasks, "transcribed_this_run": len(mine), "loader_skipped": result["counts"],
            "seconds_this_run": round(time.perf_counter() - started, 1), "out": str(out)}


def summary_line(summary: dict) -> str:
    """One line of figures for the end of a run (or of one srun task's share)."""
    if "task" in summary:
        return (f"pseudo-labelling task {summary['task']} of {summary['tasks']}: transcribed "
                f"{summary['transcribed_this_run']} clips in {summary['seconds_this_run']:.0f} s -> {summary['out']}")
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items()) or "none"
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["loader_skipped"].items()) or "none"
    return (f"pseudo-labelled {summary['labelled']} clips with {summary['teacher']}: kept {summary['kept']}, dropped "
            f"{summary['dropped_total']} ({dropped}); unreadable rows skipped: {skipped}; this run transcribed "
            f"{summary['transcribed_this_run']} in {summary['seconds_this_run']:.0f} s on {summary['processes']} "
            f"process(es) -> {summary['out']}")
