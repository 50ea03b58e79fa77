"""Synthetic speech corpus: real TTS engines, real files, tiny builds."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import yaml

from asr.cli import main
from asr.data import augment, synth, texts, tts
from asr.data.loading import timed_segments
from asr.data.synth import COLUMNS, build_corpus, corpus_digest, load_synth_config
from asr.data.texts import clean_sentence, load_pool, load_pools
from asr.data.tts import SynthesisFailed, check_voice, expand_voices, synthesize, voice_id
from asr.errors import AsrError

SR = 16000
CFG = load_synth_config()
SENTENCE = "Please close the window before you leave the house."
SENTENCES = {"de": "Ich trinke gern Tee am Morgen.", "es": "Me gusta beber té por la mañana.",
            "fr": "J'aime boire du thé le matin.", "it": "Mi piace bere il tè la mattina.",
            "ru": "Я люблю пить чай по утрам."}


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "audio").glob("*.wav"))}


def assert_wav_ok(path: Path) -> None:
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16"), path
    audio, _ = sf.read(path, dtype="float32")
    assert 0.5 <= len(audio) / SR <= 30.0, path
    assert np.sqrt(np.mean(audio**2)) > 0.01, f"{path} is (nearly) silent"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A train build (2 workers, half augmented) and a test build (in process)."""
    root = tmp_path_factory.mktemp("synth")
    build_corpus(root / "train", "train", num=8, seed=3, workers=2, progress=False)
    build_corpus(root / "test", "test", num=6, seed=3, workers=1, progress=False)
    return {"train": root / "train", "test": root / "test", "root": root}


@pytest.mark.parametrize("split", ["train", "test"])
def test_build_writes_valid_audiofolder(built, split):
    out = built[split]
    rows = read_rows(out)
    assert list(rows[0]) == COLUMNS
    assert [r["file_name"] for r in rows] == [f"audio/{i:06d}.wav" for i in range(len(rows))]
    assert len(rows) == (8 if split == "train" else 6)
    for row in rows:
        assert_wav_ok(out / row["file_name"])
        assert row["transcription"] and row["language"] == "en"
        assert abs(float(row["duration"]) - sf.info(out / row["file_name"]).duration) < 1e-3
    if split == "test":
        assert not any(r["augment"] for r in rows), "the test split must stay clean"
    dataset = datasets.load_dataset("audiofolder", data_dir=str(out), split="train",
                                    cache_dir=str(built["root"] / f"hf-cache-{split}"))
    assert dataset.num_rows == len(rows)
    assert dataset["transcription"] == [r["transcription"] for r in rows]


def test_train_and_test_share_no_voice_or_text_source(built):
    train, test = read_rows(built["train"]), read_rows(built["test"])
    assert not {r["voice"] for r in train} & {r["voice"] for r in test}
    assert not {r["source"] for r in train} & {r["source"] for r in test}
    assert not {r["transcription"] for r in train} & {r["transcription"] for r in test}
    english = {split: {voice_id(v) for v in expand_voices(CFG["splits"][split]["voices"]) if v["lang"] == "en"}
               for split in ("train", "test")}
    assert english["train"] and english["test"] and not english["train"] & english["test"]
    pools = {split: {s for s, _ in load_pools(CFG["splits"][split]["texts"]["en"])} for split in ("train", "test")}
    assert len(pools["train"]) > 10000 and len(pools["test"]) > 10000


def test_same_seed_gives_identical_bytes_across_worker_counts(built, tmp_path):
    again = tmp_path / "again"
    build_corpus(again, "train", num=8, seed=3, workers=1, progress=False)
    assert (again / "metadata.csv").read_bytes() == (built["train"] / "metadata.csv").read_bytes()
    assert digests(again) == digests(built["train"])
    other = tmp_path / "other"
    build_corpus(other, "train", num=3, seed=4, workers=1, progress=False)
    assert [r["transcription"] for r in read_rows(other)] != [r["transcription"] for r in read_rows(again)][:3]


def test_resume_rebuilds_missing_clips_and_refuses_other_params(built, tmp_path):
    out = tmp_path / "resume"
    build_corpus(out, "test", num=4, seed=3, workers=1, progress=False)
    (out / "audio" / "000002.wav").unlink()
    summary = build_corpus(out, "test", num=6, seed=3, workers=1, progress=False)
    assert (summary["resumed"], summary["clips"]) == (3, 6)
    assert (out / "metadata.csv").read_bytes() == (built["test"] / "metadata.csv").read_bytes()
    assert digests(out) == digests(built["test"])
    with pytest.raises(AsrError, match="another --out"):
        build_corpus(out, "test", num=6, seed=99, workers=1, progress=False)


def keep_short_texts(audio: np.ndarray, text: str) -> bool:
    """A stand-in for the Whisper-based intelligibility filter."""
    return len(text.split()) <= 8


def test_filter_fn_rejections_are_redrawn_and_counted(tmp_path):
    summary = build_corpus(tmp_path / "f", "test", num=5, seed=5, workers=1, filter_fn=keep_short_texts,
                           progress=False)
    rows = read_rows(tmp_path / "f")
    kept = [r for r in rows if len(r["transcription"].split()) <= 8]
    assert len(kept) == len(rows) == summary["clips"] == 5 - summary["skipped"].get("filter", 0)
    assert summary["redrawn"].get("filter", 0) + summary["skipped"].get("filter", 0) > 0


def test_multilingual_clips_only_when_requested(tmp_path):
    build_corpus(tmp_path / "m", "test", num=4, seed=1, workers=1, languages=("de", "fr"), progress=False)
    rows = read_rows(tmp_path / "m")
    assert {r["language"] for r in rows} <= {"de", "fr"} and len(rows) == 4
    assert all(r["voice"] == {"de": "pico:de-DE", "fr": "pico:fr-FR"}[r["language"]] for r in rows)
    with pytest.raises(AsrError, match="no voices or texts"):
        build_corpus(tmp_path / "x", "test", num=1, seed=1, languages=("nl",), progress=False)


def test_language_weights_set_each_language_share_of_the_clips(tmp_path):
    """A hard language can have more of a build's clips; equal weights keep the uniform draw, so the builds made
    before weights existed stay byte-identical, and a resume under other weights is refused."""
    build_corpus(tmp_path / "u", "test", num=3, seed=1, workers=1, languages=("de", "fr"), progress=False)
    build_corpus(tmp_path / "e", "test", num=3, seed=1, workers=1, languages=("de", "fr"),
                 language_weights={"de": 2, "fr": 2}, progress=False)
    assert digests(tmp_path / "u") == digests(tmp_path / "e")
    main(["data", "synth", "--out", str(tmp_path / "w"), "--split", "test", "--num", "24", "--seed", "1",
          "--workers", "1", "--languages", "de,fr", "--language-weights", "fr=5"])
    french = sum(r["language"] == "fr" for r in read_rows(tmp_path / "w"))
    assert 17 <= french <= 23  # 20 expected of 24 (5 to 1); uniform would give 12
    manifest = json.loads((tmp_path / "w" / synth.MANIFEST).read_text())
    assert manifest["params"]["language_weights"] == [1.0, 5.0]
    with pytest.raises(AsrError, match="holds a build with"):
        build_corpus(tmp_path / "w", "test", num=24, seed=1, workers=1, languages=("de", "fr"),
                     language_weights={"fr": 2}, progress=False)
    with pytest.raises(AsrError, match=r"positive numbers for languages of the build \(de, fr\).*'ru': 2"):
        build_corpus(tmp_path / "x", "test", num=1, seed=1, languages=("de", "fr"), language_weights={"ru": 2},
                     progress=False)


def test_every_voice_in_the_yaml_speaks():
    voices = {voice_id(v): v for split in ("train", "test") for v in expand_voices(CFG["splits"][split]["voices"])}
    for name, voice in voices.items():
        text = SENTENCE if voice["lang"] == "en" else SENTENCES[voice["lang"]]
        audio = synthesize({"engine": voice["engine"], "voice": voice["voice"]}, text, SR)
        assert audio.dtype == np.float32 and audio.ndim == 1, name
        assert 1.0 < len(audio) / SR < 10.0, name
        assert np.sqrt(np.mean(audio**2)) > 0.01, f"{name} is silent"


def test_festival_reads_a_clip_in_one_process_as_text2wave_does_and_stops_after_it(tmp_path):
    """A clip's sentences go through one festival process (a voice loads once, not per sentence), with
    text2wave's audio sample for sample; the process ends with the clip, so no clip hears festival's state from
    another, and one that dies mid-clip is replaced for the next sentence."""
    def text2wave(text: str, rate: float) -> np.ndarray:
        (tmp_path / "in.txt").write_text(text, encoding="utf-8")
        subprocess.run(["text2wave", "-eval", "(voice_kal_diphone)", "-eval",
                        f"(Parameter.set 'Duration_Stretch {1.0 / rate:.4f})", "-o", str(tmp_path / "o.wav"),
                        str(tmp_path / "in.txt")], check=True, capture_output=True)
        return sf.read(tmp_path / "o.wav", dtype="float32")[0]

    spec = {"engine": "festival", "voice": "kal_diphone"}
    tts.close_festival()  # other tests leave their voices' processes
    tts._check_voice.cache_clear()
    check_voice(spec)  # what a spawned synthesis worker does first: it must leave no process behind
    assert not tts._FESTIVAL_VOICES
    with tts.one_reading():
        for text, rate in [(SENTENCE, 1.1), ("Stop. Look both ways! Then cross.", 0.9), ("Yes.", 1.1)]:
            assert np.array_equal(synthesize({**spec, "rate": rate}, text, 16000), text2wave(text, rate)), text
        process = tts._FESTIVAL_VOICES["kal_diphone"].proc
        tts._FESTIVAL_VOICES["kal_diphone"].close()  # as if it had crashed between two sentences
        assert np.array_equal(synthesize({**spec, "rate": 1.1}, "Yes.", 16000), text2wave("Yes.", 1.1))
        assert tts._FESTIVAL_VOICES["kal_diphone"].proc is not process
    assert not tts._FESTIVAL_VOICES and process.poll() is not None


def test_missing_engine_voice_names_the_fix():
    with pytest.raises(AsrError, match="apt-get install"):
        synthesize({"engine": "festival", "voice": "rab_diphone"}, SENTENCE)
    with pytest.raises(AsrError, match="flite has no voice"):
        check_voice({"engine": "flite", "voice": "nobody"})


def test_corpus_name_changes_with_a_sentence_of_its_text_files(tmp_path, monkeypatch):
    """A build is reused by name: editing a `file:` pool or the pools' filter must name a new corpus."""
    data = Path(CFG["_path"]).parent
    shutil.copytree(data, tmp_path / "data")
    before = corpus_digest(load_synth_config(tmp_path / "data" / "synthetic.yaml"))
    assert before == corpus_digest(CFG)
    with open(tmp_path / "data" / "texts" / "it.txt", "a", encoding="utf-8") as f:
        f.write("Una frase nuova per vedere se il corpus cambia nome.\n")
    assert corpus_digest(load_synth_config(tmp_path / "data" / "synthetic.yaml")) != before
    monkeypatch.setattr(synth, "POOL_VERSION", texts.POOL_VERSION + 1)
    assert corpus_digest(CFG) != before


def test_config_rejects_a_voice_shared_by_train_and_test(tmp_path):
    cfg = yaml.safe_load(Path(CFG["_path"]).read_text())
    cfg["splits"]["test"]["voices"].append({"engine": "flite", "voice": "kal16"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(AsrError, match="flite:kal16"):
        load_synth_config(path)


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
def test_noise_hits_the_requested_snr(color):
    speech = synthesize({"engine": "flite", "voice": "kal16"}, SENTENCE, SR)
    for snr in (5.0, 12.5, 25.0):
        noisy = augment.add_noise(speech, snr, color, np.random.default_rng(0))
        measured = 10 * np.log10(np.sum(speech**2) / np.sum((noisy - speech) ** 2))
        assert abs(measured - snr) <= 1.0, (color, snr, measured)


def band_energy(audio: np.ndarray, above_hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    return float(spectrum[np.fft.rfftfreq(len(audio), 1 / SR) > above_hz].sum())


@pytest.mark.parametrize("codec", sorted(augment.CODECS))
def test_telephone_removes_energy_above_4khz(codec):
    noise = augment.colored_noise(SR * 2, "white", np.random.default_rng(1)) * 0.2
    phone = augment.telephone(noise, SR, codec)
    assert len(phone) == len(noise)
    assert band_energy(phone, 4000) < 1e-3 * band_energy(noise, 4000)  # at least 30 dB down
    assert band_energy(phone, 0) > 0.1 * band_energy(noise, 0) * (3100 / 8000)  # the voice band survives


@pytest.mark.parametrize("codec, low_db, high_db", [("mulaw", 33, 45), ("alaw", 33, 45), ("gsm", 10, 33)])
def test_codec_round_trip_through_ffmpeg_is_lossy_as_the_codec_is(codec, low_db, high_db):
    """G.711 keeps ~38 dB SNR on a tone; GSM 06.10 is a vocoder and keeps much less, but keeps the tone."""
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)
    out = augment.codec_round_trip(tone, codec)
    snr = 10 * np.log10(np.sum(tone**2) / np.sum((out - tone) ** 2))
    assert len(out) == len(tone) and low_db < snr < high_db, snr


def test_telephone_without_ffmpeg_names_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AsrError, match="apt-get install ffmpeg"):
        augment.telephone(np.zeros(SR, dtype=np.float32), SR, "gsm")


def test_speed_and_pitch_change_what_they_should():
    t = np.arange(SR) / SR
    tone = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    tone[:2000] = 0.0  # start from silence, as speech does (the phase vocoder keeps frame 0's phases)
    assert len(augment.change_speed(tone, SR, 1.1)) == pytest.approx(len(tone) / 1.1, rel=0.01)
    shifted = augment.shift_pitch(tone, SR, 2.0)
    assert len(shifted) == len(tone)
    spectrum = np.abs(np.fft.rfft(shifted[4000:-2000]))
    peak_hz = np.fft.rfftfreq(len(shifted) - 6000, 1 / SR)[spectrum.argmax()]
    assert peak_hz == pytest.approx(200 * 2 ** (2 / 12), rel=0.02)


def steady_vowel(f0: float = 120.0, formant: float = 800.0) -> np.ndarray:
    """One second of harmonics of f0 under a Gaussian envelope centred on `formant`."""
    t = np.arange(SR) / SR
    wave = sum(np.exp(-(((h - formant) / 300) ** 2)) * np.sin(2 * np.pi * h * t) for h in np.arange(1, 33) * f0)
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def fundamental_and_centroid(audio: np.ndarray) -> tuple[float, float]:
    """The fundamental (cepstral peak, 60-400 Hz) and the power spectrum's centroid (the envelope's place)."""
    x = audio[2000:-2000]
    freqs, power = np.fft.rfftfreq(len(x), 1 / SR), np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    cepstrum = np.fft.irfft(np.log(power + 1e-9))
    lo, hi = SR // 400, SR // 60
    return SR / (lo + int(np.argmax(cepstrum[lo:hi]))), float((power * freqs).sum() / power.sum())


def test_reshape_voice_moves_the_fundamental_and_the_envelope_apart():
    """Both x1.3 moves the whole spectrum; pitch alone moves the fundamental and (approximately: rubberband
    estimates the envelope) keeps the envelope; formant alone keeps the fundamental."""
    vowel = steady_vowel()
    f0, centroid = fundamental_and_centroid(vowel)
    assert f0 == pytest.approx(120, rel=0.01) and centroid == pytest.approx(800, rel=0.01)
    assert np.array_equal(augment.reshape_voice(vowel, SR), vowel)
    moved = {}
    for pitch, formant in [(1.3, 1.3), (1.5, 1.0), (1.0, 1.2)]:
        shifted = augment.reshape_voice(vowel, SR, pitch, formant)
        assert len(shifted) == len(vowel)
        f0_ratio, centroid_ratio = (a / b for a, b in zip(fundamental_and_centroid(shifted), (f0, centroid)))
        assert f0_ratio == pytest.approx(pitch, rel=0.03), (pitch, formant)
        moved[pitch, formant] = centroid_ratio
    assert moved[1.3, 1.3] == pytest.approx(1.3, rel=0.03)
    assert moved[1.5, 1.0] - 1 < 0.5 * (1.5 - 1)  # measured 1.19: the envelope moves less than half as far
    assert 1.02 < moved[1.0, 1.2] < 1.2  # measured 1.06


def test_festival_speaks_higher_through_a_voice_entry(tmp_path):
    """Festival has no pitch control: an entry's pitch/formant shift its audio after synthesis, and the config
    checks their ranges as it checks rate's."""
    spec = {"engine": "festival", "voice": "msu_ru_nsh_clunits"}
    plain = synthesize(spec, SENTENCES["ru"], SR)
    raised = synthesize({**spec, "pitch": 1.5, "formant": 1.1}, SENTENCES["ru"], SR)
    assert np.array_equal(raised, augment.reshape_voice(plain, SR, 1.5, 1.1)) and not np.array_equal(raised, plain)
    pico = {"engine": "pico", "voice": "it-IT", "pitch": 1.2}  # native pitch: only the formant is shifted after
    assert np.array_equal(synthesize({**pico, "formant": 1.1}, SENTENCES["it"], SR),
                          augment.reshape_voice(synthesize(pico, SENTENCES["it"], SR), SR, 1.0, 1.1))
    cfg = yaml.safe_load(Path(CFG["_path"]).read_text())
    cfg["splits"]["train"]["voices"].append({**spec, "lang": "ru", "pitch": [1.2, 1.0]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(AsrError, match=r"`pitch` must be \[low, high\]"):
        load_synth_config(tmp_path / "bad.yaml")


def test_reverb_and_random_chain_are_seeded():
    speech = synthesize({"engine": "flite", "voice": "kal16"}, SENTENCE, SR)
    policy = CFG["augment"]
    runs = [augment.random_augment(speech, SR, np.random.default_rng(7), policy) for _ in range(2)]
    assert runs[0][1:] == runs[1][1:] and np.array_equal(runs[0][0], runs[1][0]) and runs[0][1]
    wet = augment.reverb(speech, SR, 0.5, 0.4, np.random.default_rng(0))
    assert len(wet) == len(speech) + SR // 4 and np.abs(wet[len(speech):]).max() > 1e-3


def drawn_before_the_channel(described: str) -> list[str]:
    """The speed, pitch and reverb an augmentation description names (noise can be the forced only effect)."""
    return [e for e in described.split() if e.split("=")[0] in {"speed", "pitch", "reverb"}]


def test_augment_overrides_add_the_telephone_channel_to_the_same_clips_and_draws(tmp_path, capsys):
    """`augment={telephone: {p: 1}}` (a recipe's data.synth_train.augment): the clips and the other effects are the
    ones the yaml's policy draws, each augmented clip now also through the telephone channel; the manifest says so."""
    plain = build_corpus(tmp_path / "a", "train", num=4, seed=2, workers=1, augment_fraction=1.0, progress=False)
    phone = build_corpus(tmp_path / "b", "train", num=4, seed=2, workers=1, augment_fraction=1.0, progress=False,
                         augment={"telephone": {"p": 1.0}})
    assert plain["clips"] == phone["clips"] == 4
    main(["data", "synth", "--out", str(tmp_path / "cli"), "--split", "train", "--num", "2", "--seed", "2",
          "--workers", "1", "--augment", "telephone.p=1"])  # train's own fraction: half the clips augmented
    assert json.loads((tmp_path / "cli" / synth.MANIFEST).read_text())["params"]["augment"] == {"telephone": {"p": 1.0}}
    for a, b in zip(read_rows(tmp_path / "a"), read_rows(tmp_path / "b")):
        assert a["transcription"] == b["transcription"] and a["voice"] == b["voice"]
        assert b["augment"].split()[-1].startswith("telephone="), b["augment"]  # the last effect, after the others
        assert drawn_before_the_channel(a["augment"]) == drawn_before_the_channel(b["augment"]), (a, b)
    manifest = json.loads((tmp_path / "b" / synth.MANIFEST).read_text())
    assert manifest["params"]["augment"] == {"telephone": {"p": 1.0}}
    assert manifest["config"]["augment"]["telephone"]["p"] == 1.0
    with pytest.raises(AsrError, match="augment overrides name effects"):
        build_corpus(tmp_path / "c", "train", num=1, seed=2, augment={"echo": {"p": 1.0}}, progress=False)
    with pytest.raises(AsrError, match=r"augment.telephone.p must be in \[0, 1\]"):
        build_corpus(tmp_path / "c", "train", num=1, seed=2, augment={"telephone": {"p": 2}}, progress=False)
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", str(tmp_path / "c"), "--split", "train", "--num", "1", "--augment", "p=1"])
    assert capsys.readouterr().err.strip().endswith("--augment takes EFFECT.SETTING=NUMBER,... (e.g. telephone.p=1), "
                                                     "got 'p=1'")


@pytest.mark.parametrize("raw, expected", [
    ("“Behold, I am with you,” he said.", "Behold, I am with you, he said."),
    ("the boy’s dog ran home fast", "The boy's dog ran home fast."),
    ("what time is it now friend", "What time is it now friend?"),
    ("He paid 12 shekels for the field.", None),
    ("He came [a footnote] to the city gate.", None),
    ("The LORD spoke to him from the cloud.", None),
    ("Too short here.", None),
    (" ".join(["word"] * 23) + ".", None),
])
def test_sentence_filter(raw, expected):
    assert clean_sentence(raw) == expected


@pytest.mark.parametrize("lang", ["en", "it", "ru"])
def test_fortunes_pools_are_clean_and_hold_out_a_tenth(lang):
    train, held_out = load_pool(f"fortunes:{lang}"), load_pool(f"fortunes:{lang}:heldout")
    italian = [s for s in train if " che " in s or " della " in s]
    assert (not italian) if lang != "it" else len(italian) > 100  # English files sit beside fortunes-it's own
    assert len(train) > 3000 and 0.07 < len(held_out) / (len(train) + len(held_out)) < 0.13
    assert not {s.lower() for s in train} & {s.lower() for s in held_out}
    assert all(clean_sentence(s, ascii_only=False) == s for s in train[:500] + held_out)
    assert not [s for s in train + held_out if "--" in s]  # attributions
    ascii_accents = {w for s in train + held_out for w in re.findall(r"\w*[aeiouAEIOU]'(?!\w)", s)}
    assert not ascii_accents - texts._ITALIAN_APOSTROPHES - {w.capitalize() for w in texts._ITALIAN_APOSTROPHES}
    if lang == "it":  # accents restored, not dropped: Italian's commonest verb is "è"
        assert sum(" è " in s for s in train) > 1000 and sum("perché" in s for s in train) > 200
    with pytest.raises(AsrError, match="fortunes:<lang>"):
        load_pool("fortunes:ru:dev")


@pytest.mark.parametrize("ascii_text, italian", [
    ("E' cosi' perche' c'e' piu' gente.", "È così perché c'è più gente."),
    ("Aspetta un po' qui, ne' io ne' te lo sapra'.", "Aspetta un po' qui, né io né te lo saprà."),
    ("L'alcol non e' acqua, finche' dura.", "L'alcol non è acqua, finché dura."),
    ("Disse 'ciao' e usci'.", None),  # a quoted word's closing quote is no accent
])
def test_italian_fortunes_spell_ascii_accents_as_italian_does(ascii_text, italian):
    assert texts._italian_accents(ascii_text) == italian


def test_latin1_festival_voice_refuses_text_it_cannot_read():
    with pytest.raises(SynthesisFailed, match="latin-1"):
        synthesize({"engine": "festival", "voice": "lp_diphone"}, "Привет, как дела у тебя сегодня?")


def test_packed_clips_speak_several_sentences_in_one_voice_within_the_window(tmp_path):
    summary = build_corpus(tmp_path / "p", "train", num=4, seed=5, workers=1, augment_fraction=0.0,
                           sentences=(2, 3), progress=False)
    pool = {s for s, _ in load_pools(CFG["splits"]["train"]["texts"]["en"], Path(CFG["_path"]).parent)}
    rows = read_rows(tmp_path / "p")
    assert summary["clips"] == 4 and len({r["voice"] for r in rows}) >= 2
    for row in rows:
        parts = [p for p in pool if p in row["transcription"]]
        assert 2 <= len(parts) <= 3 and len(" ".join(parts)) == len(row["transcription"]), row["transcription"]
        assert float(row["duration"]) <= CFG["max_duration_s"] - 1.0
        assert_wav_ok(tmp_path / "p" / row["file_name"])
        segments = timed_segments(row["segments"], row["transcription"], float(row["duration"]))
        assert segments is not None and len(segments) == len(parts)  # timed, in order, inside the clip
        audio, _ = sf.read(tmp_path / "p" / row["file_name"], dtype="float32")
        for (_, end, _), (start, _, _) in zip(segments, segments[1:]):  # the pauses between sentences are quiet
            gap = audio[int(end * SR) + 160:int(start * SR) - 160]
            assert len(gap) > 0.1 * SR and np.abs(gap).max() < 0.05, (row["file_name"], end, start)
    with pytest.raises(AsrError, match="1 <= low <= high"):
        build_corpus(tmp_path / "x", "train", num=1, seed=5, sentences=(3, 2), progress=False)


def test_windows_are_30_s_of_a_reading_cut_inside_a_sentence_whose_start_alone_is_timed(tmp_path):
    """`windows`: what Whisper's sequential decoding hands the model. 30 s of consecutive sentences, the one the
    window cuts left open (its start, no end, its text not in the transcript), the reading's earlier sentences in
    `previous`, timed as the window before saw them (ending where this one begins); the other clips stay whole."""
    build_corpus(tmp_path / "w", "train", num=6, seed=3, workers=1, augment_fraction=0.0, sentences=(1, 2),
                 windows=0.5, progress=False)
    base, texts = Path(CFG["_path"]).parent, CFG["splits"]
    pool = [s for s, _ in load_pools(texts["train"]["texts"]["en"], base,
                                     exclude=[s for s, _ in load_pools(texts["test"]["texts"]["en"], base)])]
    rows = read_rows(tmp_path / "w")
    cut = [r for r in rows if r["previous"]]
    assert 1 <= len(cut) <= 5
    for row in cut:
        assert float(row["duration"]) == 30.0
        segments = timed_segments(row["segments"], row["transcription"], 30.0)
        assert segments is not None and segments[-1][1] is None and len(segments) >= 2
        spoken = [t for _, _, t in segments]
        assert row["transcription"] == " ".join(spoken[:-1])
        earlier = timed_segments(row["previous"], None, 30.0)
        assert earlier is not None and 20.0 < earlier[-1][1] < 30.0 and earlier[0][0] >= 0.0
        told = [t for _, _, t in earlier]
        read = [i for i in range(len(told), len(pool)) if pool[i - len(told):i + len(spoken)] == told + spoken]
        assert read, (told, spoken)  # the earlier sentences and the window's are one reading, in order
        audio, _ = sf.read(tmp_path / "w" / row["file_name"], dtype="float32")
        start = int(segments[-1][0] * SR)
        assert np.abs(audio[start:start + 1600]).max() > 0.1 and start < len(audio) - 0.04 * SR  # cut in speech
    for row in (r for r in rows if not r["previous"]):
        segments = timed_segments(row["segments"], row["transcription"], float(row["duration"]))
        assert segments is not None and None not in [end for _, end, _ in segments]
        assert float(row["duration"]) <= CFG["max_duration_s"] - 1.0
    with pytest.raises(AsrError, match="windows"):
        build_corpus(tmp_path / "x", "test", num=1, seed=5, windows=0.5, long_s=(60, 90), progress=False)


def test_segment_times_follow_a_speed_change(tmp_path):
    cfg = yaml.safe_load(Path(CFG["_path"]).read_text())
    cfg["augment"] = {"speed": {"p": 1.0, "factor": [0.8, 0.8]}}
    (tmp_path / "texts").symlink_to(Path(CFG["_path"]).parent / "texts")
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(cfg))
    build_corpus(tmp_path / "s", "train", num=2, seed=4, workers=1, augment_fraction=1.0, sentences=(2, 2),
                 config_path=tmp_path / "slow.yaml", progress=False)
    for row in read_rows(tmp_path / "s"):
        assert row["augment"] == "speed=0.80"
        segments = timed_segments(row["segments"], row["transcription"], float(row["duration"]))
        audio, _ = sf.read(tmp_path / "s" / row["file_name"], dtype="float32")
        (_, end, _), (start, _, _) = segments
        gap = audio[int(end * SR) + 160:int(start * SR) - 160]  # unscaled times would land inside the speech
        assert len(gap) > 0.2 * SR and np.abs(gap).max() < 0.05
        assert np.abs(audio[int(start * SR):int(start * SR) + 1600]).max() > 0.1  # speech starts on the stamp
