"""How much does bf16 speed up Whisper's encoder on this CPU, and how far do its outputs move? The figures behind
`train.bf16: auto` (README, *bf16 on the CPU*).

Usage: python benchmarks/bf16_encoder.py --data DIR [--model whisper-base] [--clips 8] [--threads 1] [--out F.json]
DIR is any dataset `asr bench` reads (e.g. a synthetic test set under $ASR_CACHE/synth). The encoder runs on the
same clips, one at a time, in fp32, with its weights cast to bf16, and in fp32 under `torch.autocast(bf16)`; each
prints ms per clip (the median of the clips after one warm-up) and its outputs' relative L2 error against fp32's.
On a CPU without AVX512-BF16 or AMX bf16 is emulated and slower: the table says which this CPU has.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from asr.data.features import log_mel
from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.models.loading import load_processor, load_whisper


def encode(encoder, features: list[torch.Tensor], dtype: torch.dtype, autocast: bool, label: str):
    """Encoder outputs (fp32) and ms per clip: the median over the clips, after one untimed warm-up pass."""
    scope = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    outputs, times = [], []
    with torch.inference_mode(), scope:
        encoder(features[0].to(dtype))
        for mel in tqdm(features, desc=label, unit="clip"):
            start = time.perf_counter()
            out = encoder(mel.to(dtype)).last_hidden_state
            times.append(1000 * (time.perf_counter() - start))
            outputs.append(out.float())
    return outputs, statistics.median(times)


def relative_l2(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """‖out − ref‖ / ‖ref‖ over every clip's states together."""
    diff = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))
    return (diff / sum(float(r.pow(2).sum()) for r in reference)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset `asr bench` reads (directory or hub id)")
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stats = SkipStats()
    samples = list(iter_samples(open_dataset(DatasetRef.parse(args.data)), stats, limit=args.clips))
    if not samples:
        raise SystemExit(f"error: {args.data}: no usable clips ({stats.summary()}); pass a dataset with speech")
    extractor = load_processor(args.model).feature_extractor
    features = [log_mel(extractor, s.audio) for s in samples]
    fp32 = load_whisper(args.model).model.encoder
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    reference, fp32_ms = encode(fp32, features, torch.float32, False, "fp32")
    weights, weights_ms = encode(bf16, features, torch.bfloat16, False, "bf16 weights")
    autocast, autocast_ms = encode(fp32, features, torch.float32, True, "autocast bf16")
    result = {"model": args.model, "data": args.data, "clips": len(samples), "threads": args.threads,
              "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
              "ms_per_clip": {"fp32": fp32_ms, "bf16_weights": weights_ms, "autocast": autocast_ms},
              "relative_l2": {"bf16_weights": relative_l2(weights, reference),
                              "autocast": relative_l2(autocast, reference)}}
    print(f"{args.model} encoder, {len(samples)} clips of {args.data}, {args.threads} thread(s); "
          f"AVX512-BF16 {result['avx512_bf16']}, AMX {result['amx']}")
    print("| precision | ms/clip | speed-up | relative L2 vs fp32 |\n|---|---|---|---|")
    print(f"| fp32 | {fp32_ms:.0f} | 1.00x | - |")
    for name, ms in (("bf16_weights", weights_ms), ("autocast", autocast_ms)):
        print(f"| {name} | {ms:.0f} | {fp32_ms / ms:.2f}x | {100 * result['relative_l2'][name]:.1f}% |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
