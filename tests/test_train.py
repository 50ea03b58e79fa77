"""Recovery training on a real DeepSpeed engine with 2 processes (gloo on CPU): KD and CE, every ZeRO stage,
checkpoint → resume gives the same loss curve, consolidated students keep frozen weights, W&B offline logs."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from asr.models.loading import load_whisper

FAST_EVAL = {"limit": 2, "batch_size": 2, "max_new_tokens": 6, "latency_clips": 1, "warmup": 0}


def write_recipe(path: Path, teacher: str, dataset: Path, **sections) -> Path:
    recipe = {"name": "test", "teacher": teacher, "prune": {"keep": [0, 3]},
              "data": {"train": [str(dataset)], "eval": [str(dataset)]},
              "optim": {"lr": 1e-3}, "eval": FAST_EVAL,
              "train": {"max_steps": 4, "batch_size": 2, "save_every": 2, "log_every": 1, "nproc": 2, "keep_last": 5}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path.write_text(yaml.safe_dump(recipe))
    return path


def asr_run(recipe: Path, run_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "asr", "run", str(recipe), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_then_resume(tmp_path: Path, teacher: str, dataset: Path, stop: int, total: int, **sections):
    """One uninterrupted run and one stopped at `stop` then resumed to `total`; returns both run dirs."""
    full = tmp_path / "full"
    proc = asr_run(write_recipe(tmp_path / "full.yaml", teacher, dataset, **{**sections, "train": {
        **sections.get("train", {}), "max_steps": total}}), full)
    (tmp_path / "full.log").write_text(proc.stdout)
    split = tmp_path / "split"
    asr_run(write_recipe(tmp_path / "split.yaml", teacher, dataset, **{**sections, "train": {
        **sections.get("train", {}), "max_steps": stop}}), split)
    stored = yaml.safe_load((split / "recipe.yaml").read_text())
    stored["train"]["max_steps"] = total
    (split / "recipe.yaml").write_text(yaml.safe_dump(stored))
    proc = asr_run(split / "recipe.yaml", split)
    assert f"resumed from {split / 'checkpoints'}" in proc.stdout
    return full, split


def assert_same_curve(full: Path, split: Path) -> None:
    a, b = losses(full), losses(split)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "ce"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (key, ra, rb)


def test_kd_zero2_real_tiny_en_two_processes_resume_and_wandb(tmp_path, speech_folder):
    """The real teacher, pruned to decoder layers [0, 3], distilled by 2 ranks under ZeRO-2."""
    full, split = run_then_resume(tmp_path, "whisper-tiny.en", speech_folder, stop=2, total=4,
                                  objective={"method": "kd"}, train={"zero_stage": 2})
    assert_same_curve(full, split)
    rows = losses(full)
    assert all(r["kl"] > 0 for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    # checkpoints are sealed, the pointer names the newest, and the final student keeps the frozen encoder
    ckpts = full / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000004"
    assert json.loads((ckpts / "step-000004" / "COMPLETE").read_text())
    teacher, final = load_whisper("whisper-tiny.en"), load_whisper(str(full / "final"))
    assert torch.equal(final.model.encoder.layers[0].fc1.weight, teacher.model.encoder.layers[0].fc1.weight)
    assert not torch.equal(final.model.decoder.layers[1].fc1.weight, teacher.model.decoder.layers[3].fc1.weight)
    # the tied output projection is stored once (final/ was 1.6x student/), and the weights are not owner-only
    weights = [full / d / "model.safetensors" for d in ("student", "final", "checkpoints/step-000004/hf")]
    assert [w.stat().st_size for w in weights] == [weights[0].stat().st_size] * 3
    umask = os.umask(0)
    os.umask(umask)
    assert all(w.stat().st_mode & 0o777 == 0o666 & ~umask for w in weights)
    # the rate logged after a checkpoint leaves out its save and benchmark (seconds here, against ~0.5 s a step)
    rate = {int(m[0]): float(m[1]) for m in re.findall(r"^step (\d+)/4 .* ([\d.]+) samples/s$",
                                                        (tmp_path / "full.log").read_text(), re.M)}
    assert set(rate) == {1, 2, 3, 4} and rate[3] > 0.3 * rate[4], rate
    # every checkpoint was benchmarked next to the teacher and the untrained student
    bench = [json.loads(line) for line in (full / "bench" / "checkpoints.jsonl").read_text().splitlines()]
    assert [r["model"] for r in bench] == ["teacher", "pruned-untrained", "step-2", "step-4"]
    # students are timed interleaved with the teacher, never the teacher alone; ratios are against that pairing
    students = [r for r in bench if r["model"] != "teacher"]
    assert all(r["n"] == 2 for r in bench) and "latency" not in bench[0]
    assert all("decoder_ms_per_token_p50" in r["latency"] for r in students)
    assert all(r["paired_teacher_latency"]["clips"] == 1 for r in students)
    from asr.bench.run import add_ratios
    add_ratios(bench, {r["model"]: "teacher" for r in bench})
    for r in students:
        expected = r["latency"]["decoder_ms_per_token_p50"] / r["paired_teacher_latency"]["decoder_ms_per_token_p50"]
        assert r["measured_decoder_ratio"] == pytest.approx(expected)
    report = (full / "report.md").read_text()
    assert "| step-4 |" in report and (full / "report.png").stat().st_size > 10_000
    # W&B offline run folder inside the run directory, holding the logged metrics
    [run_file] = list((full / "wandb").glob("offline-run-*/run-*.wandb"))
    blob = run_file.read_bytes()
    assert b"train/loss" in blob and b"train/kl" in blob and b"eval/wer" in blob and b"train/samples_per_s" in blob


# ZeRO-2 (above) and ZeRO-3 stay in the fast tier; stages 0 and 1 take another 2 min, so they run with -m slow
@pytest.mark.parametrize("stage", [0, 1, 3])
@pytest.mark.slow  # three runs per stage; the fast tier keeps ZeRO-2
def test_zero_stages_save_and_resume(tmp_path, speech_folder, micro_teacher, stage):
    """Stage 0 (no zero_to_fp32), stage 1 (frozen params dropped by zero_to_fp32) and ZeRO-3 (partitioned)."""
    full, split = run_then_resume(tmp_path, str(micro_teacher), speech_folder, stop=2, total=3,
                                  train={"zero_stage": stage, "save_every": 2}, tracking={"wandb": False})
    assert_same_curve(full, split)
    teacher, final = load_whisper(str(micro_teacher)), load_whisper(str(full / "final"))
    for name, param in teacher.model.encoder.state_dict().items():  # frozen weights survive consolidation
        assert torch.equal(final.model.encoder.state_dict()[name], param), name


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow  # a run per stage (40 s); the gpu tier runs bf16 for real
def test_bf16_saves_the_fp32_master_weights_and_the_frozen_encoder_unrounded(tmp_path, speech_folder, micro_teacher,
                                                                              stage):
    """bf16 training keeps bf16 copies in the module; the saved student must carry the optimizer's fp32 master
    weights (compared with DeepSpeed's own zero_to_fp32 reconstruction) and the frozen encoder as it was."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = tmp_path / "bf16"
    asr_run(write_recipe(tmp_path / "bf16.yaml", str(micro_teacher), speech_folder, objective={"method": "kd"},
                         train={"bf16": True, "zero_stage": stage, "max_steps": 2, "save_every": 2},
                         tracking={"wandb": False}), run)
    master = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "step-000002"), tag="ds")
    teacher, final = load_whisper(str(micro_teacher)), load_whisper(str(run / "final"))
    for name, param in teacher.model.encoder.state_dict().items():
        assert torch.equal(final.model.encoder.state_dict()[name], param), name
    trained = {n: w for n, w in final.state_dict().items() if n.startswith("model.decoder.layers.")}
    assert trained and all(torch.equal(w, master[n]) for n, w in trained.items())
    w = trained["model.decoder.layers.0.fc1.weight"]
    assert not torch.equal(w, w.bfloat16().float())  # not rounded to bf16 on the way out


CACHED_STATES_SCRIPT = """
import os, sys
from pathlib import Path
import torch
from asr.config import load_recipe
from asr.data.features import log_mel
from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.train.loop import Trainer

run, data = Path(sys.argv[1]), sys.argv[2]
trainer = Trainer(run, load_recipe(run / "recipe.yaml"))
encoder = trainer.engine.module.model.encoder
audio = {s.id: s.audio for s in iter_samples(open_dataset(DatasetRef.parse(data)), SkipStats())}
features = log_mel(trainer.processor.feature_extractor, [audio[e.id] for e in trainer.batches.examples])
weight = next(encoder.parameters())
with torch.inference_mode():
    step = encoder(features.to(weight.device, weight.dtype)).last_hidden_state.to("cpu", torch.float16)
print(weight.dtype, tuple(trainer.batches.encoder_states.shape), torch.equal(trainer.batches.encoder_states, step))
sys.stdout.flush()
os._exit(0)
"""


def test_encoder_state_cache_key_sees_a_change_anywhere_in_a_clip():
    """Same id, same first half second, other speech after it: other encoder states, so another cache key."""
    from asr.data.features import Encoded
    from asr.train.data import encoder_states_key

    encoder = torch.nn.Linear(4, 4)
    clip = np.zeros((80, 3000), np.float32)
    later = clip.copy()
    later[:, 2000] = 1.0

    def key(features: np.ndarray) -> str:
        return encoder_states_key([Encoded("000000.wav", features, [1], [2], "a", "en")], encoder)

    assert key(clip) == key(clip.copy()) != key(later)


@pytest.mark.slow  # 25 s
def test_cached_encoder_states_are_those_of_the_encoder_the_run_trains_with(tmp_path, speech_folder, micro_teacher):
    """The encoder-state cache is computed after the encoder moved to the run's device and dtype: under bf16 the
    cached states are exactly the engine's bf16 encoder's on the clips (they were the fp32 CPU encoder's)."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder, train={"bf16": True, "nproc": 1},
                          tracking={"wandb": False})
    prepare = subprocess.run([sys.executable, "-m", "asr", "run", str(recipe), "--run-dir", str(run), "--stage",
                              "prepare"], capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", CACHED_STATES_SCRIPT, str(run), str(speech_folder)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ASR_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "torch.bfloat16 (6, 1500, 64) True"


TEACHER_CACHE_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
from asr.config import load_recipe
from asr.train.loop import Trainer
from asr.train.objectives import kd_loss

run = Path(sys.argv[1])
trainer = Trainer(run, load_recipe(run / "recipe.yaml"))
trainer.engine.eval()
batch = trainer.batches.batch(0)
with torch.no_grad():
    cached = trainer.losses(batch)
    live = trainer.losses({k: v for k, v in batch.items() if k != "teacher_states"})
    states, o = batch["encoder_states"].float(), trainer.recipe.objective
    decoder = {k: batch[k] for k in ("decoder_input_ids", "decoder_attention_mask")}
    every = kd_loss(trainer.engine.module(encoder_outputs=(states,), **decoder).logits,
                    trainer.teacher(encoder_outputs=(states,), **decoder).logits, batch["labels"], o.temperature,
                    o.alpha_kl, o.alpha_ce)
kept = sorted(Path(os.environ["ASR_CACHE"], "teacher-states").iterdir())
print(json.dumps({"keys": sorted(batch), "unlabelled": (batch["labels"] == -100).float().mean().item(),
                  "kept": [(f.name, f.stat().st_mtime_ns) for f in kept],
                  "targets": [t["states"].tolist() for t in trainer.batches.teacher_targets],
                  **{f"{name}_{k}": float(v) for name, parts in (("cached", cached), ("live", live), ("every", every))
                     for k, v in parts.items()}}))
sys.stdout.flush()
os._exit(0)
"""


def test_the_cached_teacher_and_labelled_logits_give_the_full_kd_loss(tmp_path, speech_folder, micro_teacher):
    """train.cache_teacher: the teacher's decoder states, computed once per example, give the loss the live teacher
    gives, and logits computed at the labelled positions alone give the loss of logits at every position (here a
    third or more of the positions are prompts, prefixes or padding)."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", str(micro_teacher), speech_folder, objective={"method": "kd"},
                          data={"condition_on_prev_probability": 1.0, "timestamp_probability": 0.5},
                          train={"nproc": 1, "batch_size": 4}, tracking={"wandb": False})
    prepare = subprocess.run([sys.executable, "-m", "asr", "run", str(recipe), "--run-dir", str(run), "--stage",
                              "prepare"], capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    runs = []
    for _ in range(2):  # the second run (a resume's view) reads the teacher's states back from the disk cache
        proc = subprocess.run([sys.executable, "-c", TEACHER_CACHE_SCRIPT, str(run)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "ASR_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.splitlines()[-1]))
    got, again = runs
    assert len(got["kept"]) == 1 and again["kept"] == got["kept"]  # one file, written once, not rewritten
    assert again["targets"] == got["targets"] and again["cached_loss"] == got["cached_loss"]
    assert "caching the teacher's decoder states" not in proc.stderr
    assert "teacher_states" in got["keys"] and got["unlabelled"] > 0.3
    for part in ("loss", "kl", "ce"):
        assert got[f"cached_{part}"] == pytest.approx(got[f"live_{part}"], rel=1e-5), part
        assert got[f"live_{part}"] == pytest.approx(got[f"every_{part}"], rel=1e-5), part
    assert got["live_kl"] > 0


def test_continued_pretraining_with_unfrozen_encoder(tmp_path, speech_folder, micro_teacher):
    """CE only (no teacher in the loop), encoder trained too, linear warm-up/decay schedule."""
    run = tmp_path / "ce"
    asr_run(write_recipe(tmp_path / "ce.yaml", str(micro_teacher), speech_folder, objective={"method": "ce"},
                         optim={"lr": 1e-3, "warmup_steps": 1, "schedule": "linear"},
                         train={"freeze_encoder": False, "cache_encoder": False, "max_steps": 3, "save_every": 3},
                         tracking={"wandb": False}), run)
    rows = losses(run)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 0.5e-3])
    assert all("kl" not in r for r in rows)
    teacher, final = load_whisper(str(micro_teacher)), load_whisper(str(run / "final"))
    assert not torch.equal(final.model.encoder.layers[0].fc1.weight, teacher.model.encoder.layers[0].fc1.weight)


@pytest.mark.slow  # three runs (120 s); the fast tier keeps resume (test_kd_zero2) and streaming batches (test_stream)
def test_streaming_data_resumes_on_the_same_curve(tmp_path, speech_folder, micro_teacher):
    """data.streaming: batches read as training goes; the checkpoint keeps each rank's stream position, so a
    run stopped at step 2 (mid-epoch: 3 clips per rank, batch 2) and resumed matches the uninterrupted run."""
    full, split = run_then_resume(tmp_path, str(micro_teacher), speech_folder, stop=2, total=4,
                                  data={"streaming": True}, train={"zero_stage": 2, "save_every": 2},
                                  tracking={"wandb": False})
    assert_same_curve(full, split)
    state = torch.load(split / "checkpoints" / "step-000002" / "ds" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["data"] == [{"epoch": 1, "rows": 1, "step": 2}] * 2


@pytest.mark.slow  # two runs (45 s)
def test_frozen_embeddings_and_cross_attention_stay_the_teachers_and_the_layers_train(tmp_path, speech_folder,
                                                                                      micro_teacher):
    """train.freeze_embeddings: token/position embeddings (and the tied output projection) are not trained;
    train.freeze_cross_attention_kv: nor are the key and value projections of the encoder states (the layer's
    query still is)."""
    run = tmp_path / "frozen"
    asr_run(write_recipe(tmp_path / "frozen.yaml", str(micro_teacher), speech_folder, objective={"method": "kd"},
                         train={"freeze_embeddings": True, "freeze_cross_attention_kv": True, "max_steps": 2,
                                "save_every": 2},
                         tracking={"wandb": False}), run)
    teacher, final = load_whisper(str(micro_teacher)), load_whisper(str(run / "final"))
    for name in ("embed_tokens", "embed_positions"):
        assert torch.equal(getattr(final.model.decoder, name).weight, getattr(teacher.model.decoder, name).weight)
    assert torch.equal(final.proj_out.weight, teacher.proj_out.weight)
    student_layer, teacher_layer = final.model.decoder.layers[0], teacher.model.decoder.layers[0]  # layer 0 kept
    assert not torch.equal(student_layer.fc1.weight, teacher_layer.fc1.weight)
    for name in ("k_proj", "v_proj"):
        assert torch.equal(getattr(student_layer.encoder_attn, name).weight,
                           getattr(teacher_layer.encoder_attn, name).weight)
    assert not torch.equal(student_layer.encoder_attn.q_proj.weight, teacher_layer.encoder_attn.q_proj.weight)


def test_kd_trains_on_timestamped_and_prompted_targets(tmp_path, micro_teacher):
    """Packed synthetic clips carry sentence times; with both probabilities at 1 every sample is timestamped
    and prompted with the previous one's text, for the student and (the same input) the live teacher."""
    from asr.data.synth import build_corpus

    build_corpus(tmp_path / "packed", "train", num=4, seed=2, workers=1, augment_fraction=0.0, sentences=(2, 2),
                 progress=False)
    run = tmp_path / "ts"
    asr_run(write_recipe(tmp_path / "ts.yaml", str(micro_teacher), tmp_path / "packed", objective={"method": "kd"},
                         data={"timestamp_probability": 1.0, "condition_on_prev_probability": 1.0,
                               "max_label_tokens": 440},
                         train={"max_steps": 2, "save_every": 2}, tracking={"wandb": False}), run)
    rows = losses(run)
    assert len(rows) == 2 and all(math.isfinite(r["kl"]) and r["kl"] > 0 for r in rows)
    summary = json.loads((run / "train-summary.json").read_text())
    assert summary["label_layout_rank0"] == {"examples": 2, "timestamped": 2, "prompted": 1}  # first has no previous


@pytest.mark.slow  # two runs (75 s)
def test_the_student_trains_with_the_dropout_of_its_config(tmp_path, speech_folder, micro_teacher):
    """load_whisper returns eval mode, so without the trainer's train mode a config's dropout is silently off: with
    the same data and seed, dropout 0.3 must change the first loss. The saved students pad like OpenAI's."""
    from transformers import WhisperProcessor

    dropped = tmp_path / "dropout-teacher"
    shutil.copytree(micro_teacher, dropped)
    config = json.loads((dropped / "config.json").read_text())
    (dropped / "config.json").write_text(json.dumps({**config, "dropout": 0.3}))
    first = {}
    for name, teacher in (("plain", micro_teacher), ("dropout", dropped)):
        asr_run(write_recipe(tmp_path / f"{name}.yaml", str(teacher), speech_folder, objective={"method": "ce"},
                             train={"nproc": 1, "max_steps": 1, "save_every": 1}, tracking={"wandb": False},
                             eval={"limit": 1, "max_new_tokens": 2, "latency_clips": 1, "warmup": 0}), tmp_path / name)
        first[name] = losses(tmp_path / name)[0]["loss"]
    assert load_whisper(str(tmp_path / "dropout" / "student")).config.dropout == 0.3
    assert first["dropout"] != pytest.approx(first["plain"], rel=1e-4), first
    assert WhisperProcessor.from_pretrained(tmp_path / "plain" / "final").tokenizer.pad_token == "<|endoftext|>"
