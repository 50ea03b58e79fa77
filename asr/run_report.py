"""The run report: WER/CER and latency per checkpoint against the teacher and the pruned-untrained student."""
from __future__ import annotations

import json
from pathlib import Path

from asr.bench.outputs import longform_table, markdown_table
from asr.train.evaluate import read_jsonl, record_role, with_paired_teacher


def plot_report(records: list[dict], history: list[dict], path: Path) -> None:
    """Left: WER vs decoder ms/token for teacher, untrained student and every checkpoint. Right: loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in records:
        x, y = r.get("latency", {}).get("decoder_ms_per_token_p50"), r.get("wer")
        if x is None or y is None:
            continue
        style = {"teacher": ("*", "crimson", 240), "pruned-untrained": ("X", "gray", 120)}.get(
            r["model"], ("o", "steelblue", 60))
        left.scatter(x, 100 * y, marker=style[0], color=style[1], s=style[2], zorder=3)
        left.annotate(r["model"], (x, 100 * y), textcoords="offset points", xytext=(5, 3), fontsize=7)
    left.set(xlabel="decoder ms per token (p50, batch 1)", ylabel="WER (%)", yscale="symlog",
             title="WER vs decoder latency")
    left.grid(alpha=0.3)
    for key in ("loss", "ce", "kl"):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            right.plot(*zip(*points), label=key)
    right.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    if right.lines:
        right.legend()
    else:  # a report rebuilt from benches alone (no metrics.jsonl): say so rather than draw empty axes silently
        right.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=right.transAxes)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_ROLES = {"test": "test", "real": "real recordings", "dev": "dev, chooses final"}


def _column(r: dict) -> tuple[int, str, str]:
    return list(_ROLES).index(record_role(r)), r.get("algorithm", ""), r["dataset"]


def wer_by_set(records: list[dict]) -> str:
    """WER per model (rows) and eval set (columns): test sets first, then real recordings, then the dev sets that
    chose final/, each so marked: synthetic speech flatters students, so the kinds are never averaged together.
    Long-form records (with an `algorithm`) get a column per set and algorithm, after the short-form ones of
    their kind."""
    sets = sorted({_column(r) for r in records})
    models = list(dict.fromkeys(r["model"] for r in records))
    wer = {(r["model"], _column(r)): r["wer"] for r in records}
    roles = list(_ROLES.values())
    head = "| model | " + " | ".join(f"{name} ({roles[role]}{', long-form ' if algorithm else ''}{algorithm}) WER"
                                     for role, algorithm, name in sets) + " |"
    lines = [head, "|" + "---|" * (len(sets) + 1)]
    for model in models:
        cells = [wer.get((model, column)) for column in sets]
        lines.append(f"| {model} | " + " | ".join("-" if w is None else f"{100 * w:.1f}%" for w in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> str:
    """Write RUN/report.md and RUN/report.png; return the markdown."""
    records = read_jsonl(run_dir / "bench" / "checkpoints.jsonl")
    history = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "train-summary.json").read_text()) if (run_dir / "train-summary.json").is_file() else {}
    long_form = read_jsonl(run_dir / "bench" / "longform.jsonl")
    records = with_paired_teacher(records)
    teacher = next((r for r in records if r["model"] == "teacher" and "paired_timings" in r.get("latency", {})), None)
    timing = (f"Teacher latency: the median of its {teacher['latency']['paired_timings']} timings paired clip by clip "
              f"with the students.\n" if teacher else "")
    final = (run_dir / "final" / "SOURCE").read_text().strip() if (run_dir / "final" / "SOURCE").is_file() else "-"
    long_table = f"Long-form sets:\n\n{longform_table(long_form)}\n" if long_form else ""
    text = (f"# Run {run_dir.name}\n\n{wer_by_set(records + long_form)}\n{markdown_table(records)}\n"
            f"{long_table}{timing}"
            f"Final student: `{run_dir / 'final'}` = {final}.\n"
            f"Training: {summary.get('steps', len(history))} steps, {summary.get('skipped_nonfinite_steps', 0)} skipped "
            f"(non-finite loss); samples skipped on rank 0: {summary.get('skipped_samples_rank0') or 'none'}.\n\n"
            f"![report](report.png)\n")
    plot_report(records, history, run_dir / "report.png")
    (run_dir / "report.md").write_text(text)
    return text
