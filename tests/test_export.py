"""CTranslate2 export and the ct2 engine: real weights, real speech, token-identical to HF greedy decoding."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from asr.infer.ct2_engine import Ct2Engine, ct2_max_length
from asr.infer.engines import HfEngine
from asr.infer.transcribe import text_of
from asr.infer.wer import error_rates, normalize
from asr.cli import main
from asr.data.features import log_mel
from asr.data.loading import decode_audio
from asr.errors import AsrError
from asr.models import export
from asr.models.export import ct2_cache_dir, export_ct2
from asr.models.loading import load_processor, load_whisper
from asr.models.registry import resolve_model

SENTENCES = [
    ("slt", "Please call Stella and ask her to bring these things with her from the store."),
    ("rms", "The weather report says it will be cold and windy this weekend."),
    ("slt", "We will meet at the station tomorrow before the train leaves."),
    ("rms", "Reading a good book on a rainy afternoon is a simple pleasure."),
    ("slt", "She opened the window and the cool air filled the room."),
]
MODELS = ["whisper-tiny.en", "whisper-base"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[np.ndarray]:
    """Five flite sentences (two voices) plus one clip of noise, where Whisper's token suppression matters."""
    folder = tmp_path_factory.mktemp("flite")
    audio = []
    for i, (voice, text) in enumerate(SENTENCES):
        wav = folder / f"{i}_{voice}.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
        audio.append(decode_audio(str(wav)))
    noise = 0.1 * np.random.default_rng(0).standard_normal(48_000).astype(np.float32)
    return audio + [noise]


@pytest.fixture(scope="module")
def ct2_cache(tmp_path_factory) -> Path:
    """On-the-fly exports go to a temporary cache (registry models still come from the real cache)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "cache_dir", lambda: root)
        yield root / "ct2"
    shutil.rmtree(root, ignore_errors=True)  # ~450 MB of float32 exports; pytest keeps its last three tmp dirs


@pytest.fixture(scope="module")
def runs(ct2_cache, clips):
    """Per model: both engines (ct2 exported on the fly), the processor, shared features, both encodings; built once."""
    built = {}

    def get(ref: str) -> dict:
        if ref not in built:
            hf, ct2, processor = HfEngine(load_whisper(ref), ref), Ct2Engine.for_model(ref, ref), load_processor(ref)
            features = log_mel(processor.feature_extractor, clips)  # the same features for both engines
            built[ref] = {"hf": hf, "ct2": ct2, "processor": processor,
                          "encoded": {hf: hf.encode(features), ct2: ct2.encode(features)}}
        return built[ref]
    return get


def test_export_writes_a_self_describing_ct2_directory(runs):
    exported = runs("whisper-tiny.en")["ct2"].model_dir
    source = Path(resolve_model("whisper-tiny.en"))
    names = {p.name for p in exported.iterdir()}
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json",
            "generation_config.json", "asr-export.json"} <= names
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temp dir left behind
    generation = json.loads((source / "generation_config.json").read_text())
    assert json.loads((exported / "generation_config.json").read_text()) == generation
    ct2_config = json.loads((exported / "config.json").read_text())
    assert ct2_config["suppress_ids"] == generation["suppress_tokens"]
    assert ct2_config["suppress_ids_begin"] == generation["begin_suppress_tokens"]
    assert 140e6 < (exported / "model.bin").stat().st_size < 160e6  # 37.8M params in float32


@pytest.mark.parametrize("ref", MODELS)
def test_ct2_and_hf_give_identical_tokens(runs, clips, ref):
    run = runs(ref)
    hf, ct2, processor = run["hf"], run["ct2"], run["processor"]
    ct2_out, hf_out = (engine.decode(run["encoded"][engine], "en", 64) for engine in (ct2, hf))
    assert [d.tokens for d in ct2_out] == [d.tokens for d in hf_out]
    assert [d.capped for d in ct2_out] == [d.capped for d in hf_out] == [False] * len(clips)
    assert ct2.eos_token_id == hf.eos_token_id
    hyps = [normalize(text_of(processor.tokenizer, d.tokens, ct2.eos_token_id), "en") for d in ct2_out]
    refs = [normalize(text, "en") for _, text in SENTENCES]
    assert error_rates(refs, hyps[:len(SENTENCES)])["wer"] < 0.25  # real transcripts, not agreeing garbage


@pytest.mark.parametrize("ref", MODELS)
@pytest.mark.parametrize("cap", [3, 10])
def test_token_cap_is_identical(runs, ref, cap):
    run = runs(ref)
    outs = [engine.decode(run["encoded"][engine], "en", cap) for engine in (run["ct2"], run["hf"])]
    for out in outs:  # every sentence is longer than 10 tokens
        assert [(len(d.tokens), d.capped) for d in out[:len(SENTENCES)]] == [(cap, True)] * len(SENTENCES)
    assert outs[0] == outs[1]


def test_ct2_max_length_undoes_ctranslate2s_halving():
    # ctranslate2 decodes min(max_length // 2, max_length - (prompt - 1)) steps
    for prompt in (2, 4):
        for n in (1, 3, 128, 444):
            length = ct2_max_length(n, prompt)
            assert min(length // 2, length - (prompt - 1)) == n


def test_prompt_longer_than_the_decoder_is_refused(runs):
    ct2 = runs("whisper-tiny.en")["ct2"]
    with pytest.raises(AsrError, match="max_new_tokens=447"):  # 2-token prompt + 447 > 448 positions, as in HF
        ct2.decode(runs("whisper-tiny.en")["encoded"][ct2], "en", 447)


def test_second_for_model_reuses_the_cached_export(runs, ct2_cache, capsys):
    runs("whisper-tiny.en")  # exported on first use
    target = ct2_cache_dir("whisper-tiny.en")
    assert target.is_relative_to(ct2_cache) and (target / "model.bin").is_file()
    stamp = (target / "model.bin").stat().st_mtime_ns
    capsys.readouterr()
    started = time.perf_counter()
    engine = Ct2Engine.for_model("whisper-tiny.en", "again")
    elapsed = time.perf_counter() - started
    assert "exporting" not in capsys.readouterr().err
    assert engine.model_dir == target and (target / "model.bin").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert elapsed < 2.0, elapsed


def test_retrained_checkpoint_re_exports_and_drops_the_stale_export(ct2_cache, tmp_path, monkeypatch):
    exported = []

    def fake_export(model_ref: str, out: Path, quantization=None) -> Path:  # the caching logic, not the converter
        out.mkdir(parents=True)
        (out / "model.bin").write_bytes(b"x")
        exported.append(out)
        return out

    monkeypatch.setattr(export, "export_ct2", fake_export)
    student = tmp_path / "student"  # a copy of a real model directory: only its weights' mtime changes below
    shutil.copytree(resolve_model("whisper-tiny.en"), student)
    before = ct2_cache_dir(str(student))
    assert before != ct2_cache_dir("whisper-tiny.en") and before.parent.name.startswith("student-")
    assert export.export_cached(str(student)) == export.export_cached(str(student)) == before
    assert exported == [before]
    weights = student / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a re-trained checkpoint
    after = export.export_cached(str(student))
    assert after != before and exported == [before, after]
    assert [p.name for p in after.parent.iterdir()] == [after.name]


def test_cli_int8_export_is_smaller_and_still_transcribes(runs, clips, tmp_path, capsys):
    run = runs("whisper-tiny.en")
    out = tmp_path / "tiny-int8"
    main(["export", "--model", "whisper-tiny.en", "--format", "ct2", "--quantization", "int8", "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "asr-export.json").read_text())["quantization"] == "int8"
    assert (out / "model.bin").stat().st_size < 0.4 * (run["ct2"].model_dir / "model.bin").stat().st_size
    engine, processor = Ct2Engine.for_model(str(out), "int8"), run["processor"]
    decoded = engine.decode(engine.encode(log_mel(processor.feature_extractor, clips[:len(SENTENCES)])), "en", 64)
    hyps = [normalize(text_of(processor.tokenizer, d.tokens, engine.eos_token_id), "en") for d in decoded]
    assert error_rates([normalize(t, "en") for _, t in SENTENCES], hyps)["wer"] < 0.3
    assert not any(d.capped for d in decoded)


def test_export_of_a_missing_model_names_it(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(AsrError, match="no-such-model"):
        export_ct2("no-such-model", out)
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", "no-such-model", "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no-such-model")


def test_export_refuses_bad_quantization_and_a_nonempty_out(tmp_path):
    with pytest.raises(AsrError, match="int3.*int8"):
        export_ct2("whisper-tiny.en", tmp_path / "q", quantization="int3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(AsrError, match="already exists"):
        export_ct2("whisper-tiny.en", tmp_path / "full")


def test_export_of_an_incomplete_model_dir_names_the_missing_file(tmp_path):
    model = tmp_path / "no-gen"
    shutil.copytree(resolve_model("whisper-tiny.en"), model, ignore=shutil.ignore_patterns("model.safetensors"))
    (model / "generation_config.json").unlink()
    with pytest.raises(AsrError, match="generation_config.json"):
        export_ct2(str(model), tmp_path / "out")


def test_ct2_dir_without_generation_config_is_refused(runs, tmp_path):
    exported = runs("whisper-tiny.en")["ct2"].model_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.bin", "config.json", "vocabulary.json"):
        (bare / name).symlink_to(exported / name)
    with pytest.raises(AsrError, match="generation_config.json"):
        Ct2Engine.for_model(str(bare), "bare")

