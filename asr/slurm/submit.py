"""Submit a rendered plan as dependent Slurm jobs: prepare → train → bench, each starting only after the
previous one succeeded (`--dependency=afterok`, array tasks `aftercorr`) and cancelled if it failed
(`--kill-on-invalid-dep=yes`)."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

from asr.errors import AsrError
from asr.slurm.render import STAGES, Plan, write_files


def sbatch_command(plan: Plan, stage: str, after: str | None) -> list[str]:
    """The sbatch call of one stage; `after` is the job id it waits for."""
    cmd = ["sbatch", "--parsable"]
    if after is not None:
        kind = "aftercorr" if plan.is_sweep else "afterok"  # array task i waits for task i of the previous stage
        cmd += [f"--dependency={kind}:{after}", "--kill-on-invalid-dep=yes"]
    return cmd + [str(plan.slurm_dir / f"{stage}.sbatch")]


def require_sbatch() -> None:
    if shutil.which("sbatch") is None:
        raise AsrError("sbatch not found: asr submit needs a Slurm client (run it on a login node, or apt-get "
                       "install slurm-client); --dry-run prints the scripts without Slurm")


def sbatch(cmd: list[str]) -> str:
    """Run sbatch and return the job id it printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    job = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job.isdigit():
        raise AsrError(f"{shlex.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}")
    return job


def submit(plan: Plan) -> dict[str, str]:
    """Write the files and submit the three stages; returns stage -> job id (also written to slurm/jobs.json)."""
    require_sbatch()
    write_files(plan)
    jobs: dict[str, str] = {}
    try:
        for stage in STAGES:
            jobs[stage] = sbatch(sbatch_command(plan, stage, jobs.get(STAGES[STAGES.index(stage) - 1])))
    except AsrError as exc:
        if jobs:
            subprocess.run(["scancel", *jobs.values()], capture_output=True, timeout=60)
            raise AsrError(f"{exc} (cancelled the jobs already submitted: {', '.join(jobs.values())})") from None
        raise
    (plan.slurm_dir / "jobs.json").write_text(json.dumps(jobs, indent=2) + "\n")
    return jobs


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summary(plan: Plan, jobs: dict[str, str]) -> str:
    """What was submitted, where each log goes, and how to watch or cancel it."""
    r = plan.resources
    ranks = f"{r.nodes} node(s) x {plan.procs_per_node} rank(s)" + (f", {r.gpus_per_node} GPU(s)/node"
                                                                     if r.gpus_per_node else " on CPU (gloo)")
    first = plan.runs[0]
    lines = [f"submitted {plan.name}: {len(plan.runs)} run(s) in {_rel(plan.root)}" +
             (f" (array tasks 0-{len(plan.runs) - 1})" if plan.is_sweep else "")]
    for stage, job in jobs.items():
        log = plan.log(stage, job)
        if plan.is_sweep:
            log = log.with_name(log.name.replace("%A_%a", f"{job}_<task>"))
        what = {"prepare": "data + pruned student", "train": ranks, "bench": "report.md"}[stage]
        lines.append(f"  {stage:8} job {job:>8}  {what:38} log {_rel(log)}")
    train = jobs.get("train", "%j")
    lines.append(f"  per node: {_rel(first / 'logs')}/train-{train}-<attempt>-<node>.log, per rank: "
                 f"{_rel(first / 'logs' / 'ranks')}/")
    if plan.is_sweep:
        lines += [f"  task {i}: {_rel(run)}  ({' '.join(o)})" for i, (run, o) in
                  enumerate(zip(plan.runs, plan.sweep_overrides))]
    ids = ",".join(jobs.values())
    lines.append(f"watch: squeue -j {ids}    cancel: scancel {ids.replace(',', ' ')}    "
                 f"checkpoint and requeue: scancel --signal=USR1 --batch {train}")
    return "\n".join(lines)


def resource_plans(plan: Plan, gpu_mem_gib: float, hours: float | None) -> str:
    """`asr plan` of each run on the training job's GPUs (one per sweep point)."""
    from asr.config import load_recipe
    from asr.train.resource_plan import Allocation, format_plan, plan_resources

    alloc = Allocation(plan.resources.nodes, plan.resources.gpus_per_node, gpu_mem_gib)
    return "\n".join(format_plan(plan_resources(load_recipe(plan.recipe, plan.overrides + point), alloc, hours))
                     + "\n" for point in plan.sweep_overrides)


def dry_run(plan: Plan, gpu_mem_gib: float, hours: float | None = None) -> str:
    """Every rendered file and the sbatch commands, without writing or submitting anything; with GPUs, the
    resource plan of the training job too."""
    parts = [f"# ===== {plan.slurm_dir / name} =====\n{text}" for name, text in plan.files.items()]
    previous = None
    commands = []
    for stage in STAGES:
        commands.append(shlex.join(sbatch_command(plan, stage, previous)))
        previous = f"<{stage} job id>"
    parts.append("# ===== submission (dry run: nothing written or submitted) =====\n" + "\n".join(commands) + "\n")
    if plan.resources.gpus_per_node:
        parts.append("# ===== resource plan (asr plan) =====\n" + resource_plans(plan, gpu_mem_gib, hours))
    return "\n".join(parts)
