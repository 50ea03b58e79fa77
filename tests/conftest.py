"""Shared fixtures: a few real speech clips synthesized offline (espeak-ng and flite, several voices), tiny teachers,
a gloo process group of one."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import torchaudio

from asr.train.engine import Dist

SAMPLE_RATE = 16_000

# (engine, voice, text): different engines and voices so the clips are not one speaker reading.
_CLIP_SCRIPT = [
    ("espeak-ng", "en-us", "The quick brown fox jumps over the lazy dog."),
    ("flite", "slt", "Please call Stella and ask her to bring these things with her from the store."),
    ("espeak-ng", "en-gb-x-rp", "She sells sea shells by the sea shore every summer morning."),
    ("flite", "awb", "We will meet at the station tomorrow before the train leaves."),
    ("espeak-ng", "en-us+f3", "Reading a good book on a rainy afternoon is a simple pleasure."),
    ("flite", "rms", "The weather report says it will be cold and windy this weekend."),
]


@dataclass(frozen=True)
class SpeechClip:
    """One synthesized utterance: what was said, by which voice, as 16 kHz mono float32."""

    text: str
    voice: str
    audio: np.ndarray


def _synthesize(engine: str, voice: str, text: str, wav) -> None:
    if shutil.which(engine) is None:
        pytest.fail(f"{engine} is not installed; run `make apt` (the fast tier needs it for speech clips)")
    if engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice, "-s", "160", "-w", str(wav), text]
    else:
        cmd = ["flite", "-voice", voice, "-t", text, "-o", str(wav)]
    subprocess.run(cmd, check=True, capture_output=True)


def write_metadata(root, rows) -> None:
    """An audiofolder's metadata.csv with (file_name, transcription) rows."""
    import csv

    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription"])
        writer.writerows(rows)


@pytest.fixture
def world_of_one():
    """A real gloo process group of one in this process: the bench gathers through it as under `asr run`."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory) -> list[SpeechClip]:
    """Six real speech clips (2.5-5 s), synthesized once per session and resampled to 16 kHz."""
    folder = tmp_path_factory.mktemp("speech_clips")
    clips = []
    for i, (engine, voice, text) in enumerate(_CLIP_SCRIPT):
        wav = folder / f"{i:02d}_{engine}_{voice}.wav"
        _synthesize(engine, voice, text, wav)
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        mono = torch.from_numpy(audio.mean(axis=1))
        if rate != SAMPLE_RATE:
            mono = torchaudio.functional.resample(mono, rate, SAMPLE_RATE)
        clips.append(SpeechClip(text=text, voice=f"{engine}:{voice}", audio=mono.numpy()))
    return clips


@pytest.fixture(scope="session")
def speech_folder(speech_clips, tmp_path_factory):
    """The speech clips as a Hugging Face audiofolder (16 kHz WAV + metadata.csv)."""
    import csv

    folder = tmp_path_factory.mktemp("speech_folder")
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription", "language"])
        for i, clip in enumerate(speech_clips):
            sf.write(folder / f"clip{i}.wav", clip.audio, SAMPLE_RATE, subtype="PCM_16")
            writer.writerow([f"clip{i}.wav", clip.text, "en"])
    return folder


def _random_whisper(source: str, out, feature_size: int, **dims):
    """A randomly initialised Whisper with `source`'s tokenizer and generation config but other dimensions."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from asr.models.loading import load_processor, load_whisper

    real = load_whisper(source)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**real.config.to_dict(), **dims}))
    model.generation_config = real.generation_config
    model.generation_config.alignment_heads = [[dims["decoder_layers"] - 1, 0], [dims["decoder_layers"] - 1, 1]]
    model.save_pretrained(out)
    load_processor(source).tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=feature_size).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def micro_teacher(tmp_path_factory):
    """A randomly initialised Whisper with tiny.en's tokenizer and vocabulary but tiny widths: fast to train."""
    return _random_whisper("whisper-tiny.en", tmp_path_factory.mktemp("micro") / "micro-teacher", 80,
                           d_model=64, encoder_layers=2, decoder_layers=4, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128)


@pytest.fixture(scope="session")
def scaled_large_v3(tmp_path_factory):
    """whisper-large-v3's structure (32+32 layers, 128 mel bins, multilingual vocabulary) with tiny widths."""
    return _random_whisper("whisper-base", tmp_path_factory.mktemp("scaled") / "whisper-large-v3-scaled", 128,
                           num_mel_bins=128, d_model=32, encoder_layers=32, decoder_layers=32,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64)


@pytest.fixture(scope="session")
def micro_multilingual_teacher(tmp_path_factory):
    """The same tiny widths with whisper-base's multilingual tokenizer and languages."""
    return _random_whisper("whisper-base", tmp_path_factory.mktemp("micro-multi") / "micro-multilingual", 80,
                           d_model=64, encoder_layers=2, decoder_layers=4, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128)
