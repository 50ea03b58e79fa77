"""Plan a Slurm submission and render its files: the sbatch scripts of `slurm/` with this submission's #SBATCH
lines, and `job.env` with its values (run directory, recipe, overrides, ranks per node, the Python to use).

A plain run renders into RUN/slurm/ and logs into RUN/logs/. A sweep is one job array per stage: array task i
runs RUN_DIRS[i] with SWEEP_OVERRIDES[i] (both listed in ROOT/slurm/job.env), and its stage logs go to
ROOT/logs/<stage>-<array job>_<task>.log.
"""
from __future__ import annotations

import datetime
import itertools
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from asr.config import Recipe, load_recipe
from asr.data.loading import streaming_of
from asr.errors import AsrError

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "slurm"
STAGES = ("prepare", "train", "bench")


@dataclass
class Resources:
    """What the jobs ask Slurm for. procs_per_node=None: GPUs per node, else the recipe's train.nproc;
    cpus_per_rank=None: what the recipe's ranks use (cpus_per_rank)."""

    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None
    cpus_per_rank: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None


@dataclass
class Plan:
    """One submission: the recipe, its runs (one, or one per sweep point) and where files and logs go."""

    recipe: Path
    overrides: list[str]
    root: Path  # holds slurm/ and logs/: the run directory, or the parent of a sweep's run directories
    runs: list[Path]
    sweep_overrides: list[list[str]]  # per run; empty lists for a plain run
    resources: Resources
    procs_per_node: int
    cpus_per_rank: int
    name: str
    labels: bool = False  # the recipe pseudo-labels in its prepare stage (which then gets the training nodes)
    files: dict[str, str] = field(default_factory=dict)  # file name in ROOT/slurm -> text, filled by render()

    @property
    def is_sweep(self) -> bool:
        return any(self.sweep_overrides)

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    def log(self, stage: str, job: str = "%j") -> Path:
        """The batch log of a stage (Slurm patterns: %j job id, %A_%a array job and task)."""
        return self.root / "logs" / (f"{stage}-%A_%a.log" if self.is_sweep else f"{stage}-{job}.log")


def split_values(text: str) -> list[str]:
    """Split sweep values at commas outside brackets: `1e-5,3e-5` and `[0,3],[0,1]` both work."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return values


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """`key=v1,v2` items -> every combination as a list of overrides ([[]] when there is no sweep)."""
    axes = []
    for item in sweeps:
        key, sep, raw = item.partition("=")
        values = split_values(raw) if sep else []
        if not key or not values or any(not v for v in values):
            raise AsrError(f"--sweep '{item}' is not key=value1,value2,... (e.g. --sweep optim.lr=1e-5,3e-5)")
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def run_name(overrides: list[str]) -> str:
    """Directory name of one sweep point, e.g. `optim.lr=3e-5`."""
    return ",".join(overrides).replace("/", "_").replace(" ", "") or "run"


def plan_submission(recipe: Path, overrides: list[str], sweeps: list[str], run_dir: Path | None,
                    resources: Resources) -> Plan:
    """Validate the recipe with every sweep point (config errors stop here, before anything is submitted)."""
    for item in overrides + sweeps:
        if any(c.isspace() for c in item):
            raise AsrError(f"'{item}': the batch scripts split overrides at spaces; write it without them "
                           "(e.g. prune.keep=[0,3])")
    if resources.nodes < 1 or resources.gpus_per_node < 0 or any(
            n is not None and n < 1 for n in (resources.procs_per_node, resources.cpus_per_rank)):
        raise AsrError("--nodes, --procs-per-node and --cpus-per-rank must be at least 1 and --gpus-per-node at "
                       "least 0")
    points = sweep_points(sweeps)
    recipes = [load_recipe(recipe, overrides + point) for point in points]
    names = [run_name(point) for point in points]
    if len(set(names)) != len(names):
        raise AsrError(f"--sweep gives the same run directory twice ({', '.join(names)}); list each value once")
    name = recipes[0].name
    root = (run_dir or Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    if "," in str(root):
        raise AsrError(f"{root}: Slurm's --export cannot pass a path with a comma; choose another --run-dir")
    runs = [root / n for n in names] if sweeps else [root]
    procs = resources.procs_per_node or resources.gpus_per_node or recipes[0].train.nproc
    cpus = resources.cpus_per_rank or max(cpus_per_rank(r) for r in recipes)
    return Plan(recipe=recipe.resolve(), overrides=list(overrides), root=root, runs=runs, sweep_overrides=points,
                resources=resources, procs_per_node=procs, cpus_per_rank=cpus, name=name,
                labels=any(r.data.pseudo_label is not None for r in recipes))


def cpus_per_rank(recipe: Recipe) -> int:
    """CPU cores one rank keeps busy: its own threads (train.threads_per_proc, else one: a GPU rank mostly
    launches kernels) and, when the data streams, one per loading worker (data.num_workers)."""
    return (recipe.train.threads_per_proc or 1) + (recipe.data.num_workers if streaming_of(recipe) else 0)


def set_directives(script: str, directives: dict[str, str | None]) -> str:
    """Replace the script's `#SBATCH --key[=value]` lines named in `directives`; add the others after them."""
    lines = script.splitlines()
    todo = dict(directives)
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))

    def line_for(key: str) -> str:
        value = todo.pop(key)
        return f"#SBATCH --{key}" + ("" if value is None else f"={value}")

    out = []
    for i, line in enumerate(lines):
        if line.startswith("#SBATCH --"):
            key = line[len("#SBATCH --"):].split("=", 1)[0].strip()
            out.append(line_for(key) if key in todo else line)
        else:
            out.append(line)
        if i == last:
            out.extend(line_for(key) for key in list(todo))
    return "\n".join(out) + "\n"


def directives(plan: Plan, stage: str) -> dict[str, str | None]:
    """The #SBATCH settings of one stage of this submission."""
    r = plan.resources
    d: dict[str, str | None] = {"job-name": f"{plan.name}-{stage}", "output": str(plan.log(stage)),
                                "export": f"ALL,ASR_ENV={plan.slurm_dir / 'job.env'}"}
    if stage == "train":
        # one task per node runs all its ranks: without cpus-per-task they share the cluster's default (often 1)
        d.update({"nodes": str(r.nodes), "ntasks-per-node": "1",
                  "cpus-per-task": str(plan.procs_per_node * plan.cpus_per_rank)})
        if r.gpus_per_node:
            d["gpus-per-node"] = str(r.gpus_per_node)
    if stage == "prepare" and plan.labels:  # the teacher labels with one task per GPU (asr.label.allocation)
        d.update({"nodes": str(r.nodes), "ntasks": str(r.nodes * plan.procs_per_node),
                  "ntasks-per-node": str(plan.procs_per_node), "cpus-per-task": str(plan.cpus_per_rank)})
        if r.gpus_per_node:
            d["gpus-per-node"] = str(r.gpus_per_node)
    for key in ("partition", "time", "account"):
        if getattr(r, key):
            d[key] = getattr(r, key)
    if plan.is_sweep:
        d["array"] = f"0-{len(plan.runs) - 1}"
    return d


def job_env(plan: Plan) -> str:
    """The values the three scripts read (sourced by bash; every value shell-quoted)."""
    q = shlex.quote
    lines = [f"# Written by `asr submit` at {datetime.datetime.now():%Y-%m-%d %H:%M:%S}; sourced by the sbatch "
             "scripts next to this file.",
             f"PYTHON={q(sys.executable)}",
             f"RECIPE={q(str(plan.recipe))}",
             f"OVERRIDES={q(' '.join(plan.overrides))}",
             f"PROCS_PER_NODE={plan.procs_per_node}"]
    if plan.is_sweep:
        lines += ["# Sweep: array task i runs RUN_DIRS[i] with SWEEP_OVERRIDES[i] added to OVERRIDES.",
                  "RUN_DIRS=(" + " ".join(q(str(r)) for r in plan.runs) + ")",
                  "SWEEP_OVERRIDES=(" + " ".join(q(" ".join(o)) for o in plan.sweep_overrides) + ")",
                  'RUN_DIR=${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}',
                  'OVERRIDES="$OVERRIDES ${SWEEP_OVERRIDES[$SLURM_ARRAY_TASK_ID]}"']
    else:
        lines.append(f"RUN_DIR={q(str(plan.runs[0]))}")
    return "\n".join(lines) + "\n"


def render(plan: Plan) -> Plan:
    """Fill plan.files: job.env and <stage>.sbatch for each stage, from the scripts in slurm/."""
    if not SCRIPTS_DIR.is_dir():
        raise AsrError(f"{SCRIPTS_DIR}: the sbatch scripts are missing; asr submit needs the source checkout "
                       "(pip install -e .)")
    plan.files = {"job.env": job_env(plan)}
    for stage in STAGES:
        template = (SCRIPTS_DIR / f"{stage}.sbatch").read_text()
        plan.files[f"{stage}.sbatch"] = set_directives(template, directives(plan, stage))
    return plan


def write_files(plan: Plan) -> None:
    """Write the rendered files into ROOT/slurm and create the log directories (Slurm does not)."""
    plan.slurm_dir.mkdir(parents=True, exist_ok=True)
    (plan.root / "logs").mkdir(exist_ok=True)
    for run in plan.runs:
        (run / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in plan.files.items():
        path = plan.slurm_dir / name
        path.write_text(text)
        if name.endswith(".sbatch"):
            path.chmod(0o755)
