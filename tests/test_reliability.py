"""Reliability: kill -9 at any point and re-run resumes with the same loss curve; a full disk keeps the last
checkpoint; NaN/inf losses are skipped, counted and stop the run; hostile input is skipped and counted (data) or
stops the run before any work (configuration), with a one-line `error: ...` and exit code 2."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.errors import AsrError
from asr.models.loading import load_whisper
from asr.models.registry import resolve_model
from asr.train.checkpoint import COMPLETE, is_complete, latest_checkpoint, load_checkpoint
from test_train import asr_run, assert_same_curve, losses, write_recipe

TINY_EVAL = {"limit": 1, "max_new_tokens": 2, "latency_clips": 1, "warmup": 0}
EXPECTED_SKIPS = {"undecodable audio": 1, "missing audio file": 1, "empty transcript": 1, "audio out of range": 1}


def fast_recipe(path: Path, teacher: Path, train_data: Path, eval_data: Path, **sections) -> Path:
    """test_train's recipe on one process: 4 steps, a checkpoint every 2, the smallest per-checkpoint bench."""
    recipe = {"train": {"nproc": 1, "max_steps": 4, "save_every": 2}, "eval": TINY_EVAL, "tracking": {"wandb": False}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    data = yaml.safe_load(write_recipe(path, str(teacher), train_data, **recipe).read_text())
    data["data"]["eval"] = [str(eval_data)]
    path.write_text(yaml.safe_dump(data))
    return path


def asr(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def assert_cli_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, no traceback, and a last line `error: ...` holding every fragment."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), (proc.stdout[-2000:],
                                                                              proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


# --- killing a run ------------------------------------------------------------------------------------------------

def start_run(recipe: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """`asr run` in its own process group (torchrun runs in it too), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "asr", "run", str(recipe), "--run-dir", str(run_dir)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def rank_pids(run_dir: Path) -> list[int]:
    """The training ranks of a run (torchrun starts each in a session of its own, outside the launcher's group)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if b"asr.train.main" in args and str(run_dir).encode() in args:
            pids.append(int(proc.name))
    return pids


def wait_for(condition, launcher: subprocess.Popen, log: Path, timeout: float = 300, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert launcher.poll() is None, f"the run ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"kill point not reached in {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(poll)


def wait_gone(run_dir: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while rank_pids(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    return rank_pids(run_dir)


def kill_run(launcher: subprocess.Popen, run_dir: Path) -> None:
    """kill -9 the whole job at once, as a lost node or `scancel -s KILL` would: ranks, torchrun and `asr run`."""
    for pid in rank_pids(run_dir):
        os.kill(pid, signal.SIGKILL)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert not wait_gone(run_dir)


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.fixture(scope="module")
def hostile_train(tmp_path_factory, speech_folder) -> Path:
    """The six speech clips plus one of each bad sample a real corpus holds (the 8 kHz stereo, >30 s and empty
    clips of test_data are left out to keep training fast)."""
    root = tmp_path_factory.mktemp("hostile_train")
    with open(speech_folder / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = [(r["file_name"], r["transcription"]) for r in csv.DictReader(f)]
    for name, _ in rows:
        shutil.copy(speech_folder / name, root / name)
    audio, rate = sf.read(speech_folder / rows[0][0], dtype="float32")
    sf.write(root / "int16-as-float.wav", audio * 32767, rate, subtype="FLOAT")  # a common conversion bug
    (root / "corrupt.wav").write_bytes(b"RIFF" + b"\x00" * 40 + b"not audio at all" * 10)
    shutil.copy(speech_folder / rows[1][0], root / "notext.wav")
    rows += [("int16-as-float.wav", rows[0][1]), ("corrupt.wav", "broken"), ("notext.wav", " "),
             ("missing.wav", "gone")]
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file_name", "transcription"), *rows])
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_teacher, hostile_train, speech_folder) -> Path:
    """The uninterrupted run every crashed-and-resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    asr_run(fast_recipe(root / "recipe.yaml", micro_teacher, hostile_train, speech_folder), root / "run")
    return root / "run"


def test_bad_samples_are_skipped_and_counted_by_reason_in_the_run_summary(reference):
    summary = json.loads((reference / "train-summary.json").read_text())
    assert summary["skipped_samples_rank0"] == EXPECTED_SKIPS
    assert summary["steps"] == 4 and summary["skipped_nonfinite_steps"] == 0
    assert "'audio out of range': 1" in (reference / "report.md").read_text()


@pytest.mark.slow  # 60 s; the fast tier keeps resume and preemption
def test_kill_9_between_checkpoints_then_rerun_resumes_with_the_same_curve(tmp_path, reference, micro_teacher,
                                                                            hostile_train, speech_folder):
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, hostile_train, speech_folder)
    run, log = tmp_path / "run", tmp_path / "crashed.log"
    launcher = start_run(recipe, run, log)
    wait_for(lambda: metric_rows(run) >= 3, launcher, log)  # step 3 trained: step-2 saved, step-4 not yet
    kill_run(launcher, run)
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and not (run / "report.md").exists()
    step = json.loads((ckpt / "state.json").read_text())["step"]

    proc = asr_run(recipe, run)  # the same command again
    assert f"resumed from {ckpt} at step {step}" in proc.stdout
    assert_same_curve(reference, run)
    assert json.loads((run / "train-summary.json").read_text())["skipped_samples_rank0"] == EXPECTED_SKIPS


def test_preemption_saves_and_exits_then_the_resumed_run_benches_that_checkpoint(tmp_path, micro_teacher,
                                                                                 speech_folder):
    """A preemption checkpoint must fit Slurm's warning window (300 s before the limit): saved, PREEMPTED written,
    no benchmark; the resumed run benches it before it trains on."""
    run, log = tmp_path / "run", tmp_path / "run.log"
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder,
                         train={"max_steps": 30, "save_every": 1000, "log_every": 1})
    launcher = start_run(recipe, run, log)
    wait_for(lambda: metric_rows(run) >= 1, launcher, log)
    (run / "PREEMPT").write_text("")
    assert launcher.wait(timeout=300) == 2, log.read_text()[-3000:]
    at = int((run / "PREEMPTED").read_text())
    assert 1 <= at < 30 and is_complete(run / "checkpoints" / f"step-{at:06d}")
    assert f"error: preempted at step {at}; a checkpoint was saved" in log.read_text()
    benched = lambda: [json.loads(line)["model"] for line in (run / "bench" / "checkpoints.jsonl").open()]  # noqa: E731
    assert benched() == ["teacher", "pruned-untrained"]  # the baselines only: nothing ran after the save
    proc = asr_run(recipe, run)
    assert f"resumed from {run / 'checkpoints' / f'step-{at:06d}'} at step {at}" in proc.stdout
    assert benched() == ["teacher", "pruned-untrained", f"step-{at}", "step-30"]
    assert not (run / "PREEMPTED").exists()


@pytest.mark.slow  # 60 s; the fast tier keeps preemption
def test_kill_9_during_a_checkpoint_write_never_loads_the_partial_one(tmp_path, reference, micro_teacher,
                                                                     hostile_train, speech_folder):
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, hostile_train, speech_folder)
    run, log = tmp_path / "run", tmp_path / "crashed.log"
    ckpts = run / "checkpoints"
    partial = ckpts / "step-000004.tmp"
    launcher = start_run(recipe, run, log)
    wait_for(lambda: any((partial / "ds").glob("*")), launcher, log, poll=0.002)  # DeepSpeed started writing
    kill_run(launcher, run)
    assert partial.is_dir() and not is_complete(partial), "the kill came after the checkpoint was sealed"
    assert (ckpts / "latest").read_text() == "step-000002"
    assert latest_checkpoint(ckpts) == ckpts / "step-000002"

    proc = asr_run(recipe, run)
    assert f"resumed from {ckpts / 'step-000002'} at step 2" in proc.stdout
    assert not partial.exists() and is_complete(ckpts / "step-000004")
    assert (ckpts / "latest").read_text() == "step-000004"
    assert_same_curve(reference, run)


@pytest.mark.slow  # two runs (65 s)
def test_resuming_on_another_number_of_processes_is_one_clear_error(tmp_path, micro_teacher, speech_folder):
    """ZeRO's optimizer shards, each rank's RNG and data position belong to the world size that saved them."""
    run = tmp_path / "run"
    asr_run(fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder,
                        train={"max_steps": 2}), run)
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    stored["train"]["max_steps"] = 4
    (run / "recipe.yaml").write_text(yaml.safe_dump(stored))
    proc = asr("run", str(run / "recipe.yaml"), "--run-dir", str(run), "--nproc", "2")
    ckpt = run / "checkpoints" / "step-000002"
    message = (f"{ckpt}: saved by 1 processes but this run has 2; resume with 1 (`asr run --nproc 1`, or nodes x "
               "processes per node = 1 under Slurm)")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}", proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert [r["step"] for r in losses(run)] == [1, 2]


@pytest.mark.slow  # 30 s
def test_ranks_die_with_a_killed_launcher(tmp_path, micro_teacher, speech_folder):
    run, log = tmp_path / "run", tmp_path / "run.log"
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder,
                         train={"max_steps": 1000, "save_every": 1000})  # an orphan would train for minutes
    launcher = start_run(recipe, run, log)
    wait_for(lambda: metric_rows(run) >= 1, launcher, log)  # training (before it, a lone rank fails to rendezvous)
    os.killpg(launcher.pid, signal.SIGKILL)  # `asr run` and torchrun only, as kill -9 of the job's leader would
    launcher.wait()
    survivors = wait_gone(run, timeout=5)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"ranks {survivors} outlived their launcher by 5 s (step {metric_rows(run)} reached)"


def _checkpoint(root: Path, step: int, files: dict[str, int]) -> Path:
    """A hand-made checkpoint: files of the given sizes, sealed with COMPLETE."""
    ckpt = root / f"step-{step:06d}"
    for name, size in files.items():
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / name).write_bytes(b"x" * size)
    (ckpt / COMPLETE).write_text(json.dumps(files))
    return ckpt


def test_latest_checkpoint_skips_partial_truncated_and_stale(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None
    files = {"ds/mp_rank_00_model_states.pt": 300, "hf/model.safetensors": 200}
    good2, good6 = _checkpoint(root, 2, files), _checkpoint(root, 6, files)
    short = _checkpoint(root, 8, files)
    (short / "hf" / "model.safetensors").write_bytes(b"x" * 100)
    missing = _checkpoint(root, 10, files)
    (missing / "ds" / "mp_rank_00_model_states.pt").unlink()
    (_checkpoint(root, 12, files) / COMPLETE).unlink()
    (_checkpoint(root, 14, files) / COMPLETE).write_text("{not json")
    _checkpoint(root, 16, files).rename(root / "step-000016.tmp")  # sealed but never renamed: a kill before rename
    assert [is_complete(root / f"step-{s:06d}") for s in (2, 6, 8, 10, 12, 14)] == [True, True] + [False] * 4

    for pointer in ("step-000099", "step-000008", "step-000016.tmp", ""):  # deleted, truncated, partial, empty
        (root / "latest").write_text(pointer)
        assert latest_checkpoint(root) == good6, pointer
    (root / "latest").write_text("step-000002")  # a valid pointer wins: it was written after the rename
    assert latest_checkpoint(root) == good2
    (root / "latest").unlink()
    assert latest_checkpoint(root) == good6
    with pytest.raises(AsrError, match="step-000008: checkpoint is incomplete or truncated; delete it"):
        load_checkpoint(None, short, processes=1)


def test_a_real_checkpoint_truncated_by_hand_is_never_picked(tmp_path, reference):
    root = tmp_path / "checkpoints"
    for name in ("step-000002", "step-000004"):
        shutil.copytree(reference / "checkpoints" / name, root / name)
    shutil.copy(reference / "checkpoints" / "latest", root / "latest")
    assert (root / "latest").read_text() == "step-000004" and latest_checkpoint(root) == root / "step-000004"
    weights = root / "step-000004" / "ds" / "mp_rank_00_model_states.pt"
    os.truncate(weights, weights.stat().st_size - 1)
    assert latest_checkpoint(root) == root / "step-000002"


# --- a full disk --------------------------------------------------------------------------------------------------

def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("fails_in", ["deepspeed state", "hf student"])
@pytest.mark.slow  # 35 s per place it fails
def test_disk_full_while_saving_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, reference, micro_teacher,
                                                                                 hostile_train, speech_folder,
                                                                                 fails_in):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs as the checkpoints directory needs root and mount(8)")
    ref = reference / "checkpoints" / "step-000002"
    size = _tree_bytes(ref)  # room for step-2, and for step-4 up to the middle of the file named by `fails_in`
    size += _tree_bytes(ref / "ds") // 2 if fails_in == "deepspeed state" else \
        _tree_bytes(ref / "ds") + (ref / "hf" / "model.safetensors").stat().st_size // 2
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(ckpts)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, hostile_train, speech_folder)
        proc = asr("run", str(recipe), "--run-dir", str(run))
        assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
        kept = sum(json.loads((ckpts / "step-000002" / COMPLETE).read_text()).values())
        error = f"error (rank 0): no space left on the disk holding {ckpts} while saving step 4 (a checkpoint takes " \
                f"{kept / 2**20:.0f} MB); free space there or lower train.keep_last, then re-run the same command " \
                "to resume from step-000002\n"
        assert error in proc.stderr and "[rank0]: Traceback" not in proc.stderr, proc.stderr[-3000:]
        # the run's last line is the rank's own message, not a generic "training failed"
        assert proc.stderr.strip().splitlines()[-1] == "error: " + error[len("error (rank 0): "):].strip()
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002"]  # the partial one is gone
        assert (ckpts / "latest").read_text() == "step-000002" and is_complete(ckpts / "step-000002")
        load_whisper(str(ckpts / "step-000002" / "hf"))

        if fails_in == "deepspeed state":  # more room, the same command: resumes from the kept checkpoint
            subprocess.run(["mount", "-o", f"remount,size={3 * size}", str(ckpts)], check=True)
            proc = asr_run(recipe, run)
            assert f"resumed from {ckpts / 'step-000002'} at step 2" in proc.stdout
            assert_same_curve(reference, run)
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], check=False)


# --- numerical faults ---------------------------------------------------------------------------------------------

def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path, micro_teacher, speech_folder):
    """lr=1e30: step 1 trains (its update blows the weights up), then every loss is NaN."""
    run = tmp_path / "run"
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder, optim={"lr": 1e30},
                         train={"max_bad_steps": 3})
    proc = asr("run", str(recipe), "--run-dir", str(run))
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    for step, in_row in ((2, 1), (3, 2), (4, 3)):
        assert f"step {step}/4 skipped: non-finite loss ({in_row} in a row, {in_row} in total)" in proc.stdout
    assert "error (rank 0): 3 non-finite losses in a row at step 4; lower optim.lr or check the data " \
           "(train.max_bad_steps sets the limit)\n" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr
    assert [r["step"] for r in losses(run)] == [1]  # skipped steps leave no row
    # the checkpoint due at step 2 was still written (the weights of the last good step), so nothing is lost
    assert is_complete(run / "checkpoints" / "step-000002") and not (run / "train-summary.json").exists()


@pytest.mark.slow  # 35 s; the fast tier keeps non-finite skipping
def test_nonfinite_loss_with_grad_accum_stops_the_run_instead_of_skipping_mid_window(tmp_path, micro_teacher,
                                                                                      speech_folder):
    """With train.grad_accum > 1 DeepSpeed holds the window's earlier micro-batches, so a non-finite loss cannot be
    skipped cleanly: every rank stops at once with one line naming the fix, before anything else is saved."""
    run = tmp_path / "run"
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder, optim={"lr": 1e30},
                         train={"grad_accum": 2, "nproc": 2, "batch_size": 1})
    proc = asr("run", str(recipe), "--run-dir", str(run))
    message = ("non-finite loss at step 2 (micro-batch 1 of 2); with train.grad_accum > 1 it cannot be skipped: "
               "re-run to resume from the last checkpoint with a lower optim.lr, or set train.grad_accum=1 to skip "
               "such steps")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}", proc.stderr[-3000:]
    assert f"error (rank 0): {message}" in proc.stderr and f"error (rank 1): {message}" in proc.stderr
    assert "skipped: non-finite loss" not in proc.stdout
    assert [r["step"] for r in losses(run)] == [1] and not (run / "checkpoints" / "step-000002").exists()


# --- hostile input ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def latin1_folder(tmp_path_factory, speech_folder) -> Path:
    """An audiofolder whose metadata.csv was saved as latin-1 (a real file, as a spreadsheet exports it)."""
    root = tmp_path_factory.mktemp("latin1")
    shutil.copy(speech_folder / "clip0.wav", root / "clip0.wav")
    shutil.copy(speech_folder / "clip1.wav", root / "clip1.wav")
    (root / "metadata.csv").write_bytes("file_name,transcription\nclip0.wav,hello there\nclip1.wav,un café crème\n"
                                        .encode("latin-1"))
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_non_utf8_metadata_csv_is_a_clear_error_naming_file_and_line(latin1_folder, streaming):
    with pytest.raises(AsrError) as err:
        list(iter_samples(open_dataset(DatasetRef.parse(str(latin1_folder)), streaming=streaming), SkipStats()))
    assert str(err.value) == f"{latin1_folder / 'metadata.csv'}: line 3 is not UTF-8 (byte 0xe9); re-save it as " \
                             "UTF-8, e.g. `iconv -f latin1 -t utf-8`"


@pytest.mark.parametrize("streaming", [False, True])
def test_a_rank_left_without_usable_samples_stops_every_rank_with_one_line(tmp_path, micro_teacher, speech_folder,
                                                                           streaming):
    """Two clips on two processes, the second rank's transcript empty: it would wait forever in the first
    collective of a step; every rank stops instead, before the engine, naming the data and the fix (a streamed
    rank reads its first usable sample up front)."""
    train = tmp_path / "train"
    train.mkdir()
    for i in range(2):
        shutil.copy(speech_folder / f"clip{i}.wav", train / f"clip{i}.wav")
    (train / "metadata.csv").write_text("file_name,transcription,language\nclip0.wav,hello there,en\nclip1.wav,,en\n")
    run = tmp_path / "run"
    proc = asr("run", str(fast_recipe(tmp_path / "recipe.yaml", micro_teacher, train, speech_folder,
                                      train={"nproc": 2}, data={"streaming": streaming})), "--run-dir", str(run))
    assert_cli_error(proc, f"1 of 2 ranks got no usable training samples from ['{train}'] (rank 1: skipped 1 "
                     f"empty transcript (e.g. {train / 'clip1.wav'})); add data or use fewer processes")
    assert "asr.train.main failed: rank " in proc.stderr  # torchrun's own traceback replaced (assert_cli_error)
    assert not (run / "checkpoints").exists()


def test_out_of_range_audio_is_skipped_and_counted(tmp_path, speech_folder):
    """Float WAVs holding int16 values, or garbage, would give shifted or NaN log-mel features."""
    audio, rate = sf.read(speech_folder / "clip0.wav", dtype="float32")
    shutil.copy(speech_folder / "clip0.wav", tmp_path / "good.wav")
    sf.write(tmp_path / "int16.wav", audio * 32767, rate, subtype="FLOAT")
    sf.write(tmp_path / "huge.wav", audio * 1e20, rate, subtype="FLOAT")
    (tmp_path / "metadata.csv").write_text("file_name,transcription\ngood.wav,a\nint16.wav,b\nhuge.wav,c\n")
    stats = SkipStats()
    assert [s.id for s in iter_samples(open_dataset(DatasetRef.parse(str(tmp_path))), stats)] == ["good.wav"]
    assert dict(stats.counts) == {"audio out of range": 2}


@pytest.mark.parametrize("edit, overrides, message", [
    ({"optim": {"lrr": 1e-3}}, [], "optim.lrr: unknown key; allowed: betas, grad_clip, lr, schedule, warmup_steps, "
                                   "weight_decay"),
    ({"train": {"nproc": "two"}}, [], "train.nproc: 'two' is not int"),
    ({}, ["train.max_steps=many"], "train.max_steps: 'many' is not int"),
    ({"teacher": "whisper-huge-nope"}, [], "teacher: whisper-huge-nope: not a registry name (whisper-tiny.en, "),
    ({"data": {"train": ["/no/such/folder"]}}, [], "data.train[0]: /no/such/folder: no such directory"),
    ({"data": {"train": ["LATIN1"]}}, [], "data.train[0]: LATIN1/metadata.csv: line 3 is not UTF-8 (byte 0xe9); "
                                          "re-save it as UTF-8"),
    ({"objective": {"method": "kd", "teacher_cache": True}}, [],
     "objective.teacher_cache: cached teacher targets belong to pseudo-labels; set data.pseudo_label"),
    ({"objective": {"method": "kd", "teacher_cache": "states"}}, ["data.pseudo_label.top_k=4"],
     "objective.teacher_cache=states needs those teacher targets stored: set data.pseudo_label.teacher_states=true"),
    ({"objective": {"method": "kd", "teacher_cache": "states"}},
     ["data.pseudo_label.teacher_states=true", "data.condition_on_prev_probability=0.2"],
     "data.condition_on_prev_probability=0.2 changes what the teacher reads, but objective.teacher_cache replays"),
    ({"objective": {"method": "kd", "teacher_cache": "states"}},
     ["data.pseudo_label.teacher_states=true", "data.timestamp_probability=0.2"],
     "data.timestamp_probability=0.2 with objective.teacher_cache needs the teacher's targets on timestamped labels: "
     "set data.pseudo_label.timestamps=true"),
    ({}, ["data.synth_train={num: 2, sentences: [3, 1]}"], "data.synth_train.sentences must be [low, high]"),
    ({}, ["data.num_workers=-1"], "data.num_workers must be 0 (load in the training process) or more, got -1"),
    ({}, ["data.synth_train={num: 2, augment: {phone: {p: 1}}}"],
     "data.synth_train.augment: augment overrides name effects (speed, pitch, reverb, noise, telephone)"),
], ids=["unknown-key", "wrong-type", "wrong-type-override", "unknown-teacher", "missing-data", "non-utf8-metadata",
        "cache-without-pseudo-labels", "cache-of-targets-not-stored", "cache-with-prompts",
        "cache-with-untimed-targets", "sentences-reversed", "negative-workers", "unknown-effect"])
def test_configuration_errors_stop_before_any_work(tmp_path, micro_teacher, speech_folder, latin1_folder, edit,
                                                   overrides, message):
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder)
    data = yaml.safe_load(recipe.read_text())
    for key, value in edit.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    recipe.write_text(yaml.safe_dump(data).replace("LATIN1", str(latin1_folder)))
    proc = asr("run", str(recipe), *overrides, cwd=tmp_path)  # no --run-dir: it would be created under ./runs
    assert_cli_error(proc, message.replace("LATIN1", str(latin1_folder)))
    assert len(proc.stderr.strip().splitlines()) == 1 and "launching" not in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # no run directory


def test_kd_refuses_a_teacher_with_another_vocabulary_before_training(tmp_path, micro_teacher, speech_folder,
                                                                      scaled_large_v3):
    """The student comes from a tiny.en-vocabulary teacher; the run's recipe is then pointed at a teacher with
    whisper-base's multilingual vocabulary (51,865 tokens, one more)."""
    run = tmp_path / "run"
    recipe = fast_recipe(tmp_path / "recipe.yaml", micro_teacher, speech_folder, speech_folder)
    assert asr("run", str(recipe), "--run-dir", str(run), "--stage", "prepare").returncode == 0
    stored = yaml.safe_load((run / "recipe.yaml").read_text())
    (run / "recipe.yaml").write_text(yaml.safe_dump({**stored, "teacher": str(scaled_large_v3)}))
    proc = asr("run", str(run / "recipe.yaml"), "--run-dir", str(run), "--stage", "train")
    assert proc.returncode == 2
    assert f"error (rank 0): student {run / 'student'} has 51864 tokens but teacher {scaled_large_v3} has 51865; " \
           "distil from a teacher with the same tokenizer\n" in proc.stderr, proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_truncated_or_missing_checkpoint_is_refused_as_a_model(tmp_path, reference):
    ckpt = tmp_path / "step-000004"
    shutil.copytree(reference / "checkpoints" / "step-000004", ckpt)
    assert resolve_model(str(ckpt)) == str(ckpt / "hf")  # a checkpoint directory stands for its student
    weights = ckpt / "hf" / "model.safetensors"
    full = weights.stat().st_size
    os.truncate(weights, full // 2)
    for ref in (ckpt, ckpt / "hf"):
        with pytest.raises(AsrError) as err:
            load_whisper(str(ref))
        assert str(err.value) == f"{weights}: truncated or corrupt ({full // 2} bytes, its header says {full}); it " \
                                 "was not fully written, use an earlier checkpoint or re-create it"
    with pytest.raises(AsrError, match="step-000099: not a registry name"):
        resolve_model(str(tmp_path / "step-000099"))
    crashed = tmp_path / "crashed-run"  # a run killed before it finished: checkpoints, no final student
    (crashed / "checkpoints").mkdir(parents=True)
    with pytest.raises(AsrError, match="crashed-run: run directory without a final student"):
        resolve_model(str(crashed))


@pytest.mark.parametrize("bad", ["truncated checkpoint", "not a model reference"])
def test_bench_cli_refuses_a_bad_model_in_one_line(tmp_path, reference, speech_folder, bad):
    if bad == "truncated checkpoint":
        model = tmp_path / "step-000002"
        shutil.copytree(reference / "checkpoints" / "step-000002", model)
        os.truncate(model / "hf" / "model.safetensors", 1000)
        fragments = (f"error: {model / 'hf' / 'model.safetensors'}: truncated or corrupt (1000 bytes",)
    else:
        model = "no such model"
        fragments = ("error: no such model: not a registry name (whisper-tiny.en, whisper-base), a model directory "
                     "or a hub id",)
    proc = asr("bench", "--model", str(model), "--data", str(speech_folder), "--out", str(tmp_path / "bench"),
               "--limit", "1", "--latency-clips", "1", "--warmup", "0")
    assert_cli_error(proc, *fragments)
    assert not (tmp_path / "bench" / "bench.json").exists()
