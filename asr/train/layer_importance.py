"""Choose decoder layers by importance: greedily drop the layer whose removal changes the teacher's
next-token distribution least (KL(teacher ‖ pruned) on a calibration set), until K layers remain."""
from __future__ import annotations

import torch
from tqdm import tqdm

from asr.data.features import WhisperCollator, encode_sample
from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.errors import AsrError
from asr.models.loading import load_processor, load_whisper, local_device
from asr.train.objectives import kl_teacher_student


@torch.inference_mode()
def _decoder_logits(model, layers: list[int], batches: list[dict], encoder_states: list[torch.Tensor]) -> list:
    all_layers = model.model.decoder.layers
    model.model.decoder.layers = torch.nn.ModuleList([all_layers[i] for i in layers])
    try:
        return [model(encoder_outputs=(enc,), decoder_input_ids=b["decoder_input_ids"],
                      decoder_attention_mask=b["decoder_attention_mask"]).logits
                for b, enc in zip(batches, encoder_states)]
    finally:
        model.model.decoder.layers = all_layers


def select_by_importance(teacher_ref: str, calibration: str, num_layers: int, limit: int = 32,
                         batch_size: int = 8) -> tuple[list[int], list[dict]]:
    """Kept layer indices and the score table (one row per greedy round and candidate)."""
    teacher, processor = load_whisper(teacher_ref), load_processor(teacher_ref)
    n = teacher.config.decoder_layers
    if not 1 <= num_layers <= n:
        raise AsrError(f"cannot keep {num_layers} of {n} decoder layers; choose 1..{n}")
    stats = SkipStats()
    examples = [e for s in iter_samples(open_dataset(DatasetRef.parse(calibration)), stats, limit=limit)
                if (e := encode_sample(s, processor, teacher.generation_config)) is not None]
    if not examples:
        raise AsrError(f"{calibration}: no usable calibration clips ({stats.summary()})")
    collate = WhisperCollator(teacher.generation_config.pad_token_id)
    device = local_device()
    teacher.to(device)
    batches = [{k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
               for i in range(0, len(examples), batch_size)]
    with torch.inference_mode():
        encoder_states = [teacher.model.encoder(b["input_features"]).last_hidden_state for b in batches]
    reference = _decoder_logits(teacher, list(range(n)), batches, encoder_states)

    def score(layers: list[int]) -> float:
        logits = _decoder_logits(teacher, layers, batches, encoder_states)
        return sum(kl_teacher_student(s, t, b["labels"], temperature=1.0).item()
                   for s, t, b in zip(logits, reference, batches)) / len(batches)

    kept, table = list(range(n)), []
    with tqdm(total=sum(range(num_layers + 1, n + 1)), desc="scoring layer removals", unit="eval") as bar:
        while len(kept) > num_layers:
            scores = {}
            for layer in kept:
                scores[layer] = score([k for k in kept if k != layer])
                table.append({"round": n - len(kept) + 1, "drop": layer, "kl": scores[layer]})
                bar.update(1)
            dropped = min(scores, key=scores.get)
            kept.remove(dropped)
    print(f"importance: kept decoder layers {kept} (KL of the final choice {score(kept):.4f})")
    return kept, table
