"""Is model A's WER really different from model B's on the same clips? A paired bootstrap over clips.

Usage: python benchmarks/paired_wer.py A.jsonl B.jsonl [--resamples 10000]
A and B are `asr bench` per-clip files (clips-<model>-<dataset>.jsonl) of the same dataset. Prints both WERs,
A - B in points, and the 95% interval of A - B when the clips are resampled with replacement: an interval that
straddles 0 means this eval set cannot tell the two apart. JSON of the same figures goes to stdout's last line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jiwer
import numpy as np


def clip_errors(path: Path) -> dict[str, tuple[int, int]]:
    """clip id -> (word errors, reference words) on the normalized texts `asr bench` scored."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        words = jiwer.process_words(row["ref_norm"], row["hyp_norm"] or "")
        out[row["id"]] = (words.substitutions + words.deletions + words.insertions, len(row["ref_norm"].split()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--resamples", type=int, default=10000)
    args = parser.parse_args()
    a, b = clip_errors(args.a), clip_errors(args.b)
    if set(a) != set(b):
        raise SystemExit(f"error: {args.a} and {args.b} hold different clips; bench both models on the same data")
    ids = sorted(a)
    ea, eb, words = (np.array([x[i][k] for i in ids]) for x, k in ((a, 0), (b, 0), (a, 1)))
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ids), (args.resamples, len(ids)))
    diffs = 100 * (ea[picks].sum(1) - eb[picks].sum(1)) / words[picks].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    result = {"clips": len(ids), "words": int(words.sum()), "wer_a": 100 * ea.sum() / words.sum(),
              "wer_b": 100 * eb.sum() / words.sum(), "a_minus_b": 100 * (ea.sum() - eb.sum()) / words.sum(),
              "ci95": [float(low), float(high)]}
    print(f"{args.a.name}: {result['wer_a']:.1f}%  {args.b.name}: {result['wer_b']:.1f}%  A - B: "
          f"{result['a_minus_b']:+.1f} points, 95% paired bootstrap interval [{low:+.1f}, {high:+.1f}] "
          f"over {len(ids)} clips ({result['words']} words)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
