"""`asr bench-train` runs its three set-ups through real DeepSpeed training steps and reports sane figures.

A benchmark, not a speed test: the ratios depend on the machine and its load, so only their shape is checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

TEACHER = "whisper-tiny.en"


@pytest.mark.slow  # a benchmark's run (135 s); its training modes are tested in test_train and test_pseudo_label
def test_bench_train_measures_separate_shared_and_cached(speech_folder, tmp_path):
    recipe = {"name": "bt", "teacher": TEACHER, "prune": {"keep": [0, 3]},
              "data": {"train": [str(speech_folder)], "eval": [str(speech_folder)]},
              "objective": {"method": "kd"}, "train": {"batch_size": 2}, "tracking": {"wandb": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "bt"
    proc = subprocess.run([sys.executable, "-m", "asr", "bench-train", str(tmp_path / "r.yaml"), "--steps", "2",
                           "--warmup", "1", "--nproc", "1", "--clips", "4", "--top-k", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "ASR_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((out / "bench-train.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == ["separate", "shared", "live", "once", "cached", "states"] and report["top_k"] == 4
    assert (rows["separate"]["teacher_loaded"], rows["separate"]["shared_encoder"]) == (True, False)
    assert (rows["shared"]["teacher_loaded"], rows["shared"]["shared_encoder"]) == (True, True)
    assert (rows["live"]["teacher_loaded"], rows["live"]["cached_encoder_states"]) == (True, True)
    assert not rows["live"]["teacher_states_cached"] and rows["once"]["teacher_states_cached"]
    assert (rows["once"]["teacher_loaded"], rows["once"]["cached_encoder_states"]) == (True, True)
    assert (rows["cached"]["teacher_loaded"], rows["cached"]["cached_encoder_states"]) == (False, True)
    assert (rows["states"]["teacher_loaded"], rows["states"]["cached_encoder_states"]) == (False, True)
    for r in rows.values():
        assert r["processes"] == 1 and r["steps"] == 2 and r["seconds"] > 0
        assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * 2)  # batch 2 per step, no clip skipped
    assert rows["separate"]["speedup_vs_separate"] == 1.0
    assert 0.2 < rows["cached"]["speedup_vs_separate"] < 50 and 0.2 < rows["states"]["speedup_vs_separate"] < 50
    assert "cached encoder + live teacher / separate (a) samples/s: 1 process(es)" in proc.stdout
    assert "teacher states once per clip in the run / separate (a) samples/s: 1 process(es)" in proc.stdout
    assert "cached top-K (c) / separate (a) samples/s: 1 process(es)" in proc.stdout
    assert "cached states (exact) / separate (a) samples/s: 1 process(es)" in proc.stdout
