"""Sentence pools for synthetic speech, built from packaged licence-clean texts and cached on disk."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import yaml

from asr.errors import AsrError

MIN_WORDS, MAX_WORDS = 5, 22
POOL_VERSION = 4  # bump when the filter changes, so cached pools (and the corpora read from them) are rebuilt
_QUESTION_START = re.compile(  # a wh-word, or an auxiliary then a subject ("Do you", not "Do it now")
    r"^(what(?! an? )|who|whom|whose|which|why|where|when|how|(is|are|am|was|were|do|does|did|can|could|"
    r"would|will|should|shall|have|has) (you|i|we|he|she|they)|(is|was|does|did) it)\b", re.IGNORECASE)
_ASCII_SENTENCE = re.compile(r"[A-Za-z][A-Za-z ,.;:?!'-]*")
_UPPER = "A-ZÀ-ÖØ-ÞА-ЯЁ"  # Latin, Latin-1 and Cyrillic capitals: a sentence starts with one
_SENTENCE_END = re.compile(rf"(?:(?<=[.!?])|(?<=[.!?][\"”’»]))\s+(?=[\"“‘«]?[{_UPPER}])")
_LATIN_PUNCT = set(" ,.;:?!'-¿¡")


def cache_dir() -> Path:
    """Where built pools live: $ASR_CACHE/texts (default ~/.cache/asr-distill/texts), next to imported models."""
    return Path(os.environ.get("ASR_CACHE", Path.home() / ".cache" / "asr-distill")) / "texts"


def clean_sentence(text: str, ascii_only: bool = True) -> str | None:
    """Normalize one sentence, or return None if it fails the filter (5-22 words, letters and basic
    punctuation only, no digits, brackets or ALL-CAPS words)."""
    text = re.sub(r"[\"“”‘«»„]", "", text)
    text = re.sub(r"(?<=[A-Za-z])’(?=[A-Za-z])", "'", text).replace("’", "")
    text = re.sub(r"\s+", " ", text).strip(" '-")
    text = re.sub(r"\s+([,.;:?!])", r"\1", text)
    if not text or ".." in text or "--" in text or " - " in text:
        return None
    if ascii_only:
        if not _ASCII_SENTENCE.fullmatch(text):
            return None
    elif not (text[0].isalpha() or text[0] in "¿¡") or not all(ch.isalpha() or ch in _LATIN_PUNCT for ch in text):
        return None
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    if any(sum(ch.isalpha() for ch in w) >= 2 and w.strip(",.;:?!'-¿¡").isupper() for w in words):
        return None
    text = text[0].upper() + text[1:]
    if text[-1] in ",;:":
        text = text[:-1]
    if text[-1] not in ".?!":
        text += "?" if _QUESTION_START.match(text) else "."
    return text


def split_sentences(text: str) -> list[str]:
    """Split running prose at . ! ? followed by a capitalized word (Latin or Cyrillic; quotes removed or not)."""
    text = re.sub(r"\s+", " ", text)
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


def _web_bible() -> Iterable[str]:
    """World English Bible (public domain) from the Debian SWORD module, verse markers and footnotes removed."""
    if shutil.which("diatheke") is None:
        raise AsrError("text source web_bible needs diatheke; run: sudo apt-get install diatheke sword-text-web")
    cmd = ["diatheke", "-b", "engWEB2015eb", "-f", "plain", "-o", "f", "-k", "Gen 1:1-Rev 22:21"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    out = out.split("The following words used in the World English Bible")[0]  # drop the trailing glossary
    if out.count("\n") < 1000:
        raise AsrError("text source web_bible: diatheke returned no Bible text; "
                       "run: sudo apt-get install sword-text-web")
    out = re.sub(r"(?m)^[A-Za-z ()]+ \d+:\d+: ?", " ", out)  # "Genesis 1:1: " verse markers
    out = re.sub(r"\[[^\]]*\]", " ", out)  # footnotes: "[1:1 The Hebrew word ...]"
    out = re.sub(r"\(engWEB2015eb\)", " ", out)
    return split_sentences(out)


def _wordnet() -> Iterable[str]:
    """Quoted usage examples from WordNet 3.0 glosses (Debian wordnet-base, BSD-like licence)."""
    files = sorted(Path("/usr/share/wordnet").glob("data.*"))
    if not files:
        raise AsrError("text source wordnet needs /usr/share/wordnet/data.*; run: sudo apt-get install wordnet-base")
    for path in files:
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            yield from re.findall(r'"([^"]+)"', line.split("|", 1)[1])


def _chatterbot() -> Iterable[str]:
    """English dialogue lines from the chatterbot-corpus wheel (BSD-3)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise AsrError("text source chatterbot needs chatterbot-corpus; run: pip install chatterbot-corpus==1.3.3")
    for path in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        for dialogue in (yaml.safe_load(path.read_text()) or {}).get("conversations") or []:
            yield from (str(turn) for turn in dialogue if isinstance(turn, (str, int, float)))


FORTUNES_DIR = Path("/usr/share/games/fortunes")
_ASCII_ACCENT = re.compile(r"[aeiouAEIOU]'(?![^\W\d_])")  # "perche'" for "perché": an accent written in ASCII
_ASCII_ACCENTED_WORD = re.compile(r"\b\w+'(?![^\W\d_])")
_OPENING_QUOTE = re.compile(r"(?:^|[\s(])'(?=\w)")
_ITALIAN_APOSTROPHES = {"po'", "be'", "mo'", "di'", "de'", "fa'", "va'", "sta'", "to'"}  # "un po'" = "un poco"
_ITALIAN_ACUTE_E = re.compile(r"(?:\w*ch|n|s)e'", re.IGNORECASE)  # perché, finché, né, sé; the rest are grave
_GRAVE = dict(zip("aeiouAEIOU", "àèìòùÀÈÌÒÙ"))
HELD_OUT_PARTS = 10  # `fortunes:<lang>:heldout` is the sentences whose crc32 is 0 mod this; train gets the rest
# English fortunes (Debian `fortunes` and `fortunes-min`) sit in the top directory beside fortunes-it's files, so
# they are named. Left out: pictures (art, ascii-art), code and jargon (computers, debian, linux, linuxcookie,
# perl, knghtbrd), word salad (zippy, translate-me) and the disclaimer.
EN_FORTUNE_FILES = (
    "cookie", "definitions", "drugs", "education", "ethnic", "food", "fortunes", "goedel", "humorists", "kids",
    "law", "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people",
    "pets", "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports", "startrek",
    "tao", "wisdom", "work")


def _fortunes(lang: str) -> Iterable[str]:
    """Sayings and quotations of Debian's fortunes-<lang> (`fortunes` for en; GPL; files under `off/`, the offensive set, are
    left out): entries split on `%` lines, `-- author` attributions dropped, then split into sentences.
    fortunes-it writes accents in ASCII, as an apostrophe after the vowel: those are spelled as Italian writes them
    (`_italian_accents`); in the other languages such sentences are dropped. A student must not learn either
    spelling, nor an Italian without "è", "più" or "perché" (dropping them took 44% of fortunes-it)."""
    if lang == "en":
        files = [p for p in (FORTUNES_DIR / name for name in EN_FORTUNE_FILES) if p.is_file()]
        package = "fortunes fortunes-min"
    else:
        files = sorted(p for p in (FORTUNES_DIR / lang).glob("*")
                       if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
        package = f"fortunes-{lang}"
    if not files:
        raise AsrError(f"text source fortunes:{lang} needs Debian's {package} under {FORTUNES_DIR}; "
                       f"run: sudo apt-get install {package}")
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"\n%\n", text):
            body = re.split(r"(?m)^\s*(?:--|—)", entry)[0]  # the attribution runs to the entry's end
            sentences = split_sentences(body)
            if lang == "it":
                yield from filter(None, map(_italian_accents, sentences))
            else:
                yield from (s for s in sentences if not _ASCII_ACCENT.search(s))


def _italian_accents(sentence: str) -> str | None:
    """ "E' cosi' perche'" -> "È così perché": the grave accent, acute on -ché, né and sé, and the words that do
    end in an apostrophe kept ("un po'"). None when the sentence opens a single quote, whose closing one would
    read as an accent."""
    if _OPENING_QUOTE.search(sentence):
        return None

    def spell(match: re.Match) -> str:
        word = match.group()
        if word.lower() in _ITALIAN_APOSTROPHES or word[-2] not in _GRAVE:
            return word
        return word[:-2] + ("é" if _ITALIAN_ACUTE_E.fullmatch(word) else _GRAVE[word[-2]])

    return _ASCII_ACCENTED_WORD.sub(spell, sentence)


BUILTIN_SOURCES: dict[str, Callable[[], Iterable[str]]] = {
    "web_bible": _web_bible, "wordnet": _wordnet, "chatterbot": _chatterbot}


def _builtin_pool(source: str) -> list[str]:
    """Sentences of a builtin source, or of `fortunes:<lang>[:heldout]` (a fixed ~1/10 held out for tests)."""
    if source in BUILTIN_SOURCES:
        return _dedup(clean_sentence(s) for s in BUILTIN_SOURCES[source]())
    kind, _, rest = source.partition(":")
    lang, _, part = rest.partition(":")
    if kind != "fortunes" or not lang or part not in ("", "heldout"):
        raise AsrError(f"unknown text source {source!r}; use one of {', '.join(BUILTIN_SOURCES)}, "
                       "fortunes:<lang>, fortunes:<lang>:heldout or file:<path>")
    pool = _dedup(clean_sentence(s, ascii_only=False) for s in _fortunes(lang))
    held_out = (part == "heldout")
    return [s for s in pool if (zlib.crc32(s.lower().encode()) % HELD_OUT_PARTS == 0) == held_out]


def load_pool(source: str, base_dir: Path | None = None) -> list[str]:
    """Filtered, deduplicated sentences of one source: a builtin name, or `file:<path>` (one sentence a
    line, relative to base_dir, non-ASCII letters allowed; for the hand-written non-English pools)."""
    if source.startswith("file:"):
        path = Path(base_dir or ".") / source[len("file:"):]
        if not path.is_file():
            raise AsrError(f"text source {source}: {path} does not exist; fix the path in the synthetic yaml")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
        return _dedup(clean_sentence(line, ascii_only=False) for line in lines)
    cached = cache_dir() / f"{source.replace(':', '-')}.v{POOL_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8").splitlines()
    pool = _builtin_pool(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(f"{s}\n" for s in pool), encoding="utf-8")
    os.replace(tmp, cached)
    return pool


def load_pools(sources: Sequence[str], base_dir: Path | None = None,
               exclude: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Union of several sources as (sentence, source) pairs, deduplicated case-insensitively, minus `exclude`."""
    seen = {s.lower() for s in exclude}
    pool = []
    for source in sources:
        for sentence in load_pool(source, base_dir):
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                pool.append((sentence, source))
    return pool


def _dedup(sentences: Iterable[str | None]) -> list[str]:
    seen: set[str] = set()
    out = []
    for s in sentences:
        if s and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out
