"""The pseudo-label folder as training reads it: how it was made, which clips finished, the stored teacher targets.

Training needs only this module of `asr.label`, so it never imports the labelling stage (and, through it, decoding).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SETTINGS = "pseudo-label.json"  # how the folder was made; a resumed run must use the same settings
SUMMARY = "summary.json"
PROGRESS = "progress"  # <run>-r<rank>.jsonl: one line per finished clip, kept or dropped
TOPK = "topk"  # <run>-r<rank>-<n>.safetensors: "<file>.ids" int32 [P, K], "<file>.logprobs" fp16 [P, K],
#               "<file>.states" fp16 [P, d]; "<file>.ts.<kind>" the same on the timestamped layout
TIMESTAMPED = "ts."  # prefix of a kind stored for the timestamped layout
KINDS = ("ids", "logprobs", "states")


def read_records(out: Path) -> list[dict]:
    """Every finished clip of every run so far (first record per clip; a torn last line of a killed run is
    ignored, that clip was not finished)."""
    seen: dict[str, dict] = {}
    for path in sorted((out / PROGRESS).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            seen.setdefault(record["source_id"], record)
    return list(seen.values())


def settings_of(folder: Path) -> dict | None:
    """How a pseudo-labelled folder was made (teacher, data, threshold, top_k, ...), or None if it was not."""
    path = Path(folder) / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else None


def read_teacher_targets(folder: Path, ids: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Cached teacher targets of the requested clips: id -> {"ids", "logprobs", "states", "ts.ids", ...} (those
    stored), each read from the file its progress record names (a killed run's unreferenced files are never read)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for record in read_records(Path(folder)):
        if record["kept"] and record["file_name"] in ids and record.get("topk_file"):
            by_file.setdefault(record["topk_file"], []).append(record["file_name"])
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, clips in sorted(by_file.items()):
        with safe_open(Path(folder) / TOPK / name, framework="pt") as f:
            keys = set(f.keys())
            for clip in clips:
                found[clip] = {kind: f.get_tensor(f"{clip}.{kind}")
                               for kind in (*KINDS, *(TIMESTAMPED + k for k in KINDS)) if f"{clip}.{kind}" in keys}
    return found
