"""asr-distill: prune Whisper decoders and recover them."""
