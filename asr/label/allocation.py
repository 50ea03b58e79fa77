"""Pseudo-labelling across a Slurm allocation: one `srun` task per GPU (or per task Slurm gave the job), each
labelling its stride of the rows into the same folder, then one finishing call that writes the folder's metadata
and summary.

The prepare job of a recipe that pseudo-labels is given the training job's nodes and GPUs (`asr submit`), so the
teacher labels on every GPU of the allocation instead of on one node's CPU. A task's stride is fixed by the row
index (index % tasks == task id), not by what was finished when the task started, so tasks that start at
different times never label a clip twice; a re-run after a failure labels only the rows no task finished.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from asr.errors import AsrError
from asr.label.pseudo_label import PseudoLabelOptions


def allocation_tasks() -> int:
    """Tasks of the Slurm allocation this process runs in (1 outside Slurm, or when `srun` is not on PATH)."""
    if "SLURM_JOB_ID" not in os.environ or shutil.which("srun") is None:
        return 1
    return int(os.environ.get("SLURM_NTASKS", "1"))


def slurm_task() -> tuple[int, int]:
    """(task id, tasks) of this `srun` task."""
    try:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    except KeyError as missing:
        raise AsrError(f"--slurm-task: {missing.args[0]} is not set; it is for tasks started by srun "
                       "(`asr run` starts them inside an allocation), use --nproc elsewhere") from None


def cli_args(teacher: str, data: str, out: Path, opts: PseudoLabelOptions) -> list[str]:
    """The `asr pseudo-label` command line of these options (what each srun task runs)."""
    args = ["--teacher", teacher, "--data", data, "--out", str(out), "--wer-threshold", str(opts.wer_threshold),
            "--temperature", str(opts.temperature), "--max-new-tokens", str(opts.max_new_tokens),
            "--language", opts.language, "--batch-size", str(opts.batch_size)]
    args += ["--top-k", str(opts.top_k)] if opts.top_k else []
    args += ["--limit", str(opts.limit)] if opts.limit is not None else []
    args += ["--teacher-states"] * opts.teacher_states + ["--timestamps"] * opts.timestamps
    return args


def label_across_allocation(teacher: str, data: str, out: Path, opts: PseudoLabelOptions, tasks: int) -> None:
    """One srun step of `tasks` tasks, each `asr pseudo-label --slurm-task` on its GPU; returns when all finish."""
    gpus = ["--gpus-per-task=1"] if os.environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0") else []
    command = ["srun", f"--ntasks={tasks}", "--kill-on-bad-exit=1", *gpus, sys.executable, "-m", "asr",
               "pseudo-label", *cli_args(teacher, data, out, opts), "--slurm-task"]
    print(f"pseudo-labelling on {tasks} tasks of the allocation: {' '.join(command)}", flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise AsrError(f"pseudo-labelling failed in a task of the srun step (exit code {code}); see the log above, "
                       "then re-run the job: finished clips are kept")
