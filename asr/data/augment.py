"""Acoustic augmentation for synthetic train clips (noise, speed, pitch, reverb, telephone band and codecs)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

from asr.errors import AsrError

NOISE_COLORS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f**exponent


def colored_noise(num_samples: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """White, pink or brown Gaussian noise with unit variance, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples)
    freqs[0] = freqs[1] if num_samples > 1 else 1.0
    spectrum *= freqs ** (-NOISE_COLORS[color] / 2)
    noise = np.fft.irfft(spectrum, n=num_samples)
    noise -= noise.mean()
    return (noise / (noise.std() + 1e-12)).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """Mix in colored noise so the whole clip has the requested signal-to-noise ratio."""
    noise = torch.from_numpy(colored_noise(len(audio), color, rng))[None]
    mixed = AF.add_noise(torch.from_numpy(audio)[None], noise, torch.tensor([float(snr_db)]))
    return mixed[0].numpy()


def change_speed(audio: np.ndarray, sample_rate: int, factor: float) -> np.ndarray:
    """Play faster (factor > 1) or slower, tempo and pitch together (like sox `speed`)."""
    factor = round(factor, 2)  # AF.speed resamples by factor*rate/rate: keep the ratio's gcd large
    out, _ = AF.speed(torch.from_numpy(audio)[None], sample_rate, factor)
    return out[0].numpy()


def shift_pitch(audio: np.ndarray, sample_rate: int, semitones: float) -> np.ndarray:
    """Shift pitch keeping duration: phase-vocoder stretch, then resample on a 100 Hz grid.

    AF.pitch_shift resamples between rates whose gcd is often 1, which builds a kernel of ~1 GB at 16 kHz.
    """
    stretched_rate = int(round(sample_rate * 2 ** (semitones / 12) / 100) * 100)
    ratio = stretched_rate / sample_rate  # >1 for an upward shift: stretch longer, then play back faster
    n_fft, hop = 512, 128
    window = torch.hann_window(n_fft)
    spec = torch.stft(torch.from_numpy(audio), n_fft, hop, window=window, return_complex=True)
    phase_advance = torch.linspace(0, np.pi * hop, spec.shape[-2])[..., None]
    stretched = AF.phase_vocoder(spec, 1.0 / ratio, phase_advance)
    wave = torch.istft(stretched, n_fft, hop, window=window, length=int(round(len(audio) * ratio)))
    out = AF.resample(wave, stretched_rate, sample_rate)
    return out[: len(audio)].numpy()


def _ffmpeg(args: list[str], data: bytes, what: str) -> bytes:
    """One quiet FFmpeg call from stdin to stdout."""
    if shutil.which("ffmpeg") is None:
        raise AsrError(f"{what} needs ffmpeg; run: sudo apt-get install ffmpeg")
    quiet = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin"]
    return subprocess.run([*quiet, *args], input=data, capture_output=True, check=True).stdout


def _float_pcm(raw: bytes, num_samples: int) -> np.ndarray:
    """FFmpeg's f32le output, zero-padded or cut to `num_samples` (filters and codecs shift the length slightly)."""
    out = np.frombuffer(raw, dtype="<f4")
    return np.pad(out, (0, max(0, num_samples - len(out))))[:num_samples].copy()


def reshape_voice(audio: np.ndarray, sample_rate: int, pitch: float = 1.0, formant: float = 1.0) -> np.ndarray:
    """Another speaker from one voice, duration kept: pitch scales the fundamental, formant the spectral envelope
    (a shorter vocal tract: ~1.15-1.2 from a man's to a woman's). FFmpeg's rubberband: a formant-shifting pass
    by `formant`, then a formant-preserving pass that brings the fundamental to `pitch`. That pass costs clarity:
    whisper-base read 20 clips of the festival Russian voice at 25% WER, with both x1.3 (one pass) at 27%, with
    pitch x1.5 and formants x1.1 at 49% through rubberband's default window and 39% through its short one."""
    stages = [f"rubberband=pitch={formant:.4f}:pitchq=quality"] if formant != 1.0 else []
    if pitch != formant:
        stages.append(f"rubberband=pitch={pitch / formant:.4f}:formant=preserved:window=short:pitchq=quality")
    if not stages:
        return audio
    raw = ["-f", "f32le", "-ar", str(sample_rate), "-ac", "1"]
    out = _ffmpeg([*raw, "-i", "pipe:0", "-af", ",".join(stages), *raw, "pipe:1"], audio.astype("<f4").tobytes(),
                  "a voice's pitch/formant shift")
    return _float_pcm(out, len(audio))


CODECS = {"mulaw": ("pcm_mulaw", "mulaw"), "alaw": ("pcm_alaw", "alaw"), "gsm": ("libgsm", "gsm")}  # G.711 x2, GSM 06.10


def codec_round_trip(narrow: np.ndarray, codec: str) -> np.ndarray:
    """Encode 8 kHz audio with a telephone codec and decode it again, both through FFmpeg."""
    encoder, fmt = CODECS[codec]
    raw = ["-f", "f32le", "-ar", "8000", "-ac", "1"]
    what = "the telephone augmentation"
    coded = _ffmpeg([*raw, "-i", "pipe:0", "-c:a", encoder, "-f", fmt, "pipe:1"], narrow.astype("<f4").tobytes(), what)
    decoded = _ffmpeg(["-f", fmt, "-ar", "8000", "-ac", "1", "-i", "pipe:0", *raw, "pipe:1"], coded, what)
    return _float_pcm(decoded, len(narrow))


def telephone(audio: np.ndarray, sample_rate: int, codec: str = "mulaw") -> np.ndarray:
    """Narrow-band telephone channel: 300-3400 Hz band-pass, 8 kHz, a codec round trip, back to sample_rate."""
    wave = torch.from_numpy(audio)
    for _ in range(2):  # two biquads per edge for a steeper skirt
        wave = AF.highpass_biquad(wave, sample_rate, 300.0)
        wave = AF.lowpass_biquad(wave, sample_rate, 3400.0)
    narrow = AF.resample(wave, sample_rate, 8000).clamp(-1, 1).numpy()
    coded = torch.from_numpy(codec_round_trip(narrow, codec))
    return AF.resample(coded, 8000, sample_rate)[: len(audio)].numpy()


def reverb(audio: np.ndarray, sample_rate: int, rt60_s: float, wet: float, rng: np.random.Generator) -> np.ndarray:
    """Room reverberation: convolve with a synthetic impulse response (noise decaying 60 dB in rt60_s)."""
    n = max(2, int(rt60_s * sample_rate))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # ln(1000): amplitude -60 dB at rt60
    tail[0] = 0.0
    tail *= np.sqrt(wet / (1.0 - wet + 1e-9) / (np.sum(tail**2) + 1e-12))  # wet/dry energy ratio
    impulse = tail.astype(np.float32)
    impulse[0] = 1.0  # direct path
    tail_keep = int(0.25 * sample_rate)
    out = AF.fftconvolve(torch.from_numpy(audio), torch.from_numpy(impulse))
    return out[: len(audio) + tail_keep].numpy()


EFFECTS = ("speed", "pitch", "reverb", "noise", "telephone")  # applied in this order


def random_augment(audio: np.ndarray, sample_rate: int, rng: np.random.Generator,
                   policy: dict[str, Any]) -> tuple[np.ndarray, str, float]:
    """Apply a random chain of effects drawn from `policy` (the yaml `augment` block); returns the audio,
    a description such as `speed=0.94 reverb=0.41s noise=pink@12.3dB`, and the factor by which times within
    the clip moved (1 / speed), so timestamps can follow."""
    done: list[str] = []
    time_scale = 1.0
    picked = {name for name in EFFECTS if policy.get(name) and rng.random() < policy[name].get("p", 0.0)}
    if not picked and policy.get("noise"):
        picked = {"noise"}  # an augmented clip gets at least one effect
    if "speed" in picked:
        factor = round(float(rng.uniform(*policy["speed"]["factor"])), 2)
        audio = change_speed(audio, sample_rate, factor)
        done.append(f"speed={factor:.2f}")
        time_scale = 1.0 / factor
    if "pitch" in picked:
        semitones = float(rng.uniform(*policy["pitch"]["semitones"]))
        audio = shift_pitch(audio, sample_rate, semitones)
        done.append(f"pitch={semitones:+.2f}st")
    if "reverb" in picked:
        rt60, wet = float(rng.uniform(*policy["reverb"]["rt60_s"])), float(rng.uniform(*policy["reverb"]["wet"]))
        audio = reverb(audio, sample_rate, rt60, wet, rng)
        done.append(f"reverb={rt60:.2f}s/{wet:.2f}")
    if "noise" in picked:
        color = str(rng.choice(policy["noise"]["colors"]))
        snr = float(rng.uniform(*policy["noise"]["snr_db"]))
        audio = add_noise(audio, snr, color, rng)
        done.append(f"noise={color}@{snr:.1f}dB")
    if "telephone" in picked:
        codec = str(rng.choice(policy["telephone"].get("codecs", ["mulaw"])))
        audio = telephone(audio, sample_rate, codec)
        done.append(f"telephone={codec}")
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0.99:
        audio = audio * (0.95 / peak)
    return audio.astype(np.float32), " ".join(done), time_scale
