"""Pruning: layer selection, exact copies of kept layers, renumbered alignment heads, any Whisper size."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from asr.bench.physics import predicted_decoder_ratio
from asr.errors import AsrError
from asr.models.loading import load_whisper
from asr.models.prune import prune_whisper, renumber_alignment_heads, select_layers


@pytest.mark.parametrize("n, k, strategy, expected", [
    (32, 4, "spaced", [0, 10, 21, 31]), (32, 2, "spaced", [0, 31]), (6, 2, "spaced", [0, 5]),
    (4, 1, "spaced", [0]), (6, 2, "first", [0, 1]), (6, 6, "spaced", [0, 1, 2, 3, 4, 5]),
])
def test_select_layers(n, k, strategy, expected):
    assert select_layers(n, k, strategy) == expected


def test_select_layers_rejects_impossible_counts():
    with pytest.raises(AsrError, match="cannot keep 7 of 6"):
        select_layers(6, 7)
    with pytest.raises(AsrError, match="unknown pruning strategy"):
        select_layers(6, 2, "random")


def test_alignment_heads_are_renumbered_for_kept_layers():
    heads = [[2, 0], [3, 1], [5, 4], [5, 6]]
    assert renumber_alignment_heads(heads, [0, 5]) == [[1, 4], [1, 6]]
    assert renumber_alignment_heads(heads, [0, 3]) == [[1, 1]]


@pytest.mark.parametrize("keep", [[0, 31], [0, 10, 21, 31]])
def test_large_v3_shapes_prune(keep):
    """large-v3's structure (32+32 layers, 128 mel bins, 51866 tokens) with tiny widths: 32→4 and 32→2."""
    config = WhisperConfig(vocab_size=51866, num_mel_bins=128, d_model=32, encoder_layers=32, decoder_layers=32,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=448)
    teacher = WhisperForConditionalGeneration(config).eval()
    teacher.generation_config.alignment_heads = [[31, 0], [10, 1], [7, 1]]
    student = prune_whisper(teacher, keep)
    assert student.config.decoder_layers == len(keep) and student.config.encoder_layers == 32
    for i, t in enumerate(keep):
        assert torch.equal(student.model.decoder.layers[i].fc1.weight, teacher.model.decoder.layers[t].fc1.weight)
    assert student.generation_config.alignment_heads == renumber_alignment_heads([[31, 0], [10, 1], [7, 1]], keep)
    assert student.proj_out.weight.data_ptr() == student.model.decoder.embed_tokens.weight.data_ptr()
    big = WhisperConfig(vocab_size=51866, d_model=1280, decoder_ffn_dim=5120, decoder_layers=32)
    small = WhisperConfig(vocab_size=51866, d_model=1280, decoder_ffn_dim=5120, decoder_layers=len(keep))
    assert predicted_decoder_ratio(small, big) == pytest.approx({2: 0.140, 4: 0.198}[len(keep)], abs=0.002)


def test_prune_cli_writes_a_loadable_student_of_base(tmp_path):
    out = tmp_path / "student"
    proc = subprocess.run([sys.executable, "-m", "asr", "prune", "--model", "whisper-base", "--keep", "0,5",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads((out / "pruning.json").read_text())
    assert report["decoder_keep"] == [0, 5] and report["teacher"] == "whisper-base"
    assert report["teacher_params"] == 72_593_920 and report["student_params"] == 55_781_888
    teacher, student = load_whisper("whisper-base"), load_whisper(str(out))
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.decoder.layers.1.self_attn.q_proj.weight"], t["model.decoder.layers.5.self_attn.q_proj.weight"])
    assert torch.equal(s["model.encoder.layers.5.fc2.weight"], t["model.encoder.layers.5.fc2.weight"])
    assert torch.equal(s["model.decoder.embed_tokens.weight"], t["model.decoder.embed_tokens.weight"])
    assert student.generation_config.alignment_heads == \
        renumber_alignment_heads(teacher.generation_config.alignment_heads, [0, 5])
    assert "kept decoder layers [0, 5] of 6" in proc.stdout


def test_prune_tiny_en_by_count_and_encoder(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "asr", "prune", "--model", "whisper-tiny.en", "--num-layers", "2",
                           "--encoder-keep", "0,1,3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads((out / "pruning.json").read_text())
    assert report["decoder_keep"] == [0, 3] and report["encoder_keep"] == [0, 1, 3]
    student = load_whisper(str(out))
    assert (student.config.decoder_layers, student.config.encoder_layers) == (2, 3)


@pytest.mark.slow  # 24 s
def test_prune_refuses_a_folder_it_did_not_write_and_replaces_its_own(tmp_path):
    """`--out` over a folder of other results used to wipe it; a student pruned there before is replaced."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench.json").write_text("{}")
    prune = [sys.executable, "-m", "asr", "prune", "--model", "whisper-tiny.en", "--keep", "0,3", "--out"]
    proc = subprocess.run(prune + [str(results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {results}: not empty and not written by `asr prune` (no pruning.json); "
                                   "choose a new --out, or remove the folder yourself if you mean to replace it")
    assert (results / "bench.json").read_text() == "{}"
    own = tmp_path / "student"
    for keep in ("0,3", "1,2"):
        proc = subprocess.run(prune[:-3] + ["--keep", keep, "--out", str(own)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-1500:]
    assert json.loads((own / "pruning.json").read_text())["decoder_keep"] == [1, 2]


def test_prune_rejects_bad_layer_lists():
    teacher = WhisperForConditionalGeneration(WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=4,
                                                            encoder_attention_heads=2, decoder_attention_heads=2,
                                                            encoder_ffn_dim=16, decoder_ffn_dim=16, vocab_size=100,
                                                            pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                                            decoder_start_token_id=1))
    with pytest.raises(AsrError, match="within 0..3"):
        prune_whisper(teacher, [0, 4])
    with pytest.raises(AsrError, match="increasing"):
        prune_whisper(teacher, [3, 0])


@pytest.mark.slow  # 20 s; spaced pruning stays fast
def test_importance_pruning_drops_least_important_layers(tmp_path, speech_folder):
    """Greedy KL-based selection on real tiny.en: 4 -> 2 layers in two rounds, the table recorded."""
    out = tmp_path / "imp"
    proc = subprocess.run([sys.executable, "-m", "asr", "prune", "--model", "whisper-tiny.en", "--num-layers", "2",
                           "--strategy", "importance", "--calibration", str(speech_folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "pruning.json").read_text())
    table = report["importance_scores"]
    assert report["strategy"] == "importance" and len(report["decoder_keep"]) == 2
    assert [row["round"] for row in table] == [1, 1, 1, 1, 2, 2, 2]
    first = {row["drop"]: row["kl"] for row in table if row["round"] == 1}
    second = {row["drop"]: row["kl"] for row in table if row["round"] == 2}
    dropped_first = min(first, key=first.get)
    assert dropped_first not in second and dropped_first not in report["decoder_keep"]
    assert sorted(set(first) - {dropped_first, min(second, key=second.get)}) == report["decoder_keep"]
    assert all(v > 0 for v in first.values()) and min(second.values()) >= min(first.values())
