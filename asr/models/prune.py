"""Prune Whisper layers: keep a subset of decoder (and optionally encoder) layers, copied in order.

The student is the teacher with whole layers removed: embeddings, output projection, layer norms and the kept
layers are exact copies, so an untrained student already shares the teacher's vocabulary and encoder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from asr.errors import AsrError
from asr.models.output_dir import check_overwritable, replace_dir

PRUNING_REPORT = "pruning.json"  # written into every pruned student: which layers came from where

STRATEGIES = ("spaced", "first")


def select_layers(num_layers: int, keep: int, strategy: str = "spaced") -> list[int]:
    """Layer indices to keep: `spaced` = maximally spaced incl. first and last (distil-whisper), `first` = 0..k-1."""
    if not 1 <= keep <= num_layers:
        raise AsrError(f"cannot keep {keep} of {num_layers} layers; choose 1..{num_layers}")
    if strategy == "spaced":
        return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, keep)})
    if strategy == "first":
        return list(range(keep))
    raise AsrError(f"unknown pruning strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")


def check_keep(keep: Sequence[int], num_layers: int, side: str) -> list[int]:
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= num_layers:
        raise AsrError(f"{side} layers to keep {keep} must be increasing, unique and within 0..{num_layers - 1}")
    return keep


def renumber_alignment_heads(heads: Sequence[Sequence[int]] | None, keep: Sequence[int]) -> list[list[int]] | None:
    """Alignment heads (teacher layer, head) of kept layers, renumbered to student layer indices."""
    if heads is None:
        return None
    index = {layer: i for i, layer in enumerate(keep)}
    return [[index[layer], head] for layer, head in heads if layer in index]


def student_config(config, decoder_layers: int, encoder_layers: int):
    """The teacher's config with fewer layers: every shape of the student, to build it or to size it without weights."""
    student = config.__class__.from_dict(config.to_dict())
    student.decoder_layers, student.encoder_layers = decoder_layers, encoder_layers
    return student


def prune_whisper(teacher, decoder_keep: Sequence[int], encoder_keep: Sequence[int] | None = None):
    """A new WhisperForConditionalGeneration holding copies of the teacher's kept layers."""
    from transformers import WhisperForConditionalGeneration

    config = teacher.config
    decoder_keep = check_keep(decoder_keep, config.decoder_layers, "decoder")
    encoder_keep = check_keep(encoder_keep if encoder_keep is not None else range(config.encoder_layers),
                               config.encoder_layers, "encoder")
    heads = renumber_alignment_heads(getattr(teacher.generation_config, "alignment_heads", None), decoder_keep)
    student = WhisperForConditionalGeneration(student_config(config, len(decoder_keep), len(encoder_keep)))
    student = student.to(teacher.dtype)
    source = teacher.state_dict()
    mapping = {f"model.decoder.layers.{i}.": f"model.decoder.layers.{t}." for i, t in enumerate(decoder_keep)}
    mapping |= {f"model.encoder.layers.{i}.": f"model.encoder.layers.{t}." for i, t in enumerate(encoder_keep)}
    state = {}
    for key in student.state_dict():
        prefix = next((p for p in mapping if key.startswith(p)), None)
        state[key] = source[key if prefix is None else mapping[prefix] + key[len(prefix):]]
    student.load_state_dict(state)
    student.tie_weights()
    student.generation_config = teacher.generation_config.__class__.from_dict(teacher.generation_config.to_dict())
    student.generation_config.alignment_heads = heads or None
    return student.eval()


def count_parameters(model) -> int:
    """Unique parameters (the tied output projection counted once)."""
    return sum(p.numel() for p in model.parameters())


def prune_to_directory(teacher_ref: str, out: Path, decoder_keep: Sequence[int] | None = None,
                       num_layers: int | None = None, strategy: str = "spaced",
                       encoder_keep: Sequence[int] | None = None, scores: list[dict] | None = None) -> dict:
    """Prune a teacher and write a loadable HF student with its processor and `pruning.json`.

    `scores` is the table of an importance selection (the layers themselves come in `decoder_keep`).
    """
    from asr.models.loading import load_processor, load_whisper, save_whisper

    check_overwritable(out, PRUNING_REPORT, "asr prune")
    teacher = load_whisper(teacher_ref)
    if decoder_keep is None:
        if num_layers is None:
            raise AsrError("say which decoder layers to keep: --keep 0,5 or --num-layers K")
        decoder_keep = select_layers(teacher.config.decoder_layers, num_layers, strategy)
        chosen_by = strategy
    else:
        chosen_by = "importance" if scores is not None else "explicit"
    student = prune_whisper(teacher, decoder_keep, encoder_keep)
    tmp = out.with_name(out.name + ".tmp")
    save_whisper(student, tmp, load_processor(teacher_ref))
    report = {
        "teacher": teacher_ref, "strategy": chosen_by,
        "teacher_decoder_layers": teacher.config.decoder_layers, "decoder_keep": list(decoder_keep),
        "teacher_encoder_layers": teacher.config.encoder_layers,
        "encoder_keep": list(encoder_keep) if encoder_keep is not None else list(range(teacher.config.encoder_layers)),
        "teacher_params": count_parameters(teacher), "student_params": count_parameters(student),
        "alignment_heads": student.generation_config.alignment_heads,
    }
    if scores is not None:
        report["importance_scores"] = scores
    (tmp / PRUNING_REPORT).write_text(json.dumps(report, indent=2))
    replace_dir(tmp, out)
    return report
