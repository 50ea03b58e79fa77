"""The embedded default end to end (slow tier, ~20 min on 2 idle cores): `asr run quickstart` must recover."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asr.bench.run import add_ratios
from asr.config import load_recipe
from asr.recipes import builtin_recipes


@pytest.mark.slow
def test_quickstart_recovers_most_of_the_gap_and_decodes_faster(tmp_path):
    run = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "asr", "run", "quickstart", "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = [json.loads(line) for line in (run / "bench" / "checkpoints.jsonl").read_text().splitlines()]
    add_ratios(rows, {r["model"]: "teacher" for r in rows})
    by_model = {r["model"]: r for r in rows if r["role"] == "test"}  # the synthetic test set; dev and real apart
    last = f"step-{load_recipe(builtin_recipes()['quickstart']).train.max_steps}"
    teacher, untrained, final = by_model["teacher"], by_model["pruned-untrained"], by_model[last]
    assert teacher["wer"] < 0.25 and untrained["wer"] > 1.0  # the two ends: a good teacher, a looping student
    assert final["wer"] < teacher["wer"] + 0.5 * (untrained["wer"] - teacher["wer"])  # at least half the gap
    assert final["wer"] < 0.6 and final["repetition_rate"] < 0.1
    # 3 of 6 decoder layers: 0.77x the teacher's weights per token; timed next to the teacher, under 0.9x
    assert final["predicted_decoder_ratio"] == pytest.approx(0.77, abs=0.01)
    assert final["measured_decoder_ratio"] < 0.9
    assert f"| {last} |" in proc.stdout and (run / "final" / "model.safetensors").is_file()
