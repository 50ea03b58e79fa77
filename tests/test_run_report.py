"""The run report: WER per eval set with real recordings apart, and the teacher timed beside its students."""
from __future__ import annotations

import pytest

from asr.run_report import wer_by_set
from asr.train.evaluate import with_paired_teacher


def _record(model: str, dataset: str, wer: float, ms: float, weights: int, real: bool = False, paired=None) -> dict:
    lat = {"decoder_ms_per_token_p50": ms, "encoder_ms_p50": 10 * ms, "clips": 4}
    r = {"model": model, "dataset": dataset, "wer": wer, "latency": lat, "decoder_weights_per_token": weights,
         "real_speech": real}
    if paired is not None:
        r["paired_teacher_latency"] = {"decoder_ms_per_token_p50": paired, "encoder_ms_p50": 10 * paired, "clips": 4}
    return r


def test_teacher_latency_is_the_median_of_its_paired_timings():
    """A solo teacher timing at 485 ms/token drew the teacher 40x right of students timed at ~12 ms beside ~17."""
    records = [_record("teacher", "syn", 0.14, 485.0, 100),
               _record("pruned-untrained", "syn", 5.8, 12.0, 70, paired=16.0),
               _record("step-100", "syn", 0.5, 12.5, 70, paired=17.0),
               _record("step-200", "syn", 0.3, 12.2, 70, paired=18.0)]
    view = with_paired_teacher(records)
    teacher = view[0]
    assert teacher["latency"]["decoder_ms_per_token_p50"] == 17.0 and teacher["latency"]["encoder_ms_p50"] == 170.0
    assert teacher["latency"]["paired_timings"] == 3
    assert view[3]["measured_decoder_ratio"] == pytest.approx(12.2 / 18.0)  # each against its own pairing
    assert view[3]["predicted_decoder_ratio"] == pytest.approx(0.7)
    assert records[0]["latency"]["decoder_ms_per_token_p50"] == 485.0  # the stored records are not changed


def test_wer_by_set_puts_real_recordings_in_their_own_columns():
    records = [_record("teacher", "test-n40", 0.142, 17, 100), _record("teacher", "real-it", 0.186, 17, 100, True),
               _record("step-200", "real-it", 0.40, 12, 70, True), _record("step-200", "test-n40", 0.315, 12, 70)]
    assert wer_by_set(records).splitlines() == [
        "| model | test-n40 (test) WER | real-it (real recordings) WER |", "|---|---|---|",
        "| teacher | 14.2% | 18.6% |", "| step-200 | 31.5% | 40.0% |"]


def test_wer_by_set_puts_the_dev_sets_that_chose_last_and_marks_them():
    dev = dict(_record("step-200", "dev-n20", 0.29, 12, 70), role="dev")
    records = [dev, _record("step-200", "real-it", 0.40, 12, 70, True), _record("step-200", "test-n40", 0.315, 12, 70)]
    assert wer_by_set(records).splitlines()[0] == (
        "| model | test-n40 (test) WER | real-it (real recordings) WER | dev-n20 (dev, chooses final) WER |")
