"""`asr data real`: Debian's real Italian and Russian prompts as 16 kHz audiofolders, for evaluation only."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from asr.data.real import BLIND_TEST, build_real, read_transcripts, real_source
from asr.errors import AsrError


def asr(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def real_it(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "real-it"
    proc = asr("data", "real", "--lang", "it", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout


def test_real_italian_builds_every_kept_prompt_at_16_khz(real_it):
    out, stdout = real_it
    rows = list(csv.DictReader(open(out / "metadata.csv", encoding="utf-8")))
    summary = json.loads((out / "real.json").read_text())
    # 599 prompts in the transcript file: 274 under 3 words, 16 bracketed sound notes, 2 without a wav
    assert len(rows) == summary["clips"] == 307 and summary["skipped"] == {
        "under 3 words": 274, "bracketed note": 16, "no audio file": 2}
    assert summary["source_rate"] == 8000 and 19 < summary["minutes"] < 21
    assert [r["file_name"] for r in rows] == sorted(r["file_name"] for r in rows)
    assert all(len(r["transcription"].split()) >= 3 and "[" not in r["transcription"] for r in rows)
    first = rows[0]
    assert first["file_name"] == "audio/agent-alreadyon.wav" and first["language"] == "it"
    assert first["transcription"].startswith("Quell'operatore è già loggato.")
    audio, rate = sf.read(out / first["file_name"])
    assert rate == 16_000 and audio.ndim == 1 and abs(len(audio) / rate - float(first["duration"])) < 1e-3
    assert 0.05 < abs(audio).max() <= 1.0
    assert "real it: 307 clips" in stdout


def test_real_russian_transcripts_drop_the_repeated_name():
    texts = read_transcripts(Path(real_source("ru")["transcripts"]))
    assert texts["conf-adminmenu"].startswith("Нажмите 1 чтобы отключить")
    assert texts["activated"] == "Активировано"


@pytest.mark.parametrize("language", sorted(BLIND_TEST) + ["de"])
def test_blind_test_and_unknown_languages_are_refused(language, tmp_path):
    proc = asr("data", "real", "--lang", language, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "choose one of it, ru" in proc.stderr
    assert ("blind test" in proc.stderr) == (language in BLIND_TEST)
    assert not (tmp_path / "x").exists()


def test_real_recordings_are_refused_for_training_and_labels(real_it, tmp_path):
    out, _ = real_it
    trained = asr("validate", "quickstart", f"data.train=[{out}]")
    assert trained.returncode == 2 and trained.stderr.strip() == (
        f"error: {out}: real recordings (made by `asr data real`) are for evaluation only; do not use them for "
        "training (data.train): put them in data.eval or data.real_eval")
    labelled = asr("pseudo-label", "--teacher", "whisper-tiny.en", "--data", str(out), "--out", str(tmp_path / "p"))
    assert labelled.returncode == 2 and "for evaluation only; do not use them for pseudo-labels" in labelled.stderr
    assert not (tmp_path / "p").exists()
    with pytest.raises(AsrError, match="not written by `asr data real`"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep")
        build_real("it", tmp_path / "mine", progress=False)


def test_whisper_base_transcribes_real_italian(real_it, tmp_path):
    """A handful of real clips through `asr bench`: the multilingual teacher gets most words of a real voice."""
    out, _ = real_it
    proc = asr("bench", "--model", "whisper-base", "--data", str(out), "--limit", "6", "--out", str(tmp_path / "b"),
               "--latency-clips", "1", "--warmup", "0", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [record] = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert record["n"] == 6 and record["dataset"] == "real-it" and set(record["per_language"]) == {"it"}
    assert record["wer"] < 0.45 and record["repetition_rate"] == 0.0


def test_a_run_reports_real_speech_apart_and_never_chooses_on_it(tmp_path, micro_teacher, micro_multilingual_teacher,
                                                                  speech_folder):
    """data.real_eval: real Italian at every checkpoint, its own column; final/ chosen on the dev set (untimed)."""
    import yaml

    dev = tmp_path / "dev-set"
    shutil.copytree(speech_folder, dev)
    recipe = {"name": "real", "teacher": str(micro_multilingual_teacher), "prune": {"keep": [0, 3]},
              "data": {"train": [str(speech_folder)], "eval": [str(speech_folder)], "real_eval": ["it"],
                       "dev": [str(dev)]},
              "objective": {"method": "ce"}, "optim": {"lr": 1e-3},
              "train": {"max_steps": 2, "batch_size": 2, "save_every": 1, "nproc": 2, "keep_last": 5},
              "eval": {"limit": 2, "batch_size": 2, "max_new_tokens": 4, "latency_clips": 1, "warmup": 0},
              "tracking": {"wandb": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for command, extra in {"validate": [], "run": ["--run-dir", str(tmp_path / "en")]}.items():
        english = asr(command, str(tmp_path / "r.yaml"), f"teacher={micro_teacher}", *extra)
        assert english.returncode == 2 and english.stderr.startswith(
            f"error: data.real_eval: {micro_teacher} does not transcribe it (English-only or without that language)")
    assert not (tmp_path / "en").exists()  # refused before the run directory or any data
    run = tmp_path / "run"
    proc = asr("run", str(tmp_path / "r.yaml"), "--run-dir", str(run), timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    assert stored["data"]["eval"][-1].endswith("real/real-it") and stored["data"]["real_eval"] == []
    bench = [json.loads(line) for line in (run / "bench" / "checkpoints.jsonl").read_text().splitlines()]
    assert [(r["model"], r["dataset"], r["role"], "latency" in r) for r in bench if r["model"] == "step-2"] == [
        ("step-2", "dev-set", "dev", False), ("step-2", speech_folder.name, "test", True),
        ("step-2", "real-it", "real", False)]  # latency is the model's: timed on the first test set alone
    report = (run / "report.md").read_text()
    assert (f"| model | {speech_folder.name} (test) WER | real-it (real recordings) WER | dev-set (dev, chooses final) "
            "WER |") in report
    assert "Teacher latency: the median of its 3 timings paired clip by clip" in report
    assert (run / "final" / "SOURCE").read_text().strip().endswith("(lowest WER on dev-set)")
    shared = asr("validate", str(tmp_path / "r.yaml"), f"data.dev=[{speech_folder}]")
    assert shared.returncode == 2 and shared.stderr.startswith(
        f"error: data.dev and data.eval share {speech_folder}: a set that chooses final/ cannot also report")
