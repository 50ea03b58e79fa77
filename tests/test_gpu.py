"""GPU tier (`make test-gpu`, marked `gpu`): one node x all its GPUs, NCCL and bf16, the distil-large-v3 recipe
scaled down through pseudo-label -> train -> sharded eval -> checkpoint -> preempt -> resume, in a few minutes.

Skipped where torch sees no CUDA device. ASR_GPU_TIER_ON_CPU=1 runs the same test body on 2 CPU processes with
gloo and bf16 (several minutes on 2 cores), so the test itself is proven on a machine without a GPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from asr.models.loading import load_processor, load_whisper, prompt_ids
from test_reliability import rank_pids, wait_for
from test_train import losses

GPUS = torch.cuda.device_count()
ON_CPU = os.environ.get("ASR_GPU_TIER_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    GPUS == 0 and not ON_CPU, reason="needs CUDA: torch.cuda.device_count() == 0 (ASR_GPU_TIER_ON_CPU=1 runs the "
                                     "same flow on 2 CPU processes with gloo)")]
NPROC = GPUS or 2  # 1 node x all local GPUs
BACKEND, DEVICES = ("nccl", [f"cuda:{i}" for i in range(GPUS)]) if GPUS else ("gloo", ["cpu"] * NPROC)
SCRIPT = " the quick brown fox"  # what the talking teacher says, whatever it hears
MAX_STEPS, SAVE_EVERY = 16, 4


@pytest.fixture(scope="module")
def talking_large_v3(scaled_large_v3, tmp_path_factory) -> Path:
    """scaled_large_v3 with its greedy output scripted: random weights never emit end-of-text, so every clip would
    be dropped as "hit the token cap" and nothing would be left to train on. Here the decoder's position embeddings
    after the prompt point (x100) at SCRIPT's tokens and then at end-of-text, whose embeddings (tied to the output
    projection) are made 4x longer than the longest other; the rest is the random model, so the stages decode, filter,
    store teacher states and distil for real."""
    out = tmp_path_factory.mktemp("talking") / "whisper-large-v3-talking"
    shutil.copytree(scaled_large_v3, out)
    model = load_whisper(str(out))
    said = load_processor(str(out)).tokenizer(SCRIPT, add_special_tokens=False).input_ids
    said.append(model.generation_config.eos_token_id)
    first = len(prompt_ids(None, model.generation_config, "en")) - 1  # the position that predicts the first word
    tokens, positions = model.model.decoder.embed_tokens.weight, model.model.decoder.embed_positions.weight
    with torch.no_grad():
        longest, draw = tokens.norm(dim=1).max(), torch.Generator().manual_seed(0)
        for token in set(said):  # end-of-text pads, so its row starts at zero: it gets a direction of its own
            direction = tokens[token] if tokens[token].any() else torch.randn(tokens.shape[1], generator=draw)
            tokens[token] = 4 * longest * direction / direction.norm()
        for i, token in enumerate(said):
            positions[first + i] = 100 * tokens[token] / tokens[token].norm()
    model.save_pretrained(out)
    return out


def audiofolder(root: Path, speech_folder: Path, texts: list[str | None]) -> Path:
    """`len(texts)` clips cycling through the six speech clips, each with its own transcript (None: its own)."""
    import csv

    root.mkdir()
    with open(speech_folder / "metadata.csv", newline="", encoding="utf-8") as f:
        clips = list(csv.DictReader(f))
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "transcription", "language"])
        for i, text in enumerate(texts):
            clip = clips[i % len(clips)]
            shutil.copy(speech_folder / clip["file_name"], root / f"c{i:03d}.wav")
            writer.writerow([f"c{i:03d}.wav", text or clip["transcription"], "en"])
    return root


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`asr run ARGS` in its own process group, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "asr", "run", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "asr", "run", *args], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def stop(launcher: subprocess.Popen, run_dir: Path) -> None:
    """A failed test leaves no run behind: its ranks and its launcher's group, by process id."""
    for pid in rank_pids(run_dir):
        os.kill(pid, signal.SIGKILL)
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def preempt_one_rank(run_dir: Path) -> None:
    """SIGUSR1 to the last rank only, as a signal reaching one node would: every rank must stop together."""
    ranks = {}
    for pid in rank_pids(run_dir):  # torchrun's own process matches too, without a RANK
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.split(b"=", 1) for item in variables if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    assert sorted(ranks) == list(range(NPROC)), ranks
    os.kill(ranks[NPROC - 1], signal.SIGUSR1)


def bench_records(run_dir: Path) -> list[dict]:
    path = run_dir / "bench" / "checkpoints.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_distil_large_v3_scaled_down_on_all_local_gpus_pseudo_labels_trains_preempts_and_resumes(
        tmp_path, monkeypatch, speech_folder, talking_large_v3):
    monkeypatch.setenv("ASR_CACHE", str(tmp_path / "cache"))  # pseudo-labels and encoder states of this test only
    n_train, n_eval = max(8, 2 * NPROC), 2 * NPROC  # every rank holds 2 training clips or more, and 2 eval clips
    train = audiofolder(tmp_path / "train", speech_folder, [None] * n_train + ["hello"])  # "hello": 400% WER
    evals = audiofolder(tmp_path / "eval", speech_folder, [None] * n_eval)
    run, log = tmp_path / "run", tmp_path / "first.log"
    args = ["distil-large-v3", f"teacher={talking_large_v3}", f"data.train=[{train}]", f"data.eval=[{evals}]",
            "data.dev=[]", "data.real_eval=[]", "data.pseudo_label.wer_threshold=100",
            "data.pseudo_label.max_new_tokens=16", "data.pseudo_label.batch_size=4",
            "data.pseudo_label.teacher_states=true", "optim.lr=1e-3", "optim.warmup_steps=2",
            f"train.max_steps={MAX_STEPS}", f"train.save_every={SAVE_EVERY}", "train.batch_size=2", "train.log_every=1",
            f"train.nproc={NPROC}", "train.bf16=true", "train.keep_last=10", f"eval.limit={n_eval}",
            "eval.batch_size=2", "eval.max_new_tokens=8", "eval.latency_clips=1", "eval.warmup=0",
            "tracking.wandb=false", "--run-dir", str(run)]

    # 1. pseudo-label on NPROC processes, train, bench step 4 on every rank; then SIGUSR1 to one rank
    launcher = start_cli(args, log)
    try:
        wait_for(lambda: any(r["model"] == f"step-{SAVE_EVERY}" for r in bench_records(run)), launcher, log,
                 timeout=1800, poll=0.1)
        preempt_one_rank(run)
        assert launcher.wait(timeout=600) == 2, log.read_text()[-3000:]
    finally:
        stop(launcher, run)
    first = log.read_text()
    at = int((run / "PREEMPTED").read_text())
    assert SAVE_EVERY < at < MAX_STEPS and f"error: preempted at step {at}; a checkpoint was saved" in first
    assert f"{NPROC} process(es) on {BACKEND}, rank 0 on {DEVICES[0]}, bfloat16" in first
    assert (f"pseudo-labelled {n_train + 1} clips with {talking_large_v3}: kept {n_train}, dropped 1 (1 WER above "
            "threshold)") in first and f"on {NPROC} process(es)" in first
    [labels] = yaml.safe_load((run / "recipe.yaml").read_text())["data"]["train"]
    kept = list(Path(labels).glob("*.wav"))
    assert len(kept) == n_train and (Path(labels) / "topk").is_dir() and any((Path(labels) / "topk").iterdir())
    assert [r["model"] for r in bench_records(run)] == ["teacher", "pruned-untrained", f"step-{SAVE_EVERY}"]

    # 2. the same command again: resumes from the preemption checkpoint, benches it first, trains to the end
    proc = run_cli(args)
    assert f"resumed from {run / 'checkpoints' / f'step-{at:06d}'} at step {at}" in proc.stdout
    assert not (run / "PREEMPTED").exists()
    saved = sorted({SAVE_EVERY * k for k in range(2, MAX_STEPS // SAVE_EVERY + 1)} - {at})
    records = bench_records(run)
    assert [r["model"] for r in records] == ["teacher", "pruned-untrained", f"step-{SAVE_EVERY}", f"step-{at}",
                                             *[f"step-{s}" for s in saved]]
    for r in records:  # every model benched on every rank's shard, in the run's dtype
        assert r["clips_per_rank"] == [2] * NPROC and r["n"] == n_eval and r["dtype"] == "bfloat16", r
        assert math.isfinite(r["wer"]), r
        assert r["model"] == "teacher" or r["latency"]["decoder_ms_per_token_p50"] > 0, r  # teacher: paired only
    rows = losses(run)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "kl", "ce"))
    assert all(r["loss"] > 0 and r["ce"] > 0 and r["kl"] > -1e-6 for r in rows)  # a KL is >= 0 up to rounding
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    summary = json.loads((run / "train-summary.json").read_text())
    assert (summary["steps"], summary["skipped_nonfinite_steps"]) == (MAX_STEPS, 0)
    assert (summary["backend"], summary["devices"], summary["dtype"]) == (BACKEND, DEVICES, "bfloat16")
    ckpt = run / "checkpoints" / f"step-{MAX_STEPS:06d}"
    assert json.loads((ckpt / "state.json").read_text())["processes"] == NPROC
    client = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert [rng["cuda"] is not None for rng in client["rng"]] == [GPUS > 0] * NPROC  # each GPU's dropout generator
    final = json.loads((run / "final" / "config.json").read_text())
    assert (final["encoder_layers"], final["decoder_layers"], final["num_mel_bins"]) == (32, 2, 128)
    assert (run / "final" / "SOURCE").read_text().startswith("step-")
    assert f"| step-{MAX_STEPS} |" in (run / "report.md").read_text()
