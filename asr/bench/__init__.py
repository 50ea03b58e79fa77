"""Latency, streaming simulation, speculative decoding, bench tables and plots (decoding itself lives in asr.infer)."""
