"""Benchmark every saved student on the recipe's eval sets (rank 0), keep the table, pick the best.

Each checkpoint's latency is timed clip by clip interleaved with the teacher's, and its decoder ratio is taken
against that paired teacher timing: training runs for hours on a shared machine, so a teacher timing from the
start of the run would not be comparable with a checkpoint timed later under different load."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import torch

from asr.infer.engines import HfEngine
from asr.bench.longform import bench_long_form
from asr.bench.outputs import log_to_wandb, longform_table, markdown_table, plot_wer_vs_latency
from asr.bench.run import BenchOptions, add_ratios, bench_one, interleaved_latency, load_eval_samples
from asr.config import Recipe
from asr.data.real import is_real
from asr.models.loading import load_processor, load_whisper, weights_fingerprint


class CheckpointBench:
    """Appends one record per (checkpoint, eval set) to RUN/bench/checkpoints.jsonl and redraws the table."""

    def __init__(self, run_dir: Path, recipe: Recipe):
        e = recipe.eval
        self.recipe, self.out = recipe, run_dir / "bench"
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = self.out / "checkpoints.jsonl"
        self.opts = BenchOptions(limit=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                 latency_clips=e.latency_clips, warmup=e.warmup)
        real_limit = e.limit if e.real_limit is None else e.real_limit
        refs = [(d, "dev") for d in recipe.data.dev] + [(d, _eval_role(d)) for d in recipe.data.eval]
        self.datasets = [load_eval_samples(d, real_limit if role == "real" else e.limit, recipe.data.fallback_language)
                         for d, role in refs]
        self.roles = {label: role for (_, role), (label, _, _) in zip(refs, self.datasets)}
        # final/ is chosen on the dev sets; without any, on the test sets (never on real recordings)
        self.chosen_role = "dev" if recipe.data.dev else "test"
        long = recipe.data.long_eval
        self.long_sets = [(_eval_role(d), *load_eval_samples(d, long.limit, recipe.data.fallback_language,
                                                              max_seconds=None)) for d in long.sets] if long else []
        self.long_file = self.out / "longform.jsonl"
        self.run_dir = run_dir
        self.memos: dict[tuple[str, str], dict] = {}  # frozen encoder: its states are computed once per clip
        self._teacher_engine: tuple[HfEngine, object] | None = None  # loaded once, timed next to each checkpoint

    def records(self) -> list[dict]:
        return read_jsonl(self.file)

    def _teacher(self) -> tuple[HfEngine, object]:
        if self._teacher_engine is None:
            self._teacher_engine = (HfEngine(load_whisper(self.recipe.teacher), "teacher"),
                                    load_processor(self.recipe.teacher))
        return self._teacher_engine

    def _bench(self, model_dir: str, name: str, step: int | None) -> list[dict]:
        threads = torch.get_num_threads()
        torch.set_num_threads(self.opts.threads)  # the other ranks wait at a barrier meanwhile
        try:
            if name == "teacher":
                engine, processor = self._teacher()
            else:
                engine, processor = HfEngine(load_whisper(model_dir), name), load_processor(model_dir)
            model = engine.model
            encoder = weights_fingerprint(model.model.encoder)
            rows = []
            for label, samples, stats in self.datasets:
                memo = self.memos.setdefault((encoder, label), {})
                record = bench_one(engine, processor, model, label, samples, self.opts, self.out, memo,
                                   latency=False, stats=stats)
                role = self.roles[label]
                record.update(step=step, path=model_dir, role=role, real_speech=role == "real",
                              **({} if role == "dev" else self._latency(engine, processor, samples, label)))
                rows.append(record)
            long_rows = [{**bench_long_form(engine, processor, label, samples, algorithm, self.opts.batch_size,
                                            self.out), "step": step, "path": model_dir,
                          "role": role, "real_speech": role == "real"}
                         for role, label, samples, _ in self.long_sets
                         for algorithm in self.recipe.data.long_eval.algorithms]
        finally:
            torch.set_num_threads(threads)
        for file, written in ((self.file, rows), (self.long_file, long_rows)):
            with open(file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in written)
        self.redraw()
        return rows

    def _latency(self, engine: HfEngine, processor, samples: list, label: str) -> dict:
        """This model's latency, and the teacher's timed alongside it (unless it is the teacher)."""
        if engine.name == "teacher":
            return {"latency": interleaved_latency([(engine, processor)], samples, label, self.opts)[0]}
        teacher, student = interleaved_latency([self._teacher(), (engine, processor)], samples, label, self.opts)
        return {"latency": student, "paired_teacher_latency": teacher}

    def baselines(self) -> None:
        """The teacher and the pruned, untrained student: the two ends of the recovery."""
        done = {r["model"] for r in self.records()}
        if "teacher" not in done:
            self._bench(self.recipe.teacher, "teacher", None)
        if "pruned-untrained" not in done:
            self._bench(str(self.run_dir / "student"), "pruned-untrained", 0)

    def benched(self, step: int) -> bool:
        """Whether the checkpoint of `step` has its records (one saved at preemption is benched after the resume)."""
        return any(r["model"] == f"step-{step}" for r in self.records())

    def checkpoint(self, hf_dir: Path, step: int) -> dict:
        """Bench one checkpoint; means over the sets that choose final/, and the WER of every set by name."""
        rows = self._bench(str(hf_dir), f"step-{step}", step)
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
    """Records with ratios, and the teacher's latency replaced by the median of its timings paired with the students
    (its solo timing, taken once at the start under other load, kept as `solo_latency`): the table and the plot then
    agree with the ratio column."""
    records = [dict(r) for r in records]
    add_ratios(records, {r["model"]: "teacher" for r in records})
    for teacher in (r for r in records if r["model"] == "teacher"):
        paired = [r["paired_teacher_latency"] for r in records
                  if r["dataset"] == teacher["dataset"] and "paired_teacher_latency" in r]
        if paired:
            teacher["solo_latency"] = teacher["latency"]
            teacher["latency"] = {key: statistics.median(p[key] for p in paired) if isinstance(value, (int, float))
                                  else value for key, value in paired[0].items()}
            teacher["latency"]["paired_timings"] = len(paired)
    return records


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("inf")
