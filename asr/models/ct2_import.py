"""Convert a CTranslate2 Whisper model directory into a Hugging Face `save_pretrained` directory.

Traps handled (each checked in tests/test_models.py): fused QKV / KV split by rows, zero key bias
dropped (HF k_proj has none; a constant key bias cancels in softmax anyway), the tied output projection stored
as an alias, old tokenizer.json files missing the first BPE merge "Ġ t" and the 1,501 timestamp tokens,
tiny.en's shifted `lang_ids` (ignored), head counts read from the file.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asr.errors import AsrError
from asr.models.ct2_reader import Ct2Model, dequantize, read_ct2
from asr.models.loading import pad_with_eos, save_whisper
from asr.models.output_dir import check_overwritable, replace_dir
from asr.models.registry import IMPORT_STAMP

_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")
_LN = {"gamma": "weight", "beta": "bias"}


def _linear(ct2: Ct2Model, src: str, dst: str, sd: dict, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = dequantize(ct2, f"{src}/weight")
    if bias and f"{src}/bias" in ct2.variables:
        sd[f"{dst}.bias"] = dequantize(ct2, f"{src}/bias")


def _norm(ct2: Ct2Model, src: str, dst: str, sd: dict) -> None:
    for ct2_name, hf_name in _LN.items():
        sd[f"{dst}.{hf_name}"] = dequantize(ct2, f"{src}/{ct2_name}")


def _split_rows(ct2: Ct2Model, src: str, dsts: Sequence[str | None], sd: dict) -> None:
    """Split a fused projection by rows into q/k/v (None drops a part's bias: HF k_proj has no bias)."""
    weight = dequantize(ct2, f"{src}/weight")
    bias = dequantize(ct2, f"{src}/bias") if f"{src}/bias" in ct2.variables else None
    d = weight.shape[0] // len(dsts)
    for i, dst in enumerate(dsts):
        key_proj = dst.endswith("k_proj")
        sd[f"{dst}.weight"] = weight[i * d:(i + 1) * d]
        if bias is not None and not key_proj:
            sd[f"{dst}.bias"] = bias[i * d:(i + 1) * d]


def _layer_count(ct2: Ct2Model, side: str) -> int:
    ids = {int(m.group(2)) for n in ct2.variables if (m := _LAYER.match(n)) and m.group(1) == side}
    return max(ids) + 1 if ids else 0


def _layer(ct2: Ct2Model, src: str, dst: str, sd: dict, cross_attention: bool) -> None:
    """One transformer layer: self-attention, (decoder only) cross-attention, MLP, each with its layer norm."""
    _split_rows(ct2, f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"], sd)
    _linear(ct2, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", sd)
    _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", sd)
    if cross_attention:
        _linear(ct2, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", sd)
        _split_rows(ct2, f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"], sd)
        _linear(ct2, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", sd)
        _norm(ct2, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", sd)
    _linear(ct2, f"{src}/ffn/linear_0", f"{dst}.fc1", sd)
    _linear(ct2, f"{src}/ffn/linear_1", f"{dst}.fc2", sd)
    _norm(ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", sd)


def ct2_to_state_dict(ct2: Ct2Model) -> dict[str, np.ndarray]:
    """Map CTranslate2 Whisper variables to `WhisperForConditionalGeneration` state-dict keys."""
    sd: dict[str, np.ndarray] = {}
    enc, dec = "model.encoder", "model.decoder"
    _linear(ct2, "encoder/conv1", f"{enc}.conv1", sd)
    _linear(ct2, "encoder/conv2", f"{enc}.conv2", sd)
    sd[f"{enc}.embed_positions.weight"] = dequantize(ct2, "encoder/position_encodings/encodings")
    _norm(ct2, "encoder/layer_norm", f"{enc}.layer_norm", sd)
    for i in range(_layer_count(ct2, "encoder")):
        _layer(ct2, f"encoder/layer_{i}", f"{enc}.layers.{i}", sd, cross_attention=False)
    sd[f"{dec}.embed_tokens.weight"] = dequantize(ct2, "decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = dequantize(ct2, "decoder/position_encodings/encodings")
    _norm(ct2, "decoder/layer_norm", f"{dec}.layer_norm", sd)
    for i in range(_layer_count(ct2, "decoder")):
        _layer(ct2, f"decoder/layer_{i}", f"{dec}.layers.{i}", sd, cross_attention=True)
    projection = ct2.variables.get("decoder/projection/weight")
    if projection is None or ct2.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise AsrError("CTranslate2 model has an untied output projection; only tied Whisper models are supported")
    return sd


def _scalar(ct2: Ct2Model, name: str) -> int:
    return int(np.asarray(ct2.variables[name]).reshape(()))


def whisper_config(ct2: Ct2Model, vocab: list[str], ct2_config: dict):
    """Build a WhisperConfig from the tensor shapes and the head counts stored in the file."""
    from transformers import WhisperConfig

    conv1 = ct2.variables["encoder/conv1/weight"]
    emb = ct2.variables["decoder/embeddings/weight"]
    tok = {t: i for i, t in enumerate(vocab)}
    sot, eot = tok["<|startoftranscript|>"], tok["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=emb.shape[0], d_model=emb.shape[1], num_mel_bins=conv1.shape[1],
        encoder_layers=_layer_count(ct2, "encoder"), decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads"),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads"),
        encoder_ffn_dim=ct2.variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2.variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2.variables["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        suppress_tokens=ct2_config.get("suppress_ids"),
    )


def read_vocabulary(ct2_dir: Path) -> list[str]:
    """The complete id -> token list CTranslate2 ships (vocabulary.txt or vocabulary.json)."""
    if (ct2_dir / "vocabulary.json").is_file():
        return json.loads((ct2_dir / "vocabulary.json").read_text(encoding="utf-8"))
    if (ct2_dir / "vocabulary.txt").is_file():
        return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    raise AsrError(f"{ct2_dir}: no vocabulary.txt or vocabulary.json; this is not a CTranslate2 Whisper directory")


def repair_tokenizer_json(tokenizer: dict, vocab: list[str]) -> dict:
    """Put back the first BPE merge 'Ġ t' and the timestamp tokens that old Whisper exports lack."""
    merges = tokenizer["model"]["merges"]
    first = ["Ġ", "t"] if merges and isinstance(merges[0], list) else "Ġ t"
    if first not in merges:
        merges.insert(0, first)
    added = tokenizer["added_tokens"]
    present = {a["id"] for a in added} | set(tokenizer["model"]["vocab"].values())
    for i, token in enumerate(vocab):
        if i not in present:  # timestamps are ordinary (non-special) added tokens, as in OpenAI's tokenizer
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": False})
    for entry in added:
        if vocab[entry["id"]] != entry["content"]:
            raise AsrError(f"tokenizer.json token {entry['id']} is {entry['content']!r} but the model "
                           f"vocabulary says {vocab[entry['id']]!r}; the package files do not belong together")
    for token, i in tokenizer["model"]["vocab"].items():
        if vocab[i] != token:
            raise AsrError(f"tokenizer.json BPE token {i} disagrees with the model vocabulary")
    return tokenizer


def build_tokenizer(ct2_dir: Path, vocab: list[str]):
    """A WhisperTokenizer from the repaired tokenizer.json, with special tokens in id order, padding with
    end-of-text."""
    from transformers import WhisperTokenizer

    source = ct2_dir / "tokenizer.json"
    if not source.is_file():
        raise AsrError(f"{ct2_dir}: tokenizer.json missing; the CTranslate2 package is incomplete")
    repaired = repair_tokenizer_json(json.loads(source.read_text(encoding="utf-8")), vocab)
    specials = sorted((a for a in repaired["added_tokens"] if a["special"]), key=lambda a: a["id"])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tokenizer.json").write_text(json.dumps(repaired, ensure_ascii=False), encoding="utf-8")
        tok = WhisperTokenizer.from_pretrained(tmp, additional_special_tokens=[a["content"] for a in specials])
    if len(tok) != len(vocab):
        raise AsrError(f"{ct2_dir}: tokenizer has {len(tok)} tokens but the model vocabulary {len(vocab)}")
    return pad_with_eos(tok)


def generation_config(config, vocab: list[str], ct2_config: dict):
    """Generation settings Whisper's `generate` needs; language/task tables only for multilingual models."""
    from transformers import GenerationConfig

    tok = {t: i for i, t in enumerate(vocab)}
    multilingual = config.vocab_size >= 51865  # OpenAI's rule; tiny.en's config lang_ids are shifted: ignored
    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_length=config.max_target_positions,
        no_timestamps_token_id=tok["<|notimestamps|>"], prev_sot_token_id=tok["<|startofprev|>"],
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", []),
        alignment_heads=ct2_config.get("alignment_heads"), max_initial_timestamp_index=50,
        is_multilingual=multilingual, return_timestamps=False,
    )
    if multilingual:
        sot, translate = tok["<|startoftranscript|>"], tok["<|translate|>"]
        gen.lang_to_id = {vocab[i]: i for i in range(sot + 1, translate)}
        gen.task_to_id = {"translate": translate, "transcribe": tok["<|transcribe|>"]}
    return gen


def import_ct2(model_parts: Sequence[Path], ct2_dir: Path, out_dir: Path, stamp: dict) -> Path:
    """Convert CTranslate2 Whisper files to a `save_pretrained` directory (written atomically, with `stamp` saying
    where it came from); an existing folder is replaced only if an import wrote it."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    check_overwritable(out_dir, IMPORT_STAMP, "asr models import")
    ct2 = read_ct2(model_parts)
    if ct2.spec_name and ct2.spec_name != "WhisperSpec":
        raise AsrError(f"{ct2_dir}: CTranslate2 spec is {ct2.spec_name}, not WhisperSpec")
    vocab = read_vocabulary(ct2_dir)
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    config = whisper_config(ct2, vocab, ct2_config)
    config.alignment_heads = ct2_config.get("alignment_heads")
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in ct2_to_state_dict(ct2).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise AsrError(f"{ct2_dir}: weights do not fit Whisper (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = generation_config(config, vocab, ct2_config)
    tokenizer = build_tokenizer(ct2_dir, vocab)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_whisper(model, tmp)
    tokenizer.save_pretrained(tmp)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    (tmp / IMPORT_STAMP).write_text(json.dumps(stamp))
    replace_dir(tmp, out_dir)
    return out_dir
