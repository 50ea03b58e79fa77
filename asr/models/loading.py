"""Load a Whisper model and its processor from any model reference (registry name, directory, hub id)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from asr.errors import AsrError
from asr.models.registry import resolve_model


def load_processor(ref: str):
    """Tokenizer + feature extractor of a model (WhisperProcessor), the tokenizer padding with end-of-text."""
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(resolve_model(ref))
    pad_with_eos(processor.tokenizer)
    return processor


def pad_with_eos(tokenizer):
    """Pad with `<|endoftext|>`, as OpenAI's Hugging Face checkpoints do: HF's Whisper collators call
    `tokenizer.pad`, which fails without a pad token (directories imported before it was set have none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_processor(processor, path) -> None:
    """Write tokenizer and `preprocessor_config.json` (WhisperProcessor alone writes processor_config.json only)."""
    processor.tokenizer.save_pretrained(path)
    processor.feature_extractor.save_pretrained(path)


def save_whisper(model, path: Path, processor=None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """`save_pretrained` (and the processor), with the tied output projection stored once and the files readable as
    the umask allows: a consolidated state dict holds proj_out as a separate copy (final/ was 1.6x student/), and
    transformers 5.23 writes model.safetensors owner-only (0600)."""
    if state_dict is not None and model.config.tie_word_embeddings and "proj_out.weight" in state_dict:
        state_dict = {**state_dict, "proj_out.weight": state_dict["model.decoder.embed_tokens.weight"]}
    model.save_pretrained(path, state_dict=state_dict)
    if processor is not None:
        save_processor(processor, path)
    mode = (Path(path) / "config.json").stat().st_mode & 0o777  # written with open(): as the umask allows
    for file in Path(path).iterdir():
        if file.is_file():
            file.chmod(mode)


def load_whisper(ref: str, dtype: torch.dtype = torch.float32):
    """A WhisperForConditionalGeneration in eval mode, on CPU (callers move it to their device)."""
    from transformers import WhisperForConditionalGeneration

    path = resolve_model(ref)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise AsrError(f"{ref}: cannot load a Whisper model from {path} ({str(exc).splitlines()[0]}); "
                       "check the directory is complete (config.json, model.safetensors)") from None
    return model.eval()


def weight_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a saved HF model (single file or sharded with an index)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    if not (model_dir / "model.safetensors").is_file():
        raise AsrError(f"{model_dir}: no safetensors weights; re-save the model with save_pretrained")
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def read_weights(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Named tensors (fp32) of a saved HF model, read without building it."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    out = {}
    for file in sorted({files[n] for n in names}):
        with safe_open(model_dir / file, framework="pt") as f:
            out.update({n: f.get_tensor(n).float() for n in names if files[n] == file})
    return out


def output_embedding(ref: str) -> torch.Tensor:
    """A Whisper's output projection [vocab, d_model] (tied to the token embedding), read without loading the
    model: with the decoder's final states it gives the exact logits."""
    model_dir = Path(resolve_model(ref))
    if not model_dir.is_dir():  # a hub id: the files of the cached snapshot
        from huggingface_hub import snapshot_download

        model_dir = Path(snapshot_download(str(model_dir), allow_patterns=["*.safetensors", "*.json"]))
    name = "proj_out.weight" if "proj_out.weight" in weight_files(model_dir) else "model.decoder.embed_tokens.weight"
    return read_weights(model_dir, [name])[name]


def local_device(local_rank: int | None = None) -> torch.device:
    """This process's GPU (LOCAL_RANK under a launcher) where CUDA is present, else the CPU: the same code runs on
    a laptop and on a cluster node."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    return torch.device("cuda", rank % torch.cuda.device_count())


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timers measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def same_encoder(a, b) -> bool:
    """True when two Whisper models hold identical encoder weights, so one encoder pass serves both."""
    sa, sb = a.model.encoder.state_dict(), b.model.encoder.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a module's weights: names, shapes and a strided sample of every tensor."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().float().flatten()
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(flat[::max(1, flat.numel() // 512)].cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def prompt_ids(tokenizer, generation_config, language: str = "en") -> list[int]:
    """Decoder prefix for transcription without timestamps: the same tokens `generate` forces."""
    sot = generation_config.decoder_start_token_id
    no_ts = generation_config.no_timestamps_token_id
    if not getattr(generation_config, "is_multilingual", False):
        if language != "en":
            raise AsrError(f"language '{language}' given to an English-only model; use a multilingual teacher")
        return [sot, no_ts]
    lang_token = f"<|{language}|>"
    if lang_token not in generation_config.lang_to_id:
        raise AsrError(f"language '{language}' is not one of the model's languages")
    return [sot, generation_config.lang_to_id[lang_token], generation_config.task_to_id["transcribe"], no_ts]
