"""`asr bench-train`: training steps/s and samples/s of one recipe with the teacher's work done three ways.

- separate: teacher and student each run their own encoder on the log-mel features every step;
- shared: the frozen encoder runs once per batch and its states feed both decoders;
- live: encoder states cached once per clip, the teacher's decoder run every step;
- once: encoder states cached once per clip, and the live teacher's final decoder states computed once per clip
  at the start of the run (`train.cache_teacher`, exact KD, no pseudo-labels: the built-in KD recipes' set-up);
- cached: encoder states cached once per clip, and the teacher replaced by its cached top-K log-probs;
- states: the same, with the teacher's cached final decoder states (exact KD: one output projection per step).

All train on the same pseudo-labelled clips (made once by the recipe's pseudo-label stage, top-K and states), through the
real `Trainer.train_step`, at each process count: warm-up steps, then timed steps between barriers.
Checkpoints and tracking are off; evaluation loads one clip and never runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import yaml

from asr.config import PseudoLabelConfig, Recipe, recipe_to_dict
from asr.errors import AsrError

MODES = ("separate", "shared", "live", "once", "cached", "states")
RESULT = "throughput.json"


def mode_recipe(recipe: Recipe, mode: str, data_dir: str, nproc: int, total_steps: int) -> Recipe:
    """The recipe for one measurement: KD on the pseudo-labels, with the encoder/teacher set-up of `mode`."""
    r = dataclasses.replace
    return r(recipe,
             data=r(recipe.data, train=[data_dir], labels="pseudo", train_limit=None),
             objective=r(recipe.objective, method="kd",
                         teacher_cache={"cached": "top_k", "states": "states"}.get(mode, False)),
             train=r(recipe.train, max_steps=total_steps, nproc=nproc, freeze_encoder=True,
                     share_encoder=mode != "separate", cache_encoder=mode in ("live", "once", "cached", "states"),
                     cache_teacher=mode == "once",
                     save_every=10**9,
                     log_every=10**9),
             eval=r(recipe.eval, limit=1), tracking=r(recipe.tracking, wandb=False))


def measure(run_dir: Path, warmup: int, steps: int) -> dict | None:
    """One rank: build the Trainer, run warm-up steps, time `steps` steps; rank 0 writes RUN/throughput.json."""
    import torch.distributed as dist

    from asr.config import load_recipe
    from asr.train.loop import Trainer

    started = time.perf_counter()
    trainer = Trainer(run_dir, load_recipe(run_dir / "recipe.yaml"))
    for step in range(warmup):
        trainer.train_step(step)
    dist.barrier()
    setup = time.perf_counter() - started
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    begin, samples = time.perf_counter(), 0
    for step in range(warmup, warmup + steps):
        samples += trainer.train_step(step)[1]
    dist.barrier()
    seconds = time.perf_counter() - begin
    trainer.engine.destroy()
    if not trainer.dist.is_main:
        return None
    result = {"processes": trainer.dist.world, "steps": steps, "warmup": warmup, "seconds": seconds,
              "steps_per_s": steps / seconds, "samples_per_s": samples / seconds,
              "batch_size_per_process": trainer.recipe.train.batch_size, "setup_and_warmup_seconds": setup,
              "teacher_loaded": trainer.teacher is not None, "shared_encoder": trainer.shared_encoder,
              "cached_encoder_states": trainer.batches.encoder_states is not None,
              # the live teacher's states computed in the run (cached/states modes read pseudo-label folders)
              "teacher_states_cached": trainer.teacher is not None and trainer.batches.teacher_targets is not None,
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    (run_dir / RESULT).write_text(json.dumps(result, indent=2))
    return result


def labelled_recipe(recipe: Recipe, top_k: int, clips: int) -> Recipe:
    """The recipe whose data stage pseudo-labels the first `clips` clips of its first training set with top-K and
    final states, keeping every clip the teacher transcribes sanely: all set-ups then train on the same clips."""
    r = dataclasses.replace
    first = {"train": recipe.data.train[:1], "synth_train": None} if recipe.data.train else {}
    return r(recipe, data=r(recipe.data, **first, train_limit=clips,
                            pseudo_label=PseudoLabelConfig(wer_threshold=100.0, top_k=top_k, teacher_states=True)))


def bench_train(recipe: Recipe, student_dir: Path, out: Path, steps: int = 6, warmup: int = 2,
                nprocs: Sequence[int] = (1, 2), top_k: int = 16, clips: int = 32) -> list[dict]:
    """Measure every (mode, process count) on the resolved `labelled_recipe`'s pseudo-labels; writes
    out/bench-train.json and returns its rows."""
    from asr.train.torchrun import launch_training

    data_dir = recipe.data.train[0]
    rows = []
    for nproc in nprocs:
        for mode in MODES:
            run_dir = out / f"{mode}-np{nproc}"
            run_dir.mkdir(parents=True, exist_ok=True)
            student = run_dir / "student"
            if not student.exists():
                student.symlink_to(student_dir.resolve(), target_is_directory=True)
            (run_dir / RESULT).unlink(missing_ok=True)
            resolved = mode_recipe(recipe, mode, data_dir, nproc, warmup + steps)
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(resolved), sort_keys=False))
            code = launch_training(run_dir, nproc, "asr.train.throughput_bench", ("--warmup", str(warmup),
                                                                             "--steps", str(steps)))
            if code != 0 or not (run_dir / RESULT).is_file():
                raise AsrError(f"throughput run {run_dir} failed (exit code {code}); see the log above")
            rows.append({"mode": mode, **json.loads((run_dir / RESULT).read_text())})
    by_key = {(r["mode"], r["processes"]): r for r in rows}
    for r in rows:
        base = by_key[("separate", r["processes"])]
        r["speedup_vs_separate"] = r["samples_per_s"] / base["samples_per_s"]
    report = {"teacher": recipe.teacher, "student": str(student_dir), "data": data_dir, "top_k": top_k,
              "clips": clips, "steps": steps, "warmup": warmup, "rows": rows}
    (out / "bench-train.json").write_text(json.dumps(report, indent=2))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of the measurements, with (c)/(a) per process count."""
    lines = ["| mode | processes | steps/s | samples/s | vs separate |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['processes']} | {r['steps_per_s']:.3f} | {r['samples_per_s']:.2f} | "
                     f"{r['speedup_vs_separate']:.2f}x |")
    def ratios(mode: str) -> str:
        return ", ".join(f"{r['processes']} process(es) {r['speedup_vs_separate']:.2f}x"
                         for r in rows if r["mode"] == mode)

    return "\n".join(lines) + (f"\ncached encoder + live teacher / separate (a) samples/s: {ratios('live')}"
                               f"\nteacher states once per clip in the run / separate (a) samples/s: {ratios('once')}"
                               f"\ncached top-K (c) / separate (a) samples/s: {ratios('cached')}"
                               f"\ncached states (exact) / separate (a) samples/s: {ratios('states')}")


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of a throughput measurement (started by `asr bench-train`)")
    parser.add_argument("run_dir")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    import torch.distributed as dist

    code = 0
    try:
        measure(Path(args.run_dir), args.warmup, args.steps)
    except AsrError as exc:
        print(f"error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr, flush=True)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as asr.train.main: DeepSpeed can abort in interpreter teardown after a clean run


if __name__ == "__main__":
    main()
