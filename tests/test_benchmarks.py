"""The scripts in benchmarks/ run and print sane figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clips(path: Path, hyps: list[str]) -> Path:
    refs = ["the cat sat", "on the mat", "a dog ran", "far away now"]
    path.write_text("".join(json.dumps({"id": f"c{i}", "ref_norm": r, "hyp_norm": h}) + "\n"
                            for i, (r, h) in enumerate(zip(refs, hyps))))
    return path


def test_paired_wer_reports_the_difference_and_its_interval(tmp_path):
    a = _clips(tmp_path / "a.jsonl", ["the cat sat", "on the mat", "a dog ran", "far away now"])
    b = _clips(tmp_path / "b.jsonl", ["the cat", "on a mat", "a dog ran", ""])  # 1 + 1 + 0 + 3 errors of 12 words
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_wer.py"), str(a), str(b),
                           "--resamples", "2000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["clips"], result["words"], result["wer_a"]) == (4, 12, 0.0)
    assert result["wer_b"] == pytest.approx(100 * 5 / 12) and result["a_minus_b"] == pytest.approx(-100 * 5 / 12)
    low, high = result["ci95"]
    assert -100 <= low <= result["a_minus_b"] <= high <= 0  # every resample has A no worse than B
    other = _clips(tmp_path / "other.jsonl", ["x"] * 3)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired_wer.py"), str(a), str(other)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "hold different clips" in proc.stderr


def test_bf16_encoder_times_three_precisions_and_their_error(micro_teacher, speech_folder, tmp_path):
    out = tmp_path / "bf16.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bf16_encoder.py"), "--model", str(micro_teacher),
                           "--data", str(speech_folder), "--clips", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["clips"] == 3 and "| autocast |" in proc.stdout
    assert all(0 < ms < 10_000 for ms in result["ms_per_clip"].values())
    # bf16 keeps 8 bits of mantissa: its states move, but by about 2^-8 per value, nowhere near their own size
    assert all(1e-4 < err < 0.05 for err in result["relative_l2"].values()), result["relative_l2"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.csv").write_text("file_name,transcription\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bf16_encoder.py"), "--model", str(micro_teacher),
                           "--data", str(empty)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "has metadata but no audio files" in proc.stderr
