"""WER/CER scoring with Whisper's normalizers, and `asr bench` end to end on real speech."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asr.bench.wer import error_rates, normalize


def test_english_normalizer_maps_spelling_numbers_and_punctuation():
    assert normalize("Mr. Smith paid twenty-five dollars for the colour TV!", "en") == \
        "mister smith paid $25 for the color tv"


def test_basic_normalizer_for_other_languages_keeps_accents():
    assert normalize("Ça va? Très bien, merci!", "fr") == "ça va très bien merci"


def test_error_rates_counts_edits():
    r = error_rates(["the cat sat on the mat", "hello world"], ["the cat sat on mat", "hello big world"])
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (0, 1, 1)
    assert r["wer"] == pytest.approx(2 / 8)
    assert r["reference_words"] == 8 and r["scored"] == 2


def test_error_rates_skips_empty_references():
    r = error_rates(["", "a b"], ["anything", "a c"])
    assert r["scored"] == 1 and r["wer"] == pytest.approx(0.5)


def test_bench_cli_writes_json_table_and_clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    sentences = ["The weather today is cold and windy.", "She bought three apples at the market."]
    for i, text in enumerate(sentences):
        subprocess.run(["flite", "-voice", "rms", "-t", text, "-o", str(folder / f"c{i}.wav")], check=True)
    (folder / "metadata.csv").write_text("file_name,transcription\n" +
                                         "".join(f"c{i}.wav,{t}\n" for i, t in enumerate(sentences)))
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "asr", "bench", "--model", "whisper-tiny.en", "--data", str(folder),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [record] = json.loads((out / "bench.json").read_text())
    assert record["model"] == "whisper-tiny.en" and record["n"] == 2
    assert 0.0 <= record["wer"] <= 0.2  # a clean flite voice: tiny.en gets it nearly right
    assert record["capped_rate"] == 0.0
    assert "| whisper-tiny.en | clips | 2 |" in (out / "bench.md").read_text()
    clips = [json.loads(line) for line in (out / "clips-whisper-tiny.en-clips.jsonl").read_text().splitlines()]
    assert [c["reference"] for c in clips] == sentences and all(c["hyp_norm"] for c in clips)
    assert "| whisper-tiny.en |" in proc.stdout
