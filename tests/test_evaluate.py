"""The per-checkpoint bench sharded over the ranks: each holds its stride of the eval clips, rank 0 gathers the
rows, a world of two writes what a world of one does, and the run's live teacher is benched, not loaded again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from asr.bench.longform import run_long_form_bench
from asr.bench.run import BenchOptions, load_eval_samples, run_bench, unstride
from asr.config import load_recipe
from asr.models.loading import load_whisper
from asr.models.prune import prune_to_directory
from asr.train import evaluate
from test_train import FAST_EVAL, asr_run, write_recipe


def bench_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "bench" / "checkpoints.jsonl").read_text().splitlines()]


def clip_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_rank_keeps_its_stride_of_the_clips_and_every_reference(speech_folder):
    whole = load_eval_samples(str(speech_folder), 5, timed=2)
    shards = [load_eval_samples(str(speech_folder), 5, timed=2, rank=rank, world=2) for rank in (0, 1)]
    assert [len(s.samples) for s in shards] == [3, 2]
    assert [s.id for s in unstride([s.samples for s in shards])] == [s.id for s in whole.samples]
    assert len(whole.references) == 5 and all(s.references == whole.references for s in shards)  # the token cap's
    assert [s.id for s in shards[0].timed] == [s.id for s in whole.samples[:2]] and shards[1].timed == []


def test_the_live_teacher_is_benched_and_a_trained_encoder_drops_the_old_states(tmp_path, speech_folder,
                                                                                 micro_teacher, world_of_one,
                                                                                 monkeypatch):
    """The teacher object the run holds is the bench's teacher (only students are loaded), and the encoder-state
    memo holds one encoder's states: a checkpoint whose encoder trained replaces them instead of adding to them."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder,
                                      eval={**FAST_EVAL, "limit": 3}))
    run = tmp_path / "run"
    prune_to_directory(str(micro_teacher), run / "student", [0, 3])
    trained = shutil.copytree(run / "student", tmp_path / "trained")  # a checkpoint whose encoder trained
    student = load_whisper(str(trained))
    student.model.encoder.layers[0].fc1.weight.data.mul_(1.5)
    student.save_pretrained(trained)
    loaded, load = [], evaluate.load_whisper
    monkeypatch.setattr(evaluate, "load_whisper", lambda ref: loaded.append(ref) or load(ref))
    teacher = load_whisper(str(micro_teacher))
    bench = evaluate.CheckpointBench(run, recipe, world_of_one, teacher)
    bench.baselines()
    bench.checkpoint(run / "student", 2)
    bench.checkpoint(trained, 4)
    assert loaded == [str(run / "student")] * 2 + [str(trained)]
    assert bench._teacher()[0].model is teacher
    rows = bench_records(run)
    assert [(r["model"], r["n"], r["clips_per_rank"], r["encoder_states_per_rank"]) for r in rows] == [
        ("teacher", 3, [3], [3]), ("pruned-untrained", 3, [3], [3]), ("step-2", 3, [3], [3]), ("step-4", 3, [3], [3])]


@pytest.mark.slow  # two runs (85 s); every fast-tier 2-process run benches sharded
def test_a_two_process_bench_equals_a_one_process_bench_of_the_same_models(tmp_path, speech_folder, micro_teacher):
    """2 ranks split 5 clips 3/2 (each memoizes only its own encoder states); the gathered rows, in dataset order,
    and the figures equal `asr bench`'s on one process. The longest reference is on rank 1, so a token cap taken
    from a rank's own clips would cut rank 0's hypotheses elsewhere. A long-form set is split the same way."""
    eval_ = {**FAST_EVAL, "limit": 5}
    long_eval = {"sets": [str(speech_folder)], "algorithms": ["sequential"], "limit": 3}
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder, eval=eval_,
                          train={"max_steps": 2}, tracking={"wandb": False}, data={"long_eval": long_eval})
    run = tmp_path / "run"
    asr_run(recipe, run)
    rows = bench_records(run)
    assert [(r["model"], r["n"], r["clips_per_rank"], r["encoder_states_per_rank"]) for r in rows] == [
        (model, 5, [3, 2], [3, 2]) for model in ("teacher", "pruned-untrained", "step-2")]
    checkpoint = run / "checkpoints" / "step-000002" / "hf"
    one = run_bench([str(micro_teacher), str(checkpoint)], [str(speech_folder)], tmp_path / "one",
                    BenchOptions(threads=1, **eval_))
    dataset = rows[0]["dataset"]
    for sharded, single in (("teacher", "micro-teacher"), ("step-2", "hf")):
        ours = clip_rows(run / "bench" / f"clips-{sharded}-{dataset}.jsonl")
        assert ours == clip_rows(tmp_path / "one" / f"clips-{single}-{dataset}.jsonl")
        assert len(ours) == 5
        a = next(r for r in rows if r["model"] == sharded)
        b = next(r for r in one if r["model"] == single)
        for key in ("n", "wer", "cer", "substitutions", "deletions", "insertions", "repetition_rate", "capped_rate",
                    "per_language", "max_new_tokens"):
            assert a[key] == b[key], (sharded, key)
    long_rows = [json.loads(line) for line in (run / "bench" / "longform.jsonl").read_text().splitlines()]
    assert [(r["model"], r["n"], r["files_per_rank"]) for r in long_rows] == [
        (model, 3, [2, 1]) for model in ("teacher", "pruned-untrained", "step-2")]
    one_long = run_long_form_bench([str(checkpoint)], [str(speech_folder)], tmp_path / "one-long",
                                   BenchOptions(threads=1, long_form=["sequential"], **{**eval_, "limit": 3}))
    assert clip_rows(run / "bench" / f"clips-step-2-{dataset}-sequential.jsonl") == clip_rows(
        tmp_path / "one-long" / f"clips-hf-{dataset}-sequential.jsonl")
    assert long_rows[-1]["wer"] == one_long[0]["wer"] and long_rows[-1]["audio_seconds"] == one_long[0]["audio_seconds"]
