"""Bench outputs people read: the markdown table, the WER-vs-decoder-latency plot, and the W&B table."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(records: Sequence[dict]) -> str:
    """One row per (model, dataset): accuracy, size, latency split and the decoder ratio vs the model's teacher;
    then the notes a reader needs to trust the figures (skipped clips, what peak RSS covers)."""
    head = ("| model | dataset | n | WER | CER | S/D/I | repetition | params | enc/dec layers | enc ms p50 | "
            "dec ms/token p50 | total ms p50 / p95 | RTFx | process peak RSS MB | dec ratio measured / predicted |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        lat = r.get("latency", {})
        ratio = (f"{_num(r.get('measured_decoder_ratio'), '.2f')} / {_num(r.get('predicted_decoder_ratio'), '.2f')} "
                 f"vs {r.get('teacher')}" if r.get("model") != r.get("teacher") else "teacher")
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['n']} | {_pct(r['wer'])} | {_pct(r['cer'])} | "
            f"{r['substitutions']}/{r['deletions']}/{r['insertions']} | {_pct(r.get('repetition_rate'))} | "
            f"{r.get('params', 0) / 1e6:.1f}M | {r.get('encoder_layers', '-')}/{r.get('decoder_layers', '-')} | "
            f"{_num(lat.get('encoder_ms_p50'))} | {_num(lat.get('decoder_ms_per_token_p50'), '.2f')} | "
            f"{_num(lat.get('total_ms_p50'), '.0f')} / {_num(lat.get('total_ms_p95'), '.0f')} | "
            f"{_num(lat.get('rtfx'))} | {_num(lat.get('peak_rss_mb'), '.0f')} | {ratio} |")
    extras = [_extra_line(r) for r in records if "streaming" in r or "speculative" in r or "fallback" in r]
    skipped = {r["dataset"]: r["skipped_clips"] for r in records if r.get("skipped_clips")}
    notes = [f"- {dataset}: {sum(counts.values())} clip(s) skipped while loading, not scored ("
             + ", ".join(f"{n} {reason}" for reason, n in counts.items()) + ")." for dataset, counts in skipped.items()]
    notes.append("- Process peak RSS: this process's resident memory while the model was timed, with every model of "
                 "the table loaded at once: an upper bound for one model, and it never falls from row to row.")
    return "\n".join(lines + ([""] + extras if extras else []) + [""] + notes) + "\n"


def longform_table(records: Sequence[dict]) -> str:
    """One row per (model, set, long-form algorithm): accuracy, speed, looping and the timestamp checks."""
    head = ("| model | dataset | algorithm | files | audio min | WER | S/D/I | repetition | RTFx | timestamps sane | "
            "monotonic / inside / gaps ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['algorithm']} | {r['n']} | {r['audio_seconds'] / 60:.1f} | "
            f"{_pct(r['wer'])} | {r['substitutions']}/{r['deletions']}/{r['insertions']} | "
            f"{_pct(r['repetition_rate'])} | {_num(r['rtfx'])} | {_pct(r['sane_rate'])} | "
            f"{_pct(r['monotonic_rate'])} / {_pct(r['inside_rate'])} / {_pct(r['gaps_ok_rate'])} |")
    notes = ["- Timestamps sane: predicted segments monotonic, inside the audio, and no gap between two longer than "
             "the longest pause between the reference's sentences plus 1 s (speech skipped otherwise)."]
    return "\n".join(lines + [""] + notes) + "\n"


def _extra_line(r: dict) -> str:
    parts = [f"- {r['model']} on {r['dataset']}:"]
    if "streaming" in r:
        s = r["streaming"]
        parts.append(f"streaming {s['chunk_ms']} ms chunks: chunk latency p50 {s['chunk_latency_ms_p50']:.0f} ms, "
                     f"p95 {s['chunk_latency_ms_p95']:.0f} ms, final WER {_pct(s['wer'])}, "
                     f"final text {s['final_lag_ms_p50']:.0f} ms after the audio ends, "
                     f"keeps up with real time: {'yes' if s['keeps_up'] else 'no'}.")
    if "speculative" in r:
        s = r["speculative"]
        parts.append(f"speculative decoding with {s['assistant']}: {s['identical']}/{s['n']} outputs identical to "
                     f"greedy, {s['greedy_ms_p50']:.0f} → {s['speculative_ms_p50']:.0f} ms p50 "
                     f"({s['speedup']:.2f}x, {s['tokens_per_teacher_call']:.2f} tokens per teacher call).")
    if "fallback" in r:
        f = r["fallback"]
        parts.append(f"with temperature fallback: WER {_pct(f['wer'])} (greedy {_pct(r['wer'])}), repetition "
                     f"{_pct(f['repetition_rate'])} (greedy {_pct(r.get('repetition_rate'))}), "
                     f"{_pct(f['fallback_rate'])} of clips re-decoded.")
    return " ".join(parts)


def plot_wer_vs_latency(records: Sequence[dict], teachers: set[str], path: Path) -> None:
    """WER against decoder ms/token, one point per (model, dataset); teachers drawn as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        x, y = r.get("latency", {}).get("decoder_ms_per_token_p50"), r.get("wer")
        if x is None or y is None:
            continue
        teacher = r["model"] in teachers
        ax.scatter(x, 100 * y, marker="*" if teacher else "o", s=220 if teacher else 70,
                   color="crimson" if teacher else "steelblue", zorder=3)
        ax.annotate(f"{r['model']} ({r['dataset']})", (x, 100 * y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xlabel("decoder ms per generated token (p50, batch 1)")
    ax.set_ylabel("WER (%)")
    ax.set_yscale("symlog", linthresh=100)
    ax.grid(alpha=0.3)
    ax.set_title("WER vs decoder latency (★ = teacher)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(records: Sequence[dict], step: int | None = None) -> None:
    """Append the records to the active W&B run as a table (no-op without an active run)."""
    import wandb

    if wandb.run is None:
        return
    columns = ["model", "dataset", "n", "wer", "cer", "repetition_rate", "params", "decoder_layers",
               "encoder_ms_p50", "decoder_ms_per_token_p50", "total_ms_p50", "total_ms_p95", "rtfx", "peak_rss_mb"]
    table = wandb.Table(columns=columns)
    for r in records:
        lat = r.get("latency", {})
        table.add_data(*[r.get(c, lat.get(c)) for c in columns])
    wandb.log({"bench": table}, step=step)
