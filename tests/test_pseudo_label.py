"""Pseudo-labelling with whisper-tiny.en: every filter reason, resume without re-transcribing, sharding over two
processes, the top-K round trip, and KD from the cached top-K with no teacher in the training loop."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from conftest import write_metadata

from asr.infer.engines import Decoded
from asr.cli import main as asr_main
from asr.data.features import label_layout, log_mel
from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.train.objectives import kd_loss, kd_loss_topk, kl_teacher_student
from asr.label.pseudo_label import drop_reason
from asr.label.targets import PROGRESS, read_teacher_targets

TEACHER = "whisper-tiny.en"
MISLABELLED = "Seven green tables are floating above the quiet harbour."
TOP_K = 4


def _cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asr_main(list(argv))
    return out.getvalue()


@pytest.fixture(scope="module")
def source(speech_folder, tmp_path_factory) -> Path:
    """Three good clips, one whose reference is another sentence (WER ≈ 100%), and 10 s of faint noise (tiny.en
    writes '.', which normalizes to nothing)."""
    root = tmp_path_factory.mktemp("pl-source")
    refs = {row["file_name"]: row["transcription"] for row in csv.DictReader(open(speech_folder / "metadata.csv"))}
    rows = []
    for name in ("clip0.wav", "clip1.wav", "clip3.wav"):
        shutil.copy(speech_folder / name, root / name)
        rows.append((name, refs[name]))
    shutil.copy(speech_folder / "clip5.wav", root / "mislabelled.wav")
    rows.append(("mislabelled.wav", MISLABELLED))
    noise = np.random.default_rng(0).normal(0, 1e-3, 16000 * 10).astype(np.float32)
    sf.write(root / "noise.wav", noise, 16000, subtype="PCM_16")
    rows.append(("noise.wav", "Nothing was said here."))
    write_metadata(root, rows)
    return root


@pytest.fixture(scope="module")
def labelled(source, tmp_path_factory):
    """A run stopped after the first 2 rows (--limit), then the same command without it on 2 processes."""
    out = tmp_path_factory.mktemp("pl") / "out"
    args = ["pseudo-label", "--teacher", TEACHER, "--data", str(source), "--out", str(out), "--wer-threshold", "50",
            "--top-k", str(TOP_K), "--teacher-states", "--batch-size", "2"]
    first_line = _cli(*args, "--limit", "2")
    first = json.loads((out / "summary.json").read_text())
    progress_after_first = {p.name for p in (out / PROGRESS).iterdir()}
    second_line = _cli(*args, "--nproc", "2")
    return {"out": out, "first": first, "second": json.loads((out / "summary.json").read_text()),
            "first_progress": progress_after_first, "lines": (first_line, second_line), "args": args}


def _progress(out: Path, names=None) -> list[dict]:
    return [json.loads(line) for p in sorted((out / PROGRESS).iterdir()) if names is None or p.name in names
            for line in p.read_text().splitlines()]


def test_resume_transcribes_each_clip_once_and_shards_over_two_processes(labelled, source):
    out, first, second = labelled["out"], labelled["first"], labelled["second"]
    assert (first["labelled"], first["transcribed_this_run"], first["processes"]) == (2, 2, 1)
    assert (second["labelled"], second["transcribed_this_run"], second["processes"]) == (5, 3, 2)
    records = _progress(out)
    assert sorted(r["source_id"] for r in records) == sorted(p.name for p in source.glob("*.wav"))  # once each
    first_ids = {r["source_id"] for r in _progress(out, labelled["first_progress"])}
    assert first_ids == {"clip0.wav", "clip1.wav"}  # --limit 2 = the first two rows
    later = [p for p in (out / PROGRESS).iterdir() if p.name not in labelled["first_progress"]]
    assert len(later) == 2 and all(p.read_text().strip() for p in later)  # one progress file per process
    assert "pseudo-labelled 5 clips with whisper-tiny.en: kept 3, dropped 2" in labelled["lines"][1]


def test_a_finished_folder_is_reused_without_reading_the_data_again(labelled):
    out = labelled["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "metadata.csv", out / "summary.json")}
    line = _cli(*labelled["args"], "--nproc", "2")
    assert "this run transcribed 0 in 0 s" in line and "kept 3, dropped 2" in line
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten


def test_filters_drop_by_reason_and_the_folder_is_a_dataset(labelled, source):
    out, summary = labelled["out"], labelled["second"]
    records = {r["source_id"]: r for r in _progress(out)}
    assert summary["dropped"] == {"WER above threshold": 1, "empty output": 1}
    assert records["mislabelled.wav"]["reason"] == "WER above threshold"
    assert records["mislabelled.wav"]["pseudo_wer"] > 50
    assert records["noise.wav"]["reason"] == "empty output"
    kept = sorted(n for n, r in records.items() if r["kept"])
    assert kept == ["clip0.wav", "clip1.wav", "clip3.wav"] and all(records[n]["pseudo_wer"] <= 50 for n in kept)
    assert json.loads((out / "summary.json").read_text()) == summary
    # the audiofolder: hard-linked audio of the kept clips only, metadata with the reference and the pseudo-label
    assert sorted(p.name for p in out.glob("*.wav")) == kept
    assert all(os.path.samefile(out / n, source / n) for n in kept)
    rows = list(csv.DictReader(open(out / "metadata.csv", encoding="utf-8")))
    assert list(rows[0]) == ["file_name", "transcription", "pseudo_label", "pseudo_label_segments", "pseudo_wer",
                             "language"]
    assert all(r["pseudo_label_segments"] == "" for r in rows)  # labelled without --timestamps
    assert [r["file_name"] for r in rows] == kept
    ds = open_dataset(DatasetRef.parse(str(out)))
    pseudo = {s.id: s.text for s in iter_samples(ds, SkipStats(), text_column="pseudo_label")}
    gold = {s.id: s.text for s in iter_samples(ds, SkipStats())}
    assert pseudo == {n: records[n]["pseudo_label"] for n in kept}
    assert gold == {n: records[n]["transcription"] for n in kept}
    assert pseudo["clip1.wav"] == gold["clip1.wav"]  # tiny.en gets this flite sentence exactly right


def test_teacher_targets_round_trip_match_a_fresh_teacher_forward(labelled, source):
    from asr.models.loading import load_processor, load_whisper, output_embedding

    out = labelled["out"]
    records = {r["file_name"]: r for r in _progress(out) if r["kept"]}
    stored = read_teacher_targets(out, set(records))
    assert set(stored) == set(records)
    model, processor = load_whisper(TEACHER), load_processor(TEACHER)
    embedding = output_embedding(TEACHER)
    assert torch.equal(embedding, model.proj_out.weight)
    for name, record in records.items():
        ids, logprobs, states = stored[name]["ids"], stored[name]["logprobs"], stored[name]["states"]
        decoder_ids, labels = label_layout(processor.tokenizer, model.generation_config, record["pseudo_label"], "en")
        positions = sum(label != -100 for label in labels)
        assert ids.dtype == torch.int32 and logprobs.dtype == torch.float16 and states.dtype == torch.float16
        assert ids.shape == (positions, TOP_K) and states.shape == (positions, model.config.d_model)
        audio, _ = sf.read(source / name, dtype="float32")
        with torch.inference_mode():  # one clip alone, unpadded: a different batch than the one that stored it
            logits = model(input_features=log_mel(processor.feature_extractor, audio),
                           decoder_input_ids=torch.tensor([decoder_ids])).logits[0]
        labelled_logits = logits[[j for j, label in enumerate(labels) if label != -100]]
        # final states: the teacher's logits, exactly up to fp16 storage, so KD from them is the live teacher's
        torch.testing.assert_close(states.float() @ embedding.T, labelled_logits, atol=0.1, rtol=0.01)
        target = torch.zeros(positions, dtype=torch.long)[None]
        live, cached = kd_loss(labelled_logits[None] * 0.5, labelled_logits[None], target), \
            kd_loss(labelled_logits[None] * 0.5, (states.float() @ embedding.T)[None], target)
        assert cached["kl"].item() == pytest.approx(live["kl"].item(), rel=1e-2)
        # top-K: stored at the default temperature, 2
        fresh = torch.log_softmax(labelled_logits / 2.0, dim=-1)
        values, _ = fresh.topk(TOP_K, dim=-1)
        torch.testing.assert_close(logprobs.float(), values, atol=2e-2, rtol=2e-3)  # fp16 storage
        torch.testing.assert_close(logprobs.float(), fresh.gather(-1, ids.long()), atol=2e-2, rtol=2e-3)
        assert 0.02 < logprobs.float().exp().sum(-1).max() < 0.98  # the top K leave tempered mass in the tail
        # for a student near the teacher, the top-K loss pushes the way the full-vocabulary KL does (far from it,
        # the tail it cannot see dominates: see README "Cached teacher targets")
        student = (labelled_logits + 3 * torch.randn(labelled_logits.shape, generator=torch.Generator().manual_seed(0))
                   ).requires_grad_(True)
        grads = []
        for loss in (kl_teacher_student(student[None], labelled_logits[None], target),
                     kd_loss_topk(student[None], ids.long()[None], logprobs.float()[None], target)["kl"]):
            grads.append(torch.autograd.grad(loss, student)[0].flatten())
        assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.95
        assert 0.8 < (grads[1].norm() / grads[0].norm()).item() < 1.2


def test_training_prefers_the_exact_states_and_checks_the_topk_temperature(labelled, tmp_path):
    from asr.data.features import Encoded
    from asr.errors import AsrError
    from asr.train.data import load_teacher_targets

    out = labelled["out"]
    name = next(r["file_name"] for r in _progress(out) if r["kept"])
    positions = read_teacher_targets(out, {name})[name]["ids"].shape[0]
    example = Encoded(name, np.zeros((80, 1), np.float32), [1] * positions, [5] * positions, "x", "en")
    [targets] = load_teacher_targets([example], [str(out)], TEACHER, temperature=1.0)  # states: any temperature
    assert set(targets) == {"states"}
    topk_only = tmp_path / "topk-only"  # the same folder as `asr pseudo-label --top-k 4` alone would make it
    shutil.copytree(out, topk_only)
    settings = json.loads((topk_only / "pseudo-label.json").read_text())
    (topk_only / "pseudo-label.json").write_text(json.dumps({**settings, "teacher_states": None}))
    [targets] = load_teacher_targets([example], [str(topk_only)], TEACHER, temperature=2.0)
    assert set(targets) == {"ids", "logprobs"}
    with pytest.raises(AsrError, match=r"stored at temperature 2.0 but objective.temperature is 1.0; re-run "
                                       r"`asr pseudo-label --top-k 4 --temperature 1.0`"):
        load_teacher_targets([example], [str(topk_only)], TEACHER, temperature=1.0)
    with pytest.raises(AsrError, match=r"no cached teacher states; make the folder with `asr pseudo-label "
                                       r".* --teacher-states`"):
        load_teacher_targets([example], [str(topk_only)], TEACHER, temperature=2.0, kind="states")
    with pytest.raises(AsrError, match=r"its targets came from teacher whisper-tiny.en but the recipe's teacher is "
                                       r"whisper-base; set teacher: whisper-tiny.en"):
        load_teacher_targets([example], [str(out)], "whisper-base", temperature=2.0)


@pytest.fixture(scope="module")
def timestamped(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pl-ts") / "out"
    _cli("pseudo-label", "--teacher", TEACHER, "--data", str(source), "--out", str(out), "--wer-threshold", "50",
         "--teacher-states", "--timestamps", "--batch-size", "4")
    return out


def test_timestamped_labels_are_the_segments_and_their_targets_line_up(timestamped, labelled, source):
    """--timestamps: one decode with timestamps gives the pseudo-label (its segments' text) and their times, which
    the loader hands to training; the teacher's states are stored for the timestamped layout too, and are its
    teacher-forced states on that layout (what a KD step that draws it needs)."""
    from asr.data.features import Encoded, TIME_STEP_S
    from asr.errors import AsrError
    from asr.infer.wer import normalize
    from asr.models.loading import load_processor, load_whisper, output_embedding
    from asr.train.data import load_teacher_targets

    summary = json.loads((timestamped / "summary.json").read_text())
    assert summary["kept"] == 3 and summary["timestamped"] == 3 and summary["timestamps"] is True
    records = {r["file_name"]: r for r in _progress(timestamped) if r["kept"]}
    plain = {r["file_name"]: r["pseudo_label"] for r in _progress(labelled["out"]) if r["kept"]}
    samples = {s.id: s for s in iter_samples(open_dataset(DatasetRef.parse(str(timestamped))), SkipStats(),
                                             text_column="pseudo_label")}
    for name, record in records.items():
        segments = json.loads(record["pseudo_label_segments"])
        duration = sf.info(source / name).duration
        edges = [x for start, end, _ in segments for x in (start, end)]
        assert edges == sorted(edges) and edges[-1] <= duration and edges[-1] - edges[0] > 0.5
        assert all(round(x / TIME_STEP_S, 6) == round(x / TIME_STEP_S) for x in edges)  # on Whisper's 20 ms grid
        assert " ".join(text for _, _, text in segments) == record["pseudo_label"]
        assert normalize(record["pseudo_label"], "en") == normalize(plain[name], "en")  # same words as without
        assert samples[name].segments == [tuple(s) for s in segments]  # what training's layout reads
    model, processor = load_whisper(TEACHER), load_processor(TEACHER)
    embedding = output_embedding(TEACHER)
    stored = read_teacher_targets(timestamped, set(records))
    for name, record in records.items():
        decoder_ids, labels = label_layout(processor.tokenizer, model.generation_config, record["pseudo_label"], "en",
                                           samples[name].segments)
        positions = [j for j, label in enumerate(labels) if label != -100]
        assert stored[name]["ts.states"].shape == (len(positions), model.config.d_model)
        assert stored[name]["states"].shape[0] < len(positions)  # the plain layout has no timestamp tokens
        audio, _ = sf.read(source / name, dtype="float32")
        with torch.inference_mode():
            logits = model(input_features=log_mel(processor.feature_extractor, audio),
                           decoder_input_ids=torch.tensor([decoder_ids])).logits[0, positions]
        torch.testing.assert_close(stored[name]["ts.states"].float() @ embedding.T, logits, atol=0.1, rtol=0.01)
        example = Encoded(name, np.zeros((80, 1), np.float32), decoder_ids, labels, "x", "en", timestamped=True)
        [targets] = load_teacher_targets([example], [str(timestamped)], TEACHER, temperature=2.0)
        assert torch.equal(targets["states"], stored[name]["ts.states"])
    with pytest.raises(AsrError, match=r"no cached teacher targets for its timestamped layout in .*; re-run "
                                       r"`asr pseudo-label --timestamps` into a new --out"):
        load_teacher_targets([example], [str(labelled["out"])], TEACHER, temperature=2.0)


def test_drop_reasons_on_constructed_outputs():
    ref = "we will meet at the station tomorrow"
    assert drop_reason("We will meet at the station tomorrow.", ref, "en", False, 10) == (None, 0.0)
    assert drop_reason(" ... ", ref, "en", False, 10)[0] == "empty output"
    assert drop_reason("the the the the the", ref, "en", False, 10)[0] == "repetition loop"
    assert drop_reason("We will meet at the station", ref, "en", True, 10)[0] == "hit the token cap"
    assert drop_reason("WE WILL MEET AT THE STATION TOMORROW", ref, "en", False, 10)[0] == "all-uppercase output"
    assert drop_reason("I", "I", "en", False, 10)[0] is None  # one capital is not shouting
    assert drop_reason("We will meet at the station.", ref, "en", False, 10) == ("WER above threshold", 14.29)
    assert drop_reason("We will meet at the station.", ref, "en", False, 15) == (None, 14.29)


def test_loop_and_uppercase_outputs_are_counted_in_the_summary(monkeypatch, tmp_path, speech_folder):
    # No clip we can synthesize makes tiny.en loop or shout on demand (and a random micro teacher just runs to
    # the token cap), so the teacher's decoded tokens are replaced; everything else (audio, encoder, filters,
    # folder, summary) is the real path.
    from asr.infer.engines import HfEngine
    from asr.models.loading import load_processor

    tokenizer = load_processor(TEACHER).tokenizer
    outputs = iter([" Please call Stella. Call Stella. Call Stella. Call Stella. Call Stella.",
                    " THE QUICK BROWN FOX"])

    def scripted_decode(self, encoded, language, max_new_tokens, **kwargs):
        return [Decoded(tokenizer(next(outputs), add_special_tokens=False).input_ids, False) for _ in encoded]

    monkeypatch.setattr(HfEngine, "decode", scripted_decode)
    out = tmp_path / "out"
    line = _cli("pseudo-label", "--teacher", TEACHER, "--data", str(speech_folder), "--out", str(out),
                "--limit", "2", "--batch-size", "1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == {"repetition loop": 1, "all-uppercase output": 1} and summary["kept"] == 0
    assert "dropped 2 (1 repetition loop, 1 all-uppercase output)" in line


# Proves the trainer never loads the teacher: any load_whisper(teacher) from asr/train/loop.py fails the run.
# (The checkpoint benchmark still loads it, as the baseline row.)
_HOOK = """
import sys
import asr.models.loading as loading
_load = loading.load_whisper
def load_whisper(ref, *args, **kwargs):
    if ref == {teacher!r} and sys._getframe(1).f_code.co_filename.endswith("train/loop.py"):
        raise RuntimeError("the trainer loaded the teacher although objective.teacher_cache is on")
    return _load(ref, *args, **kwargs)
loading.load_whisper = load_whisper
"""


def _run_recipe(tmp_path: Path, name: str, source: Path, eval_data: Path, cached: dict | None,
                hook: Path | None = None) -> Path:
    """`asr run` of a 2-step KD recipe pseudo-labelling `source` first; `cached`: the stored teacher targets
    (the live teacher when None). Returns the run directory."""
    targets = cached or {"top_k": TOP_K, "teacher_states": True}
    recipe = {"name": name, "teacher": TEACHER, "prune": {"keep": [0, 3]},
              "data": {"train": [str(source)], "eval": [str(eval_data)],
                       "pseudo_label": {"wer_threshold": 50, "batch_size": 2, **targets}},
              "objective": {"method": "kd", "teacher_cache": cached is not None}, "optim": {"lr": 1e-3},
              "eval": {"limit": 2, "batch_size": 2, "max_new_tokens": 6, "latency_clips": 1, "warmup": 0},
              "train": {"max_steps": 2, "batch_size": 2, "save_every": 2, "log_every": 1, "nproc": 1},
              "tracking": {"wandb": False}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "ASR_CACHE": str(tmp_path / "cache")}
    if hook is not None:
        env["PYTHONPATH"] = f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "asr", "run", str(tmp_path / f"{name}.yaml"), "--run-dir",
                           str(tmp_path / name)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    (tmp_path / name / "stdout.txt").write_text(proc.stdout)
    return tmp_path / name


@pytest.mark.parametrize("cached", [{"top_k": TOP_K},
                                    pytest.param({"teacher_states": True}, marks=pytest.mark.slow)],
                         ids=["top-k", "states"])  # states: 105 s, the fast tier keeps top-K
def test_recipe_pseudo_labels_then_distils_from_cached_targets_without_the_teacher(source, speech_folder, tmp_path,
                                                                                   cached):
    """data.pseudo_label in a recipe: the run labels data.train first (cached), then KD reads the stored targets
    and never loads the teacher. From the final states, the losses are the live teacher's."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK.format(teacher=TEACHER))
    run = _run_recipe(tmp_path, "cached", source, speech_folder, cached, hook)
    stdout = (run / "stdout.txt").read_text()
    assert "pseudo-labelled 5 clips with whisper-tiny.en: kept 3, dropped 2" in stdout
    what = f"top-K (k={TOP_K})" if "top_k" in cached else "final decoder states (exact)"
    assert f"KD from the cached teacher {what}" in stdout and "teacher not loaded" in stdout
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
    [folder] = resolved["train"]
    assert resolved["labels"] == "pseudo" and resolved["pseudo_label"] is None
    assert Path(folder).parent == tmp_path / "cache" / "pseudo" and (Path(folder) / "summary.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["kl"] > 0 and r["ce"] > 0 for r in rows)
    assert (run / "final" / "config.json").is_file()
    if "teacher_states" in cached:
        live = _run_recipe(tmp_path, "live", source, speech_folder, None)
        live_rows = [json.loads(line) for line in (live / "metrics.jsonl").read_text().splitlines()]
        for a, b in zip(rows, live_rows):
            assert a["kl"] == pytest.approx(b["kl"], rel=2e-3) and a["ce"] == pytest.approx(b["ce"], rel=2e-3)


def test_train_batches_carry_the_cached_targets_at_the_labelled_positions():
    from asr.data.features import Encoded, WhisperCollator
    from asr.train.data import TrainBatches

    def example(name, labels):
        return Encoded(name, np.zeros((80, 3000), np.float32), [1] * len(labels), labels, "x", "en")

    examples = [example("a", [-100, 5, 6, 7]), example("b", [-100, -100, 8, 9, 10, 11])]
    targets = [{"ids": torch.arange(6, dtype=torch.int32).view(3, 2), "logprobs": torch.full((3, 2), -0.5).half(),
                "states": torch.randn(3, 5).half()},
               {"ids": torch.arange(8, dtype=torch.int32).view(4, 2) + 100, "logprobs": torch.full((4, 2), -1.5).half(),
                "states": torch.randn(4, 5).half()}]
    batches = TrainBatches(examples, WhisperCollator(0), batch_size=2, seed=0, rank=0, teacher_targets=targets)
    batch = batches.batch(0)
    order = batches.order.indices(0)
    start = 0
    for row, i in enumerate(order):  # one target row per labelled position, in the order labels[mask] takes them
        labelled = int((batch["labels"][row] != -100).sum())
        assert labelled == len(targets[i]["ids"])
        for kind, key in (("ids", "topk_ids"), ("logprobs", "topk_logprobs"), ("states", "teacher_states")):
            assert torch.equal(batch[key][start:start + labelled], targets[i][kind].to(batch[key].dtype))
        start += labelled
    assert batch["topk_ids"].shape == (7, 2) and batch["teacher_states"].shape == (7, 5)
    assert batch["topk_ids"].dtype == torch.long and batch["teacher_states"].dtype == torch.float32
