"""Decoding engines (HF, CTranslate2), transcription, WER/CER with Whisper's normalizers, loop detection: used by labelling, bench and training."""
