"""Benchmark every saved student on the recipe's eval sets, keep the table, pick the best.

The accuracy pass is sharded over the ranks: each transcribes its stride of every eval set on its own device,
holding only that stride's audio and encoder states, and rank 0 puts the gathered per-clip rows back in dataset
order and scores them, so any world size writes the records a world of one would. The teacher is the one the run
already holds for KD (one is loaded only for runs without a live teacher).

Latency is timed on one set (the first test set), on rank 0 alone, each student clip by clip interleaved with the
teacher, and the decoder ratio is taken against that paired teacher timing: training runs for hours on a shared
machine, so a teacher timing from the start of the run would not be comparable with a checkpoint timed later under
different load. The teacher is never timed alone (19 s of the quickstart, for a figure the table replaced anyway); its
row shows the median of its paired timings."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch

from asr.infer.engines import HfEngine, MemoizedEncoder
from asr.bench.longform import long_form_record, long_form_rows
from asr.bench.outputs import log_to_wandb, longform_table, markdown_table, plot_wer_vs_latency
from asr.bench.run import (BenchOptions, EvalSet, accuracy_record, add_ratios, interleaved_latency, load_eval_samples,
                           token_cap, transcribe_clips, unstride)
from asr.config import Recipe
from asr.data.real import is_real
from asr.models.loading import load_processor, load_whisper, weights_fingerprint
from asr.train.engine import Dist


class CheckpointBench:
    """One per rank, and every rank calls `baselines` and `checkpoint` together (they gather); rank 0 appends one
    record per (checkpoint, eval set) to RUN/bench/checkpoints.jsonl and redraws the table."""

    def __init__(self, run_dir: Path, recipe: Recipe, dist: Dist, teacher=None, dtype: torch.dtype = torch.float32):
        """`teacher`: the run's live KD teacher, already on `dist.device` in `dtype`. Every model is benched in the
        run's dtype, so the students are timed on the teacher's terms without a second copy of it."""
        e = recipe.eval
        self.recipe, self.dist, self.dtype, self.out = recipe, dist, dtype, run_dir / "bench"
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = self.out / "checkpoints.jsonl"
        self.opts = BenchOptions(limit=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                 latency_clips=e.latency_clips, warmup=e.warmup)
        real_limit = e.limit if e.real_limit is None else e.real_limit
        refs = [(d, "dev") for d in recipe.data.dev] + [(d, _eval_role(d)) for d in recipe.data.eval]
        # latency is a property of the model, timed on one set: the first test set (else the first real one)
        timed = next((i for i, (_, role) in enumerate(refs) if role != "dev"), None)
        self.datasets = [load_eval_samples(d, real_limit if role == "real" else e.limit, recipe.data.fallback_language,
                                           e.latency_clips if i == timed else 0, dist.rank, dist.world)
                         for i, (d, role) in enumerate(refs)]
        self.roles = {data.label: role for (_, role), data in zip(refs, self.datasets)}
        # final/ is chosen on the dev sets; without any, on the test sets (never on real recordings)
        self.chosen_role = "dev" if recipe.data.dev else "test"
        long = recipe.data.long_eval  # long-form files: each rank decodes its stride of them too
        self.long_sets = [(_eval_role(d), load_eval_samples(d, long.limit, recipe.data.fallback_language,
                                                            rank=dist.rank, world=dist.world, max_seconds=None))
                          for d in long.sets] if long else []
        self.long_file = self.out / "longform.jsonl"
        self.run_dir = run_dir
        self.memo_encoder: str | None = None  # the encoder weights whose states `memos` holds
        self.memos: dict[str, dict] = {}  # eval set -> encoder states of this rank's clips
        self.live_teacher = teacher
        self._teacher_engine: tuple[HfEngine, object] | None = None

    def records(self) -> list[dict]:
        return read_jsonl(self.file)

    def _benched_models(self) -> set[str]:
        """The models with records as rank 0 reads them: every rank must take the same branch, as each gathers."""
        return self.dist.gather_objects({r["model"] for r in self.records()} if self.dist.is_main else None)[0]

    def _teacher(self) -> tuple[HfEngine, object]:
        if self._teacher_engine is None:
            model = self.live_teacher
            if model is None:
                model = load_whisper(self.recipe.teacher).to(self.dist.device, self.dtype)
            self._teacher_engine = (HfEngine(model, "teacher", self.dist.device), load_processor(self.recipe.teacher))
        return self._teacher_engine

    def _student(self, model_dir: str, name: str) -> tuple[HfEngine, object]:
        model = load_whisper(model_dir).to(self.dist.device, self.dtype)
        return HfEngine(model, name, self.dist.device), load_processor(model_dir)

    def _bench(self, model_dir: str, name: str, step: int | None) -> list[dict]:
        """Every rank transcribes its stride of each set; rank 0 scores the gathered rows, times the model on the
        sets that are timed and writes the records, which it returns (the other ranks return none)."""
        engine, processor = self._teacher() if name == "teacher" else self._student(model_dir, name)
        model = engine.model
        encoder = weights_fingerprint(model.model.encoder)
        if encoder != self.memo_encoder:  # a trained encoder: the old states are never asked for again
            self.memo_encoder, self.memos = encoder, {}
        rows = []
        for data in self.datasets:
            cap = token_cap(processor.tokenizer, data.references, self.opts.max_new_tokens,
                            model.config.max_target_positions)
            memo = self.memos.setdefault(data.label, {})
            mine = transcribe_clips(MemoizedEncoder(engine, memo), processor, data.samples, self.opts.batch_size, cap,
                                    f"{name} on {data.label}: WER" if self.dist.is_main else None)
            parts = self.dist.gather_objects((mine, sum(map(len, self.memos.values()))))
            if self.dist.is_main:
                rows.append(self._record(name, step, model_dir, data, parts, cap, model))
        long_rows = [self._long_form(engine, processor, role, data, algorithm, step, model_dir)
                     for role, data in self.long_sets for algorithm in self.recipe.data.long_eval.algorithms]
        if not self.dist.is_main:
            return []
        threads = torch.get_num_threads()
        torch.set_num_threads(self.opts.threads)  # the other ranks wait at a barrier meanwhile
        try:
            for record, data in zip(rows, self.datasets):
                if data.timed and name != "teacher":  # the teacher is timed beside each student instead
                    record.update(self._latency(engine, processor, data))
        finally:
            torch.set_num_threads(threads)
        for file, written in ((self.file, rows), (self.long_file, long_rows)):
            with open(file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in written)
        self.redraw()
        return rows

    def _record(self, name: str, step: int | None, model_dir: str, data: EvalSet, parts: list[tuple], cap: int,
                model) -> dict:
        """Rank 0: one set's record from every rank's (clip rows, encoder states held); the shares are kept, so a
        record shows that no rank held more than its stride."""
        record = accuracy_record(name, data, unstride([clips for clips, _ in parts]), cap, model, self.opts, self.out)
        role = self.roles[data.label]
        record.update(step=step, path=model_dir, role=role, real_speech=role == "real",
                      dtype=str(self.dtype).removeprefix("torch."), clips_per_rank=[len(clips) for clips, _ in parts],
                      encoder_states_per_rank=[held for _, held in parts])
        return record

    def _long_form(self, engine: HfEngine, processor, role: str, data: EvalSet, algorithm: str, step: int | None,
                   model_dir: str) -> dict | None:
        """Every rank decodes its stride of a long-form set; rank 0 gets the record (the others None)."""
        mine = long_form_rows(engine, processor, data.label, data.samples, algorithm, self.opts.batch_size,
                              show_progress=self.dist.is_main)
        parts = self.dist.gather_objects(mine)
        if not self.dist.is_main:
            return None
        record = long_form_record(engine.name, data.label, unstride([clips for clips, _ in parts]),
                                  sum(seconds for _, seconds in parts), algorithm, engine.model, self.opts.batch_size,
                                  self.out)
        return {**record, "step": step, "path": model_dir, "role": role, "real_speech": role == "real",
                "files_per_rank": [len(clips) for clips, _ in parts]}

    def _latency(self, engine: HfEngine, processor, data: EvalSet) -> dict:
        """A student's latency, and the teacher's timed alongside it."""
        teacher, student = interleaved_latency([self._teacher(), (engine, processor)], data.timed, data.label,
                                               self.opts)
        return {"latency": student, "paired_teacher_latency": teacher}

    def baselines(self) -> None:
        """The teacher and the pruned, untrained student: the two ends of the recovery."""
        done = self._benched_models()
        if "teacher" not in done:
            self._bench(self.recipe.teacher, "teacher", None)
        if not self.dist.is_main and self.live_teacher is None:
            self._teacher_engine = None  # a loaded teacher is needed on rank 0 only from here on (paired latency)
        if "pruned-untrained" not in done:
            self._bench(str(self.run_dir / "student"), "pruned-untrained", 0)

    def benched(self, step: int) -> bool:
        """Whether the checkpoint of `step` has its records (one saved at preemption is benched after the resume)."""
        return f"step-{step}" in self._benched_models()

    def checkpoint(self, hf_dir: Path, step: int) -> dict | None:
        """Bench one checkpoint on every rank. Rank 0 gets the means over the sets that choose final/ and the WER of
        every set by name; the other ranks get None."""
        rows = self._bench(str(hf_dir), f"step-{step}", step)
        if not self.dist.is_main:
            return None
        chosen = [r for r in rows if self._chooses(r)] or rows
        return {"wer": _mean(chosen, "wer"), "cer": _mean(chosen, "cer"),
                "repetition_rate": _mean(chosen, "repetition_rate"),
                "latency": next(r["latency"] for r in rows if "latency" in r),
                "wer_by_dataset": {r["dataset"]: r["wer"] for r in rows}}

    def _chooses(self, record: dict) -> bool:
        """Whether a record's set chooses final/: the dev sets, else the test sets. Real recordings only report
        (choosing on them would tune on them)."""
        return record_role(record) == self.chosen_role

    def best_checkpoint(self, ckpt_root: Path) -> Path | None:
        """The existing checkpoint with the lowest mean WER over the sets that choose (see `_chooses`); the
        newest when there are none."""
        by_step: dict[int, list[dict]] = {}
        for r in self.records():
            if r["model"].startswith("step-"):
                by_step.setdefault(r["step"], []).extend([r] if self._chooses(r) else [])
        ranked = sorted(by_step, key=lambda s: (_mean(by_step[s], "wer"), -s))
        for step in ranked:
            path = ckpt_root / f"step-{step:06d}"
            if path.is_dir():
                return path
        return None

    def redraw(self) -> None:
        records = with_paired_teacher(self.records())
        (self.out / "checkpoints.md").write_text(markdown_table(records))
        if self.long_sets:
            (self.out / "longform.md").write_text(longform_table(read_jsonl(self.long_file)))
        plot_wer_vs_latency(records, {"teacher"}, self.out / "checkpoints.png")

    def finalize(self, ckpt_root: Path) -> Path | None:
        """Copy the best checkpoint's student to RUN/final and log the table."""
        best = self.best_checkpoint(ckpt_root)
        if best is None:
            return None
        final = self.run_dir / "final"
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best / "hf", tmp)
        chosen_on = [label for label, role in self.roles.items() if role == self.chosen_role]
        caveat = "" if self.chosen_role == "dev" else "; no data.dev set, so the test sets chose it"
        (tmp / "SOURCE").write_text(f"{best.name} (lowest WER on {', '.join(chosen_on)}{caveat})\n" if chosen_on
                                    else f"{best.name} (the newest: real recordings are not used to choose)\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log_to_wandb(self.records())
        return final


def _eval_role(ref: str) -> str:
    return "real" if is_real(ref) else "test"


def record_role(record: dict) -> str:
    """dev, test or real; records written before roles existed carry only `real_speech`."""
    return record.get("role") or ("real" if record.get("real_speech") else "test")


def with_paired_teacher(records: list[dict]) -> list[dict]:
    """Records with ratios, and the teacher's latency the median of its timings paired with the students (a solo
    timing in records written before the teacher was timed only in pairs is replaced): the table and the plot then
    agree with the ratio column."""
    records = [dict(r) for r in records]
    add_ratios(records, {r["model"]: "teacher" for r in records})
    for teacher in (r for r in records if r["model"] == "teacher"):
        paired = [r["paired_teacher_latency"] for r in records
                  if r["dataset"] == teacher["dataset"] and "paired_teacher_latency" in r]
        if paired:
            teacher["latency"] = {key: statistics.median(p[key] for p in paired) if isinstance(value, (int, float))
                                  else value for key, value in paired[0].items()}
            teacher["latency"]["paired_timings"] = len(paired)
    return records


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("inf")
