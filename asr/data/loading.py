"""Load any audiofolder or hub dataset as clean 16 kHz mono samples; bad samples are skipped and counted.

Audio is decoded here (torchcodec, resampled and downmixed by FFmpeg), not by `datasets`, so that one corrupt
or missing file costs one counted sample instead of a traceback from inside the dataset iterator.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from asr.config import Recipe
from asr.errors import AsrError

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0
MAX_PEAK = 10.0  # float audio beyond ±10 (20 dB over full scale) is mis-scaled, e.g. int16 values stored as float
TEXT_COLUMNS = ("transcription", "text", "sentence", "normalized_text", "transcript")
LANGUAGE_COLUMNS = ("language", "lang", "locale")


@dataclass
class Sample:
    """One decoded clip: 16 kHz mono float32 audio, its transcript and language."""

    id: str
    audio: np.ndarray
    text: str
    language: str
    path: str | None = None  # the audio file it was decoded from (None for in-memory bytes)
    # timed sentences, when the dataset knows them; the last one's end None: the clip cuts it (`asr data synth
    # --windows`), so its text is not in `text`
    segments: list[tuple[float, float | None, str]] | None = None
    # the sentences read before the clip, timed as the window before it, when it was cut from a reading: its prompt
    previous: list[tuple[float, float, str]] | None = None
    features: np.ndarray | None = None  # its log-mel, when computed ahead by a loading worker (audio dropped)


@dataclass
class SkipStats:
    """Samples dropped, by reason, with the first few files named for each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, source: str) -> None:
        self.counts[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < 3:
            names.append(source)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        return "skipped " + ", ".join(f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
                                      for reason, n in self.counts.most_common())


@dataclass(frozen=True)
class DatasetRef:
    """A dataset reference: local audiofolder directory, or hub `name[:config][@split]`; either may end in
    `;language=<code>` for data whose rows do not say their language (Multilingual LibriSpeech has no column)."""

    name: str
    config: str | None = None
    split: str = "train"
    language: str | None = None

    @classmethod
    def parse(cls, ref: str, split: str | None = None) -> "DatasetRef":
        ref, _, query = ref.partition(";")
        key, _, language = query.partition("=")
        if query and (key != "language" or not language.isalpha()):
            raise AsrError(f"{ref};{query}: the only suffix a dataset takes is ;language=<code>, e.g. ;language=de")
        name, _, sp = ref.partition("@")
        name, _, config = name.partition(":") if not Path(name).exists() else (name, "", "")
        return cls(name=name, config=config or None, split=split or sp or ("train" if Path(name).exists() else "test"),
                   language=language or None)

    @property
    def label(self) -> str:
        return Path(self.name).name if Path(self.name).exists() else self.name

    @property
    def is_local(self) -> bool:
        """A directory (or a path meant as one, which check_dataset refuses when missing), not a hub id."""
        return Path(self.name).expanduser().exists() or self.name.startswith(("/", ".", "~"))


def streaming_of(recipe: Recipe) -> bool:
    """data.streaming, or when unset: stream when a training set is a hub dataset, whose every clip's log-mel held
    per rank would not fit (~25 GB for Common Voice English), unless cached teacher targets need the clips in
    memory; local audiofolders are encoded up front, which is what makes small runs fast."""
    if recipe.data.streaming is not None:
        return recipe.data.streaming
    return not recipe.objective.teacher_cache and any(not DatasetRef.parse(ref).is_local for ref in recipe.data.train)


def check_metadata_encoding(folder: Path) -> None:
    """`datasets` reads metadata with pandas and fails deep inside on the first non-UTF-8 byte: name the line."""
    for meta in sorted(folder.rglob("metadata.csv")) + sorted(folder.rglob("metadata.jsonl")):
        raw = meta.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise AsrError(f"{meta}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}); re-save it as UTF-8, "
                           "e.g. `iconv -f latin1 -t utf-8`") from None


def audio_extensions() -> set[str]:
    """The file suffixes `datasets`' audiofolder loads as audio (it fails deep inside on a folder with none)."""
    from datasets.packaged_modules.audiofolder.audiofolder import AudioFolder

    return set(AudioFolder.EXTENSIONS)


def check_dataset(ref: DatasetRef) -> Path | None:
    """The audiofolder directory of `ref` (None for a hub dataset), checked so that a bad one fails before any work."""
    path = Path(ref.name).expanduser()
    if path.exists():
        if not (path / "metadata.csv").is_file() and not (path / "metadata.jsonl").is_file():
            raise AsrError(f"{path}: not an audiofolder (no metadata.csv); build one with `asr data synth` "
                           "or add metadata.csv with file_name,transcription")
        check_metadata_encoding(path)
        extensions = audio_extensions()
        if not any(f.suffix.lower() in extensions for f in path.rglob("*") if f.is_file()):
            raise AsrError(f"{path}: has metadata but no audio files; put the audio its file_name column names beside "
                           "it, or rebuild the set with `asr data synth`")
        return path
    if ref.name.startswith(("/", ".", "~")):
        raise AsrError(f"{ref.name}: no such directory; pass an audiofolder directory or a hub dataset id")
    if hub_offline():
        check_cached(ref)
    return None


def hub_offline() -> bool:
    """Offline as the user set it (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): hub datasets then load from the cache."""
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_cached(ref: DatasetRef) -> None:
    """Offline, a hub dataset loads only from the local datasets cache: refuse one that is not there before any
    work (`datasets` itself decides what its cache holds)."""
    import datasets

    try:
        datasets.load_dataset_builder(ref.name, ref.config)
    except ConnectionError:
        raise AsrError(f"{ref.name}: not a local directory, and not in the datasets cache "
                       f"({datasets.config.HF_DATASETS_CACHE}) while the hub is offline (HF_HUB_OFFLINE/"
                       "HF_DATASETS_OFFLINE); load it once where the hub is reachable, unset those, or pass an "
                       "audiofolder directory") from None


def open_dataset(ref: DatasetRef, streaming: bool = False):
    """A `datasets` dataset with undecoded audio (paths/bytes), from a local audiofolder or the hub."""
    import datasets

    path = check_dataset(ref)
    if path is not None:
        ds = datasets.load_dataset("audiofolder", data_dir=str(path), split="train", streaming=streaming)
    else:
        ds = datasets.load_dataset(ref.name, ref.config, split=ref.split, streaming=streaming)
    audio_columns = [k for k, v in ds.features.items() if isinstance(v, datasets.Audio)]
    if not audio_columns:
        raise AsrError(f"{ref.name}: dataset has no audio column")
    column = audio_columns[0]
    ds = ds.cast_column(column, datasets.Audio(decode=False))
    ds = ds if column == "audio" else ds.rename_column(column, "audio")
    if ref.language:  # the reference's language wins over any column the rows have
        ds = ds.remove_columns([c for c in LANGUAGE_COLUMNS if c in (ds.column_names or ())])
        ds = (ds.map(lambda _: {"language": ref.language}) if isinstance(ds, datasets.IterableDataset)
              else ds.add_column("language", [ref.language] * len(ds)))
    return ds


def rows_say_language(ref: DatasetRef) -> bool | None:
    """Whether each row's language is known (a `;language=` or a language column); None when the hub's dataset
    card does not list its columns. Call it after `check_dataset`, which has checked the folder or the cache."""
    if ref.language:
        return True
    path = Path(ref.name).expanduser()
    if path.exists():
        meta = sorted(path.rglob("metadata.csv")) or sorted(path.rglob("metadata.jsonl"))
        with open(meta[0], encoding="utf-8", newline="") as f:
            columns = json.loads(f.readline()) if meta[0].suffix == ".jsonl" else next(csv.reader(f), [])
    else:
        import datasets

        try:
            columns = datasets.load_dataset_builder(ref.name, ref.config).info.features
        except Exception:  # a script-based or gated dataset: `datasets` raises many kinds, and loading tells later
            return None
        if columns is None:
            return None
    return any(c in columns for c in LANGUAGE_COLUMNS)


def decode_audio(source: str | bytes) -> np.ndarray:
    """Decode any FFmpeg-readable audio to 16 kHz mono float32 (resampling and downmixing included)."""
    from torchcodec.decoders import AudioDecoder

    decoder = AudioDecoder(source, sample_rate=SAMPLE_RATE, num_channels=1)
    try:
        samples = decoder.get_all_samples()
    except RuntimeError as exc:
        if "No audio frames were decoded" in str(exc):  # a valid container holding zero samples
            return np.zeros(0, dtype=np.float32)
        raise
    return samples.data[0].numpy().astype(np.float32, copy=False)


def _text(row: dict, column: str | None = None) -> str | bytes | None:
    if column is not None:
        if column not in row:
            raise AsrError(f"dataset has no '{column}' column (columns: {', '.join(row)}); for pseudo-labels "
                           "make the dataset with `asr pseudo-label`")
        return row[column]
    for column in TEXT_COLUMNS:
        if column in row:
            return row[column]
    return None


def iter_samples(ds, stats: SkipStats, default_language: str = "en", limit: int | None = None,
                 text_column: str | None = None, max_seconds: float | None = MAX_SECONDS) -> Iterator[Sample]:
    """Yield decodable, non-empty, ≤30 s, in-range samples with text; everything else is counted in `stats`.

    The transcript is the first of TEXT_COLUMNS present, or `text_column` (e.g. 'pseudo_label') when given; its
    sentence times, where the data has them, come from `segments` (`<text_column>_segments`).
    max_seconds None keeps clips of any length (long-form evaluation).
    """
    yielded = 0
    for index, row in enumerate(ds):
        if limit is not None and yielded >= limit:
            return
        audio = row["audio"] or {}
        source = audio.get("path") or f"row {index}"
        text = _text(row, text_column)
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("non-UTF-8 transcript", source)
                continue
        if text is None or not str(text).strip():
            stats.skip("empty transcript", source)
            continue
        data = audio.get("bytes") or audio.get("path")
        if isinstance(data, str) and not Path(data).is_file():
            stats.skip("missing audio file", source)
            continue
        try:
            wave = decode_audio(data)
        except Exception:  # FFmpeg reports every undecodable input as a RuntimeError with C++ context
            stats.skip("undecodable audio", source)
            continue
        if wave.size == 0 or not np.isfinite(wave).all() or float(np.abs(wave).max()) == 0.0:
            stats.skip("empty or silent audio", source)
            continue
        if max_seconds is not None and wave.size > max_seconds * SAMPLE_RATE:
            stats.skip(f"audio over {max_seconds:g} s", source)
            continue
        if float(np.abs(wave).max()) > MAX_PEAK:  # log-mel features of such audio are shifted or overflow to NaN
            stats.skip("audio out of range", source)
            continue
        language = next((str(row[c]) for c in LANGUAGE_COLUMNS if row.get(c)), default_language)
        yielded += 1
        segments = timed_segments(row.get(f"{text_column}_segments" if text_column else "segments"),
                                  str(text).strip(), wave.size / SAMPLE_RATE)  # the times of this transcript
        yield Sample(id=Path(source).name, audio=wave, text=str(text).strip(), language=language,
                     path=data if isinstance(data, str) else None, segments=segments,
                     previous=timed_segments(row.get("previous"), None, 30.0))


def timed_segments(value, text: str | None, duration: float) -> list[tuple[float, float | None, str]] | None:
    """The `segments` column (JSON [[start_s, end_s, text], ...], as `asr data synth` writes it) when it is
    consistent with the transcript and the audio: ordered, inside the clip, and spelling the transcript (`text`
    None: any). The last segment may be open (end null: the clip cuts it), its text then not in the transcript."""
    try:
        segments = [(float(a), None if b is None else float(b), str(t)) for a, b, t in json.loads(value)] \
            if value else None
    except (TypeError, ValueError):
        return None
    if not segments or None in [b for _, b, _ in segments[:-1]]:
        return None
    closed = segments if segments[-1][1] is not None else segments[:-1]
    if text is not None and " ".join(t for _, _, t in closed) != text:
        return None
    edges = [x for a, b, _ in segments for x in (a, b) if x is not None]
    if edges != sorted(edges) or edges[0] < 0 or edges[-1] > duration + 0.05:
        return None
    return segments
