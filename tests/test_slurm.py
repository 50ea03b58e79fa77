"""Slurm launch files on real Slurm daemons, not mocks: `slurm/local-cluster.sh` starts munged, slurmctld and two
slurmd (nodes n1, n2) on this machine, and `asr submit` sends real pipelines to them: a 2-node DeepSpeed run
benchmarked by its dependent job, a failing stage cancelling its dependents, a sweep as job arrays, and a
preempted run that checkpoints, requeues and resumes. Rendering and errors are also tested without Slurm."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asr.data.loading import DatasetRef, open_dataset
from asr.errors import AsrError
from asr.label.pseudo_label import source_id
from asr.slurm.render import Resources, plan_submission, render, set_directives, split_values, sweep_points

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
FAST_EVAL = {"limit": 2, "batch_size": 2, "max_new_tokens": 6, "latency_clips": 1, "warmup": 0}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def write_recipe(path: Path, teacher: str, data: Path, **train) -> Path:
    recipe = {"name": "slurm-test", "teacher": teacher, "prune": {"keep": [0, 3]},
              "data": {"train": [str(data)], "eval": [str(data)]}, "optim": {"lr": 1e-3}, "eval": FAST_EVAL,
              "train": {"max_steps": 3, "batch_size": 2, "save_every": 2, "log_every": 1, "nproc": 1,
                        "keep_last": 5, "zero_stage": 2, "threads_per_proc": 1, **train},
              "tracking": {"wandb": False}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_pseudo_label_recipe(path: Path, teacher: str, data: Path) -> Path:
    recipe = yaml.safe_load(write_recipe(path, teacher, data).read_text())
    recipe["data"]["pseudo_label"] = {"wer_threshold": 100.0, "batch_size": 2}
    path.write_text(yaml.safe_dump(recipe))
    return path


def asr(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


# --- without Slurm ----------------------------------------------------------------------------------------------

def test_sweep_values_and_directives():
    assert split_values("1e-5,3e-5") == ["1e-5", "3e-5"]
    assert split_values("[0,3],[0,1,2]") == ["[0,3]", "[0,1,2]"]
    assert sweep_points(["optim.lr=1,2", "train.seed=0,1"]) == [
        ["optim.lr=1", "train.seed=0"], ["optim.lr=1", "train.seed=1"],
        ["optim.lr=2", "train.seed=0"], ["optim.lr=2", "train.seed=1"]]
    script = "#!/bin/bash\n# doc\n#SBATCH --nodes=1\n#SBATCH --requeue\nset -e\n"
    assert set_directives(script, {"nodes": "4", "time": "1:00:00", "array": "0-2"}) == (
        "#!/bin/bash\n# doc\n#SBATCH --nodes=4\n#SBATCH --requeue\n#SBATCH --time=1:00:00\n#SBATCH --array=0-2\n"
        "set -e\n")


def test_dry_run_prints_scripts_writes_nothing_and_needs_no_slurm(tmp_path, micro_teacher, speech_folder):
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on this PATH
    proc = asr("submit", str(recipe), "train.max_steps=7", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-rank",
               "3", "--partition", "gpu", "--time", "2:00:00", "--account", "speech", "--run-dir", "run", "--dry-run",
               cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    run = tmp_path / "run"
    assert not run.exists()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=12",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --account=speech", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", f"#SBATCH --output={run}/logs/train-%j.log",
                 f"#SBATCH --export=ALL,ASR_ENV={run}/slurm/job.env", "PROCS_PER_NODE=4",
                 f"RUN_DIR={run}", "OVERRIDES=train.max_steps=7",
                 "--rdzv-backend=c10d", "--dependency=afterok:<prepare job id>", "--kill-on-invalid-dep=yes"):
        assert line in out, line
    plan = out[out.index("# ===== resource plan (asr plan) =====\n"):]  # after the scripts
    assert "slurm-test on 2 node(s) x 4 GPU(s) = 8 ranks, 80 GiB each: ZeRO-2" in plan and ": fits" in plan

    sweep = asr("submit", str(recipe), "--sweep", "optim.lr=1e-5,3e-5", "--run-dir", "sw", "--dry-run", cwd=tmp_path,
                env=env)
    assert sweep.returncode == 0, sweep.stderr
    assert "#SBATCH --array=0-1" in sweep.stdout and "--dependency=aftercorr:<prepare job id>" in sweep.stdout
    assert f"RUN_DIRS=({tmp_path}/sw/optim.lr=1e-5 {tmp_path}/sw/optim.lr=3e-5)" in sweep.stdout
    assert f"#SBATCH --output={tmp_path}/sw/logs/prepare-%A_%a.log" in sweep.stdout


def test_errors_stop_before_submission(tmp_path, micro_teacher, speech_folder):
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    bad = asr("submit", str(recipe), "optim.lrr=1", "--run-dir", "run", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "optim.lrr: unknown key" in bad.stderr
    bad_sweep = asr("submit", str(recipe), "--sweep", "optim.lr=", "--run-dir", "run", cwd=tmp_path, env=env)
    assert bad_sweep.returncode == 2 and "--sweep 'optim.lr=' is not key=value1,value2" in bad_sweep.stderr
    no_slurm = asr("submit", str(recipe), "--run-dir", "run", cwd=tmp_path, env=env)
    assert no_slurm.returncode == 2 and "sbatch not found" in no_slurm.stderr and "Traceback" not in no_slurm.stderr
    assert not (tmp_path / "run").exists()


def test_plan_defaults_to_recipe_nproc(tmp_path, micro_teacher, speech_folder):
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder, nproc=3)
    plan = render(plan_submission(recipe, [], [], tmp_path / "run", Resources(nodes=2)))
    assert plan.procs_per_node == 3 and "#SBATCH --cpus-per-task=3" in plan.files["train.sbatch"]
    assert plan_submission(recipe, [], [], None, Resources(gpus_per_node=8)).procs_per_node == 8


def test_train_job_asks_for_the_cores_of_its_ranks_and_their_loading_workers(tmp_path, micro_teacher,
                                                                             speech_folder):
    """One task per node runs all its ranks: --cpus-per-task = ranks x (threads + data.num_workers when the data
    streams), for GPU jobs too (Slurm's default, often one core, would feed 8 GPUs)."""
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder)  # train.threads_per_proc: 1

    def train_script(overrides: list[str], **resources) -> str:
        plan = render(plan_submission(recipe, overrides, [], tmp_path / "run", Resources(**resources)))
        assert "--cpus-per-task" not in plan.files["prepare.sbatch"] + plan.files["bench.sbatch"]
        return plan.files["train.sbatch"]

    streamed = train_script(["data.streaming=true", "data.num_workers=3"], nodes=2, gpus_per_node=8)
    assert "#SBATCH --cpus-per-task=32" in streamed and "#SBATCH --gpus-per-node=8" in streamed
    assert "#SBATCH --cpus-per-task=4" in train_script([], gpus_per_node=4)  # in memory: no loading workers
    assert "#SBATCH --cpus-per-task=6" in train_script(["data.streaming=true", "data.num_workers=0"], gpus_per_node=6)
    assert "#SBATCH --cpus-per-task=20" in train_script([], gpus_per_node=4, cpus_per_rank=5)
    with pytest.raises(AsrError, match="--cpus-per-rank must be at least 1"):
        plan_submission(recipe, [], [], tmp_path / "run", Resources(cpus_per_rank=0))


def test_a_recipe_that_pseudo_labels_gets_the_training_allocation_for_its_prepare_job(tmp_path, micro_teacher,
                                                                                      speech_folder):
    plain = write_recipe(tmp_path / "plain.yaml", str(micro_teacher), speech_folder)
    labels = write_pseudo_label_recipe(tmp_path / "labels.yaml", str(micro_teacher), speech_folder)
    gpus = Resources(nodes=4, gpus_per_node=8)
    assert "#SBATCH --ntasks=1\n" in render(plan_submission(plain, [], [], tmp_path / "a", gpus)).files["prepare.sbatch"]
    prepare = render(plan_submission(labels, [], [], tmp_path / "b", gpus)).files["prepare.sbatch"]
    for line in ("--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=1"):
        assert f"#SBATCH {line}\n" in prepare


# --- on a local Slurm cluster ----------------------------------------------------------------------------------

def _missing_slurm() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root and adds node names to /etc/hosts"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (make setup installs slurmctld slurmd slurm-client munge)"
    return None


@pytest.fixture(scope="module")
def cluster():
    """A 2-node Slurm cluster on this machine for the tests of this module; stopped afterwards."""
    reason = _missing_slurm()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    start = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", "2"], capture_output=True, text=True,
                           timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    conf = start.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf)
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            yield conf
        finally:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def submit(root: Path, *args: str) -> dict[str, str]:
    """`asr submit ... --run-dir ROOT` from ROOT's parent; returns stage -> job id."""
    proc = asr("submit", *args, "--run-dir", root.name, cwd=root.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = json.loads((root / "slurm" / "jobs.json").read_text())
    assert f"job {jobs['train']:>8}" in proc.stdout and "checkpoint and requeue" in proc.stdout, proc.stdout
    return jobs


def job_states(jobs: list[str]) -> dict[str, str]:
    """Job (or array task, `12_0`) -> state, from squeue (finished jobs stay listed for MinJobAge)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs), "-o", "%i %T"],
                         capture_output=True, text=True, timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def show_logs(*dirs: Path) -> str:
    text = []
    for d in dirs:
        for log in sorted(d.rglob("*.log")):
            text.append(f"--- {log}\n{log.read_text(errors='replace')[-2500:]}")
    return "\n".join(text)


def wait_for(jobs: dict[str, str], logs: Path, timeout: float = 240) -> dict[str, str]:
    """Wait until every job (and array task) of a pipeline has finished; returns their states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(list(jobs.values()))
        if states and all(s in FINAL for s in states.values()):
            return states
        time.sleep(2)
    subprocess.run(["scancel", *jobs.values()], timeout=30)
    pytest.fail(f"jobs {jobs} still running after {timeout} s: {job_states(list(jobs.values()))}\n{show_logs(logs)}")


def test_two_node_deepspeed_run_is_benchmarked_by_its_dependent_job(cluster, tmp_path, micro_teacher,
                                                                    speech_folder):
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder)
    run = tmp_path / "run"
    jobs = submit(run, str(recipe), "train.max_steps=3", "--nodes", "2", "--procs-per-node", "1")
    states = wait_for(jobs, run / "logs")
    assert states == {jobs[s]: "COMPLETED" for s in ("prepare", "train", "bench")}, show_logs(run / "logs")
    train = jobs["train"]
    # one torchrun per node, both in one c10d rendezvous: 2 ranks, so ZeRO-2 saved 2 optimizer shards
    node_logs = {p.name: p.read_text() for p in (run / "logs").glob(f"train-{train}-0-*.log")}
    assert set(node_logs) == {f"train-{train}-0-n1.log", f"train-{train}-0-n2.log"}, show_logs(run / "logs")
    assert "[default0]:step 3/3" in "".join(node_logs.values())
    assert len(list((run / "logs" / "ranks").glob(f"{train}_*/attempt_0/0/stdout.log"))) == 2
    assert sorted(p.name for p in (run / "checkpoints" / "step-000003" / "ds").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 3
    # the dependent bench job wrote the report of every checkpoint
    report = (run / "report.md").read_text()
    assert "| step-2 |" in report and "| step-3 |" in report and "| teacher |" in report
    assert "| step-3 |" in (run / "logs" / f"bench-{jobs['bench']}.log").read_text()


def test_failing_stage_cancels_its_dependents(cluster, tmp_path, speech_folder):
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "no-such-teacher"), speech_folder)
    jobs = submit(tmp_path / "run", str(recipe))
    logs = tmp_path / "run" / "logs"
    states = wait_for(jobs, logs, timeout=120)
    assert states == {jobs["prepare"]: "FAILED", jobs["train"]: "CANCELLED", jobs["bench"]: "CANCELLED"}
    assert "no-such-teacher" in (logs / f"prepare-{jobs['prepare']}.log").read_text()
    for stage in ("train", "bench"):  # never started: no log, no start time
        assert not (logs / f"{stage}-{jobs[stage]}.log").exists()
        info = subprocess.run(["scontrol", "show", "job", jobs[stage]], capture_output=True, text=True).stdout
        assert "JobState=CANCELLED" in info and "Reason=DependencyNeverSatisfied" in info, info


@pytest.mark.slow  # another full Slurm round trip (~45 s); the fast tier keeps the two-node run and preemption
def test_sweep_runs_one_directory_per_value_as_job_arrays(cluster, tmp_path, micro_teacher, speech_folder):
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder, max_steps=2)
    root = tmp_path / "sweep"
    jobs = submit(root, str(recipe), "--sweep", "optim.lr=1e-3,3e-4")
    states = wait_for(jobs, root)
    assert states == {f"{jobs[s]}_{i}": "COMPLETED" for s in ("prepare", "train", "bench") for i in (0, 1)}, \
        show_logs(root)
    for i, (name, lr) in enumerate([("optim.lr=1e-3", 1e-3), ("optim.lr=3e-4", 3e-4)]):
        run = root / name
        assert yaml.safe_load((run / "recipe.yaml").read_text())["optim"]["lr"] == lr
        assert f"-> {run}" in (root / "logs" / f"prepare-{jobs['prepare']}_{i}.log").read_text()
        assert "| step-2 |" in (run / "report.md").read_text()
        assert json.loads(next(iter((run / "metrics.jsonl").read_text().splitlines())))["lr"] == lr


@pytest.mark.slow  # another Slurm round trip (130 s); the fast tier keeps the two-node run
def test_pseudo_labels_in_one_srun_step_over_the_allocation(cluster, tmp_path, monkeypatch, speech_folder):
    """The prepare job of a recipe that pseudo-labels holds both nodes; the teacher labels in one srun step of two
    tasks, each the rows of its stride, the job then finishes the folder once, and training uses it."""
    monkeypatch.setenv("ASR_CACHE", str(tmp_path / "cache"))  # a folder labelled by an earlier run would be reused
    recipe = write_pseudo_label_recipe(tmp_path / "r.yaml", "whisper-tiny.en", speech_folder)
    run = tmp_path / "run"
    jobs = submit(run, str(recipe), "--nodes", "2", "--procs-per-node", "1")
    states = wait_for(jobs, run / "logs", timeout=420)
    assert set(states.values()) == {"COMPLETED"}, show_logs(run / "logs")
    log = (run / "logs" / f"prepare-{jobs['prepare']}.log").read_text()
    assert "pseudo-labelling on 2 tasks of the allocation: srun --ntasks=2" in log, log[-3000:]
    ds = open_dataset(DatasetRef.parse(str(speech_folder))).select_columns(["audio"])
    order = [source_id(row["audio"], i) for i, row in enumerate(ds)]
    for task in (0, 1):
        assert f"pseudo-labelling task {task} of 2: transcribed {len(order[task::2])} clips" in log, log[-3000:]
    out = Path(log.split("pseudo-labelled ")[1].split(" -> ")[1].split()[0])
    assert f"pseudo-labelled {len(order)} clips with whisper-tiny.en" in log and "this run transcribed 0 in" in log
    by_task = {p.stem.rsplit("-", 1)[1]: [json.loads(line)["source_id"] for line in p.read_text().splitlines()]
               for p in (out / "progress").glob("*.jsonl")}
    assert by_task == {"r0": order[0::2], "r1": order[1::2]}  # each task its stride, in row order, once
    assert json.loads((out / "summary.json").read_text())["labelled"] == len(order)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["train"] == [str(out)]
    assert "| step-3 |" in (run / "report.md").read_text()


@pytest.mark.slow  # a Slurm requeue round trip (110 s); the fast tier keeps preemption (test_reliability)
def test_warning_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, micro_teacher, speech_folder):
    steps = 40
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder, max_steps=steps,
                          save_every=steps, nproc=2)
    run = tmp_path / "run"
    jobs = submit(run, str(recipe))
    train = jobs["train"]
    first = run / "logs" / f"train-{train}-0-n1.log"
    deadline = time.monotonic() + 180
    while not (first.is_file() and f"step 2/{steps}" in first.read_text()):
        assert time.monotonic() < deadline and job_states([train]).get(train) not in FINAL, show_logs(run / "logs")
        time.sleep(0.5)
    # what Slurm does 300 s before the time limit (--signal=B:USR1@300): SIGUSR1 to the batch script only
    subprocess.run(["scancel", "--signal=USR1", "--batch", train], check=True, timeout=30)
    states = wait_for(jobs, run / "logs")
    assert set(states.values()) == {"COMPLETED"}, show_logs(run / "logs")
    batch_log = (run / "logs" / f"train-{train}.log").read_text()
    assert "SIGUSR1: asking the ranks to checkpoint" in batch_log and f"requeueing job {train}" in batch_log
    assert "train attempt 1:" in batch_log
    stopped = first.read_text()
    assert "preempted: checkpoint at step" in stopped, stopped[-3000:]
    at = int(stopped.split("preempted: checkpoint at step ")[1].split()[0])
    assert 2 <= at < steps
    resumed = (run / "logs" / f"train-{train}-1-n1.log").read_text()
    assert f"resumed from {run / 'checkpoints' / f'step-{at:06d}'} at step {at}" in resumed
    assert f"step {steps}/{steps}" in resumed
    info = subprocess.run(["scontrol", "show", "job", train], capture_output=True, text=True).stdout
    assert "Restarts=1" in info, info
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert not (run / "PREEMPTED").exists() and not (run / "PREEMPT").exists()
    report = (run / "report.md").read_text()
    assert f"| step-{at} |" in report and f"| step-{steps} |" in report
