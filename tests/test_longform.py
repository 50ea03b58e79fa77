"""Long-form audio: `asr data synth --long` files, Whisper's sequential and chunked decoding with timestamps, the
per-checkpoint long-form bench, and exports that keep timestamps (HF `final/`-style directory, CTranslate2)."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from asr.bench.longform import cut_at_pauses, timestamp_checks
from asr.bench.run import load_eval_samples
from asr.cli import main
from asr.config import DataConfig, LongEvalConfig, Recipe, SynthConfig, load_recipe
from asr.data.loading import SAMPLE_RATE, timed_segments
from asr.data.synth import build_corpus, load_synth_config
from asr.data.texts import load_pools
from asr.errors import AsrError
from asr.infer.ct2_engine import Ct2Engine
from asr.infer.wer import error_rates, normalize
from asr.models.export import export_ct2
from asr.models.loading import load_processor
from asr.models.prune import prune_to_directory
from asr.pipeline import check_recipe
from asr.run_report import write_report
from asr.train.evaluate import CheckpointBench

TEACHER = "whisper-tiny.en"
LONG = ["--long", "35,50"]  # seed 4 draws flite:rms (fast TTS) and a 41 s target: two 30 s windows
SEED = 4


def rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def digests(folder: Path) -> dict[str, str]:
    files = sorted((folder / "audio").glob("*.wav")) + [folder / "metadata.csv"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def long_set(tmp_path_factory) -> Path:
    """One long-form test file, built through the CLI."""
    out = tmp_path_factory.mktemp("long") / "set"
    main(["data", "synth", "--out", str(out), "--split", "test", "--num", "1", "--seed", str(SEED),
          "--workers", "1", *LONG])
    return out


def test_long_build_reads_consecutive_sentences_timed_within_its_bounds(long_set, tmp_path):
    [row] = rows(long_set)
    duration = float(row["duration"])
    assert 35.0 <= duration <= 50.0 and row["voice"] == "flite:rms"
    segments = timed_segments(row["segments"], row["transcription"], duration)
    assert segments is not None and len(segments) >= 6  # timed, in order, spelling the transcript, inside the file
    cfg = load_synth_config()
    pool = [s for s, _ in load_pools(cfg["splits"]["test"]["texts"]["en"], Path(cfg["_path"]).parent)]
    first = pool.index(segments[0][2])
    assert [t for _, _, t in segments] == pool[first:first + len(segments)]  # a reading, not a shuffle
    assert json.loads((long_set / "synth.json").read_text())["params"]["long_s"] == [35.0, 50.0]
    build_corpus(tmp_path / "again", "test", num=1, seed=SEED, workers=1, long_s=(35, 50), progress=False)
    assert digests(tmp_path / "again") == digests(long_set)  # same seed, same bytes
    with pytest.raises(AsrError, match="holds a build with"):  # a long build is not resumed as a short one
        build_corpus(tmp_path / "again", "test", num=1, seed=SEED, workers=1, progress=False)
    with pytest.raises(AsrError, match="without sentences per clip"):
        build_corpus(tmp_path / "x", "test", num=1, seed=SEED, long_s=(35, 50), sentences=(2, 3), progress=False)


def test_timestamp_checks():
    reference = [(0.1, 2.0, "a"), (2.6, 5.0, "b"), (5.4, 9.0, "c")]  # longest pause 0.6 s
    assert timestamp_checks([(0.0, 2.2), (2.2, 5.1), (5.1, 8.9)], 9.2, reference)["sane"]
    assert not timestamp_checks([(0.0, 2.2), (2.0, 1.5)], 9.2, reference)["monotonic"]
    assert not timestamp_checks([(0.0, 2.2), (2.2, 9.9)], 9.2, reference)["inside"]
    assert not timestamp_checks([(0.0, 2.2), (2.2, None)], 9.2, reference)["sane"]  # left open
    skipped = timestamp_checks([(0.0, 2.2), (5.0, 9.0)], 9.2, reference)
    assert not skipped["gaps_ok"] and skipped["max_gap_s"] == pytest.approx(2.8)
    assert timestamp_checks([(0.0, 2.2), (5.0, 9.0)], 9.2, None)["gaps_ok"] is None


def test_short_form_cuts_a_long_file_at_its_pauses_into_windows(long_set):
    [sample] = load_eval_samples(str(long_set), None, max_seconds=None).samples
    pieces = cut_at_pauses(sample)
    assert len(pieces) == 2  # 41 s of sentences: two windows
    assert all(len(p.audio) <= 30 * SAMPLE_RATE for p in pieces)
    assert sum(len(p.audio) for p in pieces) == len(sample.audio)  # contiguous, nothing dropped
    assert " ".join(p.text for p in pieces) == sample.text
    cut = len(pieces[0].audio) / SAMPLE_RATE  # inside a pause between two sentences
    assert any(a[1] < cut < b[0] for a, b in zip(sample.segments, sample.segments[1:]))
    with pytest.raises(AsrError, match="short-form needs the file's timed sentences"):
        cut_at_pauses(dataclasses.replace(sample, segments=None))


def test_bench_long_form_both_algorithms(long_set, tmp_path, capsys):
    main(["bench", "--model", TEACHER, "--data", str(long_set), "--long-form", "sequential", "--long-form", "chunked",
          "--long-form", "short-form", "--out", str(tmp_path), "--threads", "2", "--batch-size", "4"])
    records = {r["algorithm"]: r for r in json.loads((tmp_path / "longform.json").read_text())}
    assert set(records) == {"sequential", "chunked", "short-form"}
    short = records.pop("short-form")
    assert short["wer"] < 0.25 and short["sane_rate"] is None  # the same speech as short clips; no timestamps
    for algorithm, r in records.items():
        assert r["n"] == 1 and r["audio_seconds"] > 35 and r["rtfx"] > 0
        assert r["wer"] < 0.25, (algorithm, r["wer"])  # tiny.en reads flite's rms voice at about 10-15%
        assert r["repetition_rate"] == 0.0
        [clip] = [json.loads(line) for line in (tmp_path / f"clips-{TEACHER}-set-{algorithm}.jsonl").open()]
        assert len(clip["segments"]) >= 2 and clip["monotonic"], clip["segments"]
    assert records["sequential"]["sane_rate"] == 1.0  # Whisper's own algorithm keeps its timestamps in the file
    assert "| whisper-tiny.en | set | sequential | 1 |" in (tmp_path / "longform.md").read_text()
    with pytest.raises(SystemExit):
        main(["bench", "--model", TEACHER, "--data", str(long_set), "--long-form", "chunked", "--engine", "ct2",
              "--out", str(tmp_path / "x")])
    assert "Hugging Face engine alone" in capsys.readouterr().err


@pytest.mark.slow  # 33 s; the fast tier keeps sequential and chunked long-form
def test_sequential_fallback_resamples_a_looping_student_and_leaves_a_sure_teacher_alone(long_set, tmp_path):
    """Whisper's temperature fallback in the sequential algorithm (`--long-form sequential-fallback`): windows of
    the teacher pass its checks, so it reads as greedy; an untrained pruned student loops, so its windows are
    decoded again by seeded sampling, the same way on every run."""
    from asr.bench.longform import transcribe_long
    from asr.bench.run import load_engine, load_eval_samples

    samples = load_eval_samples(str(long_set), None, max_seconds=None).samples
    prune_to_directory(TEACHER, tmp_path / "pruned", decoder_keep=[0, 3])

    def texts(model: str, algorithm: str) -> str:
        engine, processor, _ = load_engine(model, "hf", model)
        return transcribe_long(engine, processor, samples, algorithm, batch_size=1)[0].text

    assert texts(TEACHER, "sequential-fallback") == texts(TEACHER, "sequential")
    student = str(tmp_path / "pruned")
    greedy, fallback = texts(student, "sequential"), texts(student, "sequential-fallback")
    assert fallback != greedy and fallback == texts(student, "sequential-fallback")


def test_sequential_independent_prompts_no_window_with_the_text_before_it(long_set):
    """`--long-form sequential-independent`: the same windows, none prompted with <|startofprev|> and the text
    decoded before it, where `sequential` prompts every window after the first."""
    from asr.bench.longform import transcribe_long
    from asr.bench.run import load_engine, load_eval_samples

    samples = load_eval_samples(str(long_set), None, max_seconds=None).samples
    assert len(samples[0].audio) > 30 * 16000  # more than one window
    engine, processor, _ = load_engine(TEACHER, "hf", TEACHER)
    prev = engine.model.generation_config.prev_sot_token_id
    prompted: list[bool] = []
    hook = engine.model.model.decoder.register_forward_pre_hook(
        lambda _, args, kwargs: prompted.append(prev in kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        runs = {}
        for algorithm in ("sequential", "sequential-independent"):
            prompted.clear()
            runs[algorithm] = (transcribe_long(engine, processor, samples, algorithm, batch_size=1)[0], any(prompted))
    finally:
        hook.remove()
    assert runs["sequential"][1] and not runs["sequential-independent"][1]
    assert len(runs["sequential-independent"][0].segments) >= 2 and runs["sequential-independent"][0].text


def test_recipe_long_eval_is_checked():
    data = DataConfig(train=["x"], eval=["y"], long_eval=LongEvalConfig(synth=SynthConfig(split="test", num=2)))
    with pytest.raises(AsrError, match="long_eval.synth.long must be"):
        check_recipe(Recipe(data=data))
    with pytest.raises(AsrError, match="data.synth_eval.long"):
        check_recipe(Recipe(data=DataConfig(train=["x"], synth_eval=SynthConfig(long=[60, 180]))))
    with pytest.raises(AsrError, match="needs sets or synth"):
        check_recipe(Recipe(data=DataConfig(train=["x"], eval=["y"], long_eval=LongEvalConfig())))


def test_checkpoint_bench_reports_long_form_in_its_own_columns(long_set, tmp_path, world_of_one):
    recipe = Recipe(teacher=TEACHER, data=DataConfig(long_eval=LongEvalConfig(sets=[str(long_set)],
                                                                             algorithms=["sequential"])))
    bench = CheckpointBench(tmp_path, recipe, world_of_one)
    bench._bench(TEACHER, "teacher", None)
    [record] = [json.loads(line) for line in (tmp_path / "bench" / "longform.jsonl").open()]
    assert record["model"] == "teacher" and record["algorithm"] == "sequential" and record["wer"] < 0.25
    report = write_report(tmp_path)
    assert "| model | set (test, long-form sequential) WER |" in report
    assert f"| teacher | {100 * record['wer']:.1f}% |" in report and "| teacher | set | sequential | 1 |" in report


def test_exports_keep_long_form_timestamps(long_set, tmp_path):
    """The project's saved student (prune_to_directory writes it as the trainer writes final/; every layer kept, so
    its words can be scored) transcribes the long file through the HF pipeline by path alone, with timestamps; its
    CTranslate2 export does too, in 30 s windows that advance on its predicted timestamps."""
    from transformers import pipeline

    student = tmp_path / "final"
    prune_to_directory(TEACHER, student, decoder_keep=[0, 1, 2, 3])
    [sample] = load_eval_samples(str(long_set), None, max_seconds=None).samples
    out = pipeline("automatic-speech-recognition", model=str(student), chunk_length_s=30, batch_size=2)(
        sample.audio.copy(), return_timestamps=True)
    assert error_rates([normalize(sample.text, "en")], [normalize(out["text"], "en")])["wer"] < 0.25
    stamps = [x for chunk in out["chunks"] for x in chunk["timestamp"]]
    assert len(out["chunks"]) >= 2 and stamps == sorted(stamps)

    engine, processor = Ct2Engine(export_ct2(str(student), tmp_path / "ct2"), "student"), load_processor(str(student))
    segments = engine.transcribe_long(processor, sample.audio, "en")  # 30 s windows generated with timestamps
    assert len(segments) >= 6 and timestamp_checks([s[:2] for s in segments], len(sample.audio) / SAMPLE_RATE,
                                                     sample.segments)["sane"]
    heard = " ".join(text for _, _, text in segments)
    assert error_rates([normalize(sample.text, "en")], [normalize(heard, "en")])["wer"] < 0.25


def test_recipe_long_eval_synth_resolves_to_its_own_cached_set(tmp_path, monkeypatch):
    from asr.data import synth
    from asr.pipeline import resolve_data

    built = {}
    monkeypatch.setenv("ASR_CACHE", str(tmp_path))
    monkeypatch.setattr(synth, "build_corpus", lambda out, **kwargs: built.setdefault(Path(out).name, kwargs))
    recipe = load_recipe("recipes/quickstart.yaml", [
        "data.long_eval={synth: {split: test, num: 2, seed: 1, long: [60, 180]}, algorithms: [chunked]}",
        "data.real_eval=[]"])
    long = resolve_data(recipe).data.long_eval
    name = f"test-n2-s1-en-L60-180-c{synth.corpus_digest(synth.load_synth_config())}"
    assert long.sets == [str(tmp_path / "synth" / name)] and long.synth is None and long.algorithms == ["chunked"]
    assert built[name]["long_s"] == (60.0, 180.0)
