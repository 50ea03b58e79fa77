"""A teacher's Whisper architecture without its weights: sizing a run (`asr plan`) must not download 3 GB.

Registry names and local directories read their own config.json; a hub id reads the cached config.json, else the
dimensions below, copied from the config.json of each openai/whisper-* repository on the Hugging Face hub.
"""
from __future__ import annotations

from asr.errors import AsrError
from asr.models.registry import REGISTRY, resolve_model

# hub id -> (d_model, encoder layers, decoder layers, attention heads, FFN width, vocabulary, mel bins)
WHISPER_DIMS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "openai/whisper-tiny": (384, 4, 4, 6, 1536, 51865, 80),
    "openai/whisper-tiny.en": (384, 4, 4, 6, 1536, 51864, 80),
    "openai/whisper-base": (512, 6, 6, 8, 2048, 51865, 80),
    "openai/whisper-base.en": (512, 6, 6, 8, 2048, 51864, 80),
    "openai/whisper-small": (768, 12, 12, 12, 3072, 51865, 80),
    "openai/whisper-small.en": (768, 12, 12, 12, 3072, 51864, 80),
    "openai/whisper-medium": (1024, 24, 24, 16, 4096, 51865, 80),
    "openai/whisper-medium.en": (1024, 24, 24, 16, 4096, 51864, 80),
    "openai/whisper-large-v2": (1280, 32, 32, 20, 5120, 51865, 80),
    "openai/whisper-large-v3": (1280, 32, 32, 20, 5120, 51866, 128),
    "openai/whisper-large-v3-turbo": (1280, 32, 4, 20, 5120, 51866, 128),
}


def whisper_config(ref: str):
    """The WhisperConfig of a model reference, read without loading (or downloading) any weights."""
    from transformers import WhisperConfig

    if ref in WHISPER_DIMS:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            d, enc, dec, heads, ffn, vocab, mels = WHISPER_DIMS[ref]
            return WhisperConfig(d_model=d, encoder_layers=enc, decoder_layers=dec, encoder_attention_heads=heads,
                                 decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                                 vocab_size=vocab, num_mel_bins=mels)
    try:
        return WhisperConfig.from_pretrained(resolve_model(ref))
    except (OSError, ValueError) as exc:
        raise AsrError(f"{ref}: no Whisper config.json to size it from ({str(exc).splitlines()[0]}); use a registry "
                       f"name ({', '.join(REGISTRY)}), a local model directory or one of {', '.join(WHISPER_DIMS)}")


def meta_whisper(config):
    """A WhisperForConditionalGeneration with every parameter on the meta device: exact shapes, no memory."""
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        return WhisperForConditionalGeneration(config)
