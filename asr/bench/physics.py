"""What pruning can buy: weights the decoder reads per generated token, from the model config alone.

Per token the decoder reads the output projection (vocab × d_model) and, per layer, self-attention (4·d²),
cross-attention queries and output (2·d²; its keys/values are cached once per clip) and the MLP (2·d·ffn).
The ratio student/teacher of this count is the decoder speed-up a memory-bound decoder can reach.
"""
from __future__ import annotations


def decoder_weights_per_token(config) -> int:
    """Weights read by one decoder step of a Whisper model with this config."""
    d, ffn = config.d_model, config.decoder_ffn_dim
    per_layer = 6 * d * d + 2 * d * ffn
    return config.vocab_size * d + config.decoder_layers * per_layer


def predicted_decoder_ratio(student_config, teacher_config) -> float:
    """Student/teacher per-token decoder cost predicted from weights read."""
    return decoder_weights_per_token(student_config) / decoder_weights_per_token(teacher_config)
