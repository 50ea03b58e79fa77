"""Streaming simulation and speculative decoding on real (flite) speech with whisper-tiny.en."""
from __future__ import annotations

import math
import subprocess

import pytest
import torch

from asr.infer.engines import HfEngine
from asr.bench.speculative import speculative_check
from asr.bench.streaming import buffer_ends, simulate_streaming
from asr.data.loading import SAMPLE_RATE, Sample, decode_audio
from asr.errors import AsrError
from asr.models.loading import load_processor, load_whisper
from asr.models.prune import prune_whisper

SENTENCES = ["We will meet at the station tomorrow morning.", "The weather today is cold and windy.",
             "She bought three apples at the market."]
CHUNK_MS, OVERLAP_MS = 1500, 500  # large chunks keep the test fast; the overlap exercises the step arithmetic


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared CPU two threads contend and a tiny.en update gets several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Sample]:
    folder = tmp_path_factory.mktemp("flite")
    samples = []
    for i, text in enumerate(SENTENCES):
        wav = folder / f"s{i}.wav"
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(wav)], check=True, capture_output=True)
        samples.append(Sample(id=f"s{i}", audio=decode_audio(str(wav)), text=text, language="en"))
    return samples


@pytest.fixture(scope="module")
def teacher():
    return load_whisper("whisper-tiny.en")


@pytest.fixture(scope="module")
def processor():
    return load_processor("whisper-tiny.en")


@pytest.fixture(scope="module")
def engine(teacher):
    return HfEngine(teacher, "whisper-tiny.en")


@pytest.fixture(scope="module")
def streamed(engine, processor, clips) -> dict:
    return simulate_streaming(engine, processor, clips[:2], CHUNK_MS, OVERLAP_MS, max_new_tokens=64)


def test_buffer_ends_cover_the_clip_once_per_step():
    assert buffer_ends(10, 4) == [4, 8, 10]
    assert buffer_ends(8, 4) == [4, 8]
    assert buffer_ends(3, 4) == [3]


def test_streaming_final_hypothesis_is_the_offline_one(streamed):
    assert streamed["final_matches_offline"] == 1.0
    assert streamed["wer"] < 0.2  # a clean flite voice: tiny.en gets it nearly right (so the finals are not empty)


def test_streaming_updates_once_per_step(streamed, clips):
    step_s = (CHUNK_MS - OVERLAP_MS) / 1000
    assert streamed["updates"] == sum(math.ceil(len(c.audio) / SAMPLE_RATE / step_s) for c in clips[:2])
    assert streamed["clips"] == 2 and streamed["step_ms"] == CHUNK_MS - OVERLAP_MS


def test_streaming_latency_figures_are_consistent(streamed, clips):
    s = streamed
    assert 0 < s["chunk_latency_ms_p50"] <= s["chunk_latency_ms_p95"] <= s["chunk_latency_ms_max"]
    assert s["keeps_up"] is (s["chunk_latency_ms_p95"] <= s["step_ms"])
    audio_ms = 1000 * sum(len(c.audio) for c in clips[:2]) / SAMPLE_RATE
    assert s["real_time_factor"] * audio_ms >= s["updates"] * s["chunk_latency_ms_p50"] * 0.5
    assert s["first_text_ms_p50"] >= s["step_ms"]  # no text before the first step of audio has arrived
    assert s["final_lag_ms_p50"] > 0


@pytest.mark.parametrize("chunk_ms, overlap_ms", [(300, 300), (300, 500), (300, -1), (0, 0)])
def test_streaming_rejects_bad_chunking(engine, processor, clips, chunk_ms, overlap_ms):
    with pytest.raises(AsrError, match="0 <= overlap < chunk"):
        simulate_streaming(engine, processor, clips, chunk_ms, overlap_ms)


@pytest.mark.parametrize("assistant_kind", ["pruned decoder", "pruned encoder and decoder", "teacher itself"])
def test_speculative_reproduces_greedy(teacher, processor, clips, assistant_kind):
    if assistant_kind == "teacher itself":
        assistant = teacher
    else:  # untrained students: same vocabulary, poor drafts
        encoder_keep = [0, 3] if assistant_kind == "pruned encoder and decoder" else None
        assistant = prune_whisper(teacher, decoder_keep=[0, 3], encoder_keep=encoder_keep)
    before = teacher.generation_config.to_dict(), assistant.generation_config.to_dict()
    r = speculative_check(teacher, assistant, processor, clips[:2], max_new_tokens=64)
    assert r["n"] == 2 and r["identical"] == 2 and r["mismatched"] == []
    assert r["assistant_encoder"] == ("own" if assistant_kind == "pruned encoder and decoder" else "shared")
    assert r["greedy_ms_p50"] > 0 and r["speculative_ms_p50"] > 0
    assert r["speedup"] == pytest.approx(r["greedy_ms_p50"] / r["speculative_ms_p50"])
    if assistant_kind == "teacher itself":
        assert r["tokens_per_teacher_call"] > 4  # every draft accepted: few verifications per clip
    else:
        assert 1.0 <= r["tokens_per_teacher_call"] < 4
    assert (teacher.generation_config.to_dict(), assistant.generation_config.to_dict()) == before


def test_speculative_rejects_a_different_vocabulary(teacher, processor, clips):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=1000, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=80, max_target_positions=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    other = WhisperForConditionalGeneration(config).eval()
    with pytest.raises(AsrError, match=r"assistant vocabulary \(1000 tokens\) differs from the teacher's \(51864\)"):
        speculative_check(teacher, other, processor, clips[:1])
