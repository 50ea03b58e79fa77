"""Real human recordings for evaluation, built offline from Debian packages (`asr data real`).

Synthetic speech flatters students: a student at 31% WER on the synthetic eval scored 92% on real telephone
prompts. These sets put real speech next to the synthetic one in every run. They are for evaluation only.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import yaml
from tqdm import tqdm

from asr.errors import AsrError
from asr.models.output_dir import check_overwritable

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "data" / "real.yaml"
SAMPLE_RATE = 16_000
MANIFEST = "real.json"
COLUMNS = ["file_name", "transcription", "language", "source", "duration"]
BLIND_TEST = {"en", "fr", "es"}  # Debian's asterisk-core-sounds-en/-fr/-es: the project's blind test, never used


def load_real_config(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise AsrError(f"real-speech definitions {path} not found; run from the repository")
    return yaml.safe_load(path.read_text())


def read_transcripts(path: Path) -> dict[str, str]:
    """`name: text` lines of an asterisk transcript file (comments start with ';'); a text that repeats its own
    name first ("conf-adminmenu: conf-adminmenu: ...") loses the repeat."""
    out = {}
    with gzip.open(path, "rt", encoding="utf-8-sig") as f:
        for line in f:
            name, sep, text = line.strip().partition(":")
            if not sep or not name or name.startswith(";") or " " in name:
                continue
            text = text.strip()
            if text.startswith(f"{name}:"):
                text = text[len(name) + 1:].strip()
            out[name] = text
    return out


def drop_reason(text: str, min_words: int) -> str | None:
    """Why a prompt is not a usable clip (None: kept)."""
    if re.search(r"\[[^\]]*\]", text):
        return "bracketed note"
    if len(text.split()) < min_words:
        return f"under {min_words} words"
    return None


def real_source(language: str, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The definition of a language's real recordings (in `cfg`, default data/real.yaml); the blind-test languages
    and unknown ones are refused."""
    sources = (cfg or load_real_config())["languages"]
    if language in BLIND_TEST:
        raise AsrError(f"real language {language}: Debian's asterisk-core-sounds-{language} is the project's blind test "
                       f"and is never used; choose one of {', '.join(sources)}")
    if language not in sources:
        raise AsrError(f"real language {language}: not defined in data/real.yaml; choose one of {', '.join(sources)}")
    return sources[language]


def is_real(ref: str) -> bool:
    """A folder of real recordings made by `asr data real`: reported apart from synthetic speech, never trained on."""
    return (Path(ref).expanduser() / MANIFEST).is_file()


def refuse_for_training(ref: str, use: str) -> None:
    """Real recordings are for evaluation only: a folder `asr data real` wrote is refused for training or labels."""
    if is_real(ref):
        raise AsrError(f"{ref}: real recordings (made by `asr data real`) are for evaluation only; do not use them "
                       f"for {use}: put them in data.eval or data.real_eval")


def build_real(language: str, out: Path, config_path: str | Path | None = None, progress: bool = True) -> dict:
    """Write the real recordings of `language` as a 16 kHz audiofolder in `out` (file-name order); returns (and
    writes to out/real.json) the summary. A folder this command wrote is rebuilt; any other non-empty one is
    refused."""
    import torchaudio

    started = time.monotonic()
    cfg = load_real_config(config_path)
    src = real_source(language, cfg)
    audio_dir, transcripts = Path(src["audio"]), Path(src["transcripts"])
    if not audio_dir.is_dir() or not transcripts.is_file():
        raise AsrError(f"{audio_dir if not audio_dir.is_dir() else transcripts}: missing; install the Debian packages "
                       f"{' '.join(src['packages'])} (`make setup` does)")
    check_overwritable(out, MANIFEST, "asr data real")
    out.mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(exist_ok=True)
    skipped, rows = Counter(), []
    texts = read_transcripts(transcripts)
    for name in tqdm(sorted(texts), desc=f"real {language}", unit="clip", disable=not progress):
        reason = drop_reason(texts[name], cfg["min_words"])
        wav = audio_dir / f"{name}.wav"
        if reason is None and not wav.is_file():
            reason = "no audio file"
        if reason is not None:
            skipped[reason] += 1
            continue
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
        mono = torch.from_numpy(audio.mean(axis=1))
        if rate != SAMPLE_RATE:
            mono = torchaudio.functional.resample(mono, rate, SAMPLE_RATE)
        file_name = f"audio/{name.replace('/', '-')}.wav"
        sf.write(out / file_name, mono.numpy(), SAMPLE_RATE, subtype="PCM_16")
        rows.append({"file_name": file_name, "transcription": texts[name], "language": language,
                     "source": f"{src['packages'][0]}:{name}", "duration": round(len(mono) / SAMPLE_RATE, 3)})
    rows.sort(key=lambda r: r["file_name"])
    tmp = out / "metadata.csv.part"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "metadata.csv")
    listed = {r["file_name"] for r in rows}
    for path in (out / "audio").iterdir():  # an audiofolder wants every audio file listed
        if f"audio/{path.name}" not in listed:
            path.unlink()
    summary = {"language": language, "speaker": src["speaker"], "licence": src["licence"], "out_dir": str(out),
               "clips": len(rows), "minutes": round(sum(r["duration"] for r in rows) / 60, 1),
               "source_rate": rate if rows else None, "skipped": dict(skipped), "packages": src["packages"]}
    (out / MANIFEST).write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"real {language}: {len(rows)} clips ({summary['minutes']} min, {src['speaker']}, {src['licence']}) -> "
          f"{out}; skipped {sum(skipped.values())} ({', '.join(f'{n} {r}' for r, n in skipped.items()) or 'none'}) "
          f"in {time.monotonic() - started:.0f} s", flush=True)
    return summary
