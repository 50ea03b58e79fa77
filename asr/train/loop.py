"""The recovery loop: one DeepSpeed engine around the student, an optional frozen teacher, checkpoints, bench.

Per step each rank takes its batch (a pure function of seed, rank and step), runs the student decoder on
shared encoder states (cached, or computed once for both models), gets the teacher's logits (from its final decoder
states, cached once per example where the encoder states are; else from its decoder run without gradients; or its
top-K log-probs from `asr pseudo-label`), and steps the engine. Both models' logits are computed only at the
labelled positions. NaN/inf losses are skipped on every rank together and counted.
"""
from __future__ import annotations

import json
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from asr.config import Recipe, recipe_to_dict
from asr.data.features import IGNORE_INDEX, LayoutPolicy, WhisperCollator
from asr.data.loading import SkipStats, streaming_of
from asr.errors import AsrError
from asr.models.loading import load_processor, load_whisper, output_embedding, same_encoder
from asr.models.registry import cache_dir
from asr.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from asr.train.data import (TrainBatches, cache_encoder_states, encoder_states_key, load_shard, load_teacher_targets,
                            teacher_decoder_states)
from asr.train.engine import Dist, build_engine, freeze_parts, init_distributed, use_bf16
from asr.train.evaluate import CheckpointBench
from asr.train.stream import StreamingBatches
from asr.train.objectives import ce_loss, kd_loss, kd_loss_topk
from asr.train.tracking import Tracker


PREEMPT = "PREEMPT"  # written by whoever wants the run to stop at the next step (Slurm's warning signal)
PREEMPTED = "PREEMPTED"  # written by the run when it stopped early with a checkpoint


def check_compatible(student_vocab: int, teacher_vocab: int, student_ref: str, teacher_ref: str) -> None:
    """KD compares distributions token by token: the vocabularies must be the same."""
    if student_vocab != teacher_vocab:
        raise AsrError(f"student {student_ref} has {student_vocab} tokens but teacher {teacher_ref} has "
                       f"{teacher_vocab}; distil from a teacher with the same tokenizer")


@contextmanager
def logits_only_at(model, mask: torch.Tensor) -> Iterator[None]:
    """Within the block, a Whisper's output projection reads only the positions where `mask` [B, T] is set, so its
    forward returns logits [N, V] for them, in row-major order (a hook on the module: DeepSpeed's forward and
    backward wrap the call unchanged)."""
    handle = model.proj_out.register_forward_pre_hook(lambda module, args: (args[0][mask], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Trainer:
    """Everything one rank needs to run, checkpoint and resume a recovery run."""

    run_dir: Path
    recipe: Recipe
    dist: Dist = field(init=False)

    def __post_init__(self) -> None:
        """Set-up in the order the data flows: ranks and seeds, models, data, engine, tracking, bench."""
        self.dist = init_distributed(self.recipe.train.threads_per_proc)
        self.seed_everything()
        self.bf16 = self.agreed_bf16()
        student = self.load_models()
        self.stats = SkipStats()
        self.batches = self.load_data(student)
        self.place_teacher(student)
        self.encoder_key: str | None = None  # the cached encoder states' key, which the teacher's states build on
        self.cache_encoder(student)
        self.cache_teacher()
        self.engine = build_engine(student, self.recipe.train, self.recipe.optim, self.bf16)
        self.train_mode()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.untimed = 0.0  # seconds spent checkpointing since the last logged step: not training time
        r = self.recipe
        self.tracker = Tracker(self.run_dir, recipe_to_dict(r), r.tracking.project, r.tracking.mode,
                               r.tracking.wandb and self.dist.is_main, self.run_dir.name)
        self.bench = CheckpointBench(self.run_dir, r, self.dist, self.teacher, self.dtype)
        if self.dist.is_main:
            print(f"{self.dist.world} process(es) on {dist.get_backend()}, rank 0 on {self.dist.device}, "
                  f"{str(self.dtype).removeprefix('torch.')}", flush=True)

    @property
    def teacher_cache(self) -> bool:
        """KD from the teacher's cached targets instead of a live teacher."""
        return bool(self.recipe.objective.method == "kd" and self.recipe.objective.teacher_cache)

    def agreed_bf16(self) -> bool:
        """bf16 on every rank or on none: 'auto' reads each host's hardware, and ranks on hosts that differ (CPU
        nodes with and without AVX512-BF16) would otherwise build engines of different dtypes."""
        mine = use_bf16(self.recipe.train.bf16)
        return bool(self.dist.all_reduce([float(mine)], op=dist.ReduceOp.MIN).item())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the models compute in: bf16 where the recipe (or 'auto' on capable hardware) asks for it."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def seed_everything(self) -> None:
        seed = self.recipe.train.seed + self.dist.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def load_models(self):
        """The pruned student (encoder frozen if asked) and, for live KD, the frozen teacher on the CPU."""
        r = self.recipe
        student_dir = self.run_dir / "student"
        self.processor = load_processor(str(student_dir))
        student = load_whisper(str(student_dir))
        self.teacher = None
        if self.teacher_cache and r.data.labels != "pseudo":
            raise AsrError("objective.teacher_cache: the cached teacher targets are aligned to the pseudo-labels; "
                           "set data.labels=pseudo")
        if r.objective.method == "kd" and not self.teacher_cache:
            self.teacher = load_whisper(r.teacher)
            check_compatible(student.config.vocab_size, self.teacher.config.vocab_size, str(student_dir), r.teacher)
            self.teacher.requires_grad_(False)
        freeze_parts(student, r.train)
        self.shared_encoder = r.train.freeze_encoder and r.train.share_encoder and (
            self.teacher is None or same_encoder(student, self.teacher))
        return student

    def load_data(self, student) -> TrainBatches | StreamingBatches:
        """This rank's batches: streamed as it trains, or its shard encoded up front."""
        r = self.recipe
        text_column = "pseudo_label" if r.data.labels == "pseudo" else None
        collator = WhisperCollator(student.generation_config.pad_token_id)
        self.layout_counts: dict[str, int] | None = None  # counted up front only; a stream's are not
        if streaming_of(r):
            stream = StreamingBatches(r.data.train, self.processor, student.generation_config, collator,
                                      r.train.batch_size, r.train.seed, self.dist.rank, self.dist.world,
                                      r.data.max_label_tokens, r.data.fallback_language, self.stats, text_column,
                                      r.data.train_limit, layout=self.layout(), num_workers=r.data.num_workers)
            self.check_every_rank_has_samples(int(stream.has_samples()))
            return stream
        return self.in_memory_batches(student, collator, text_column)

    def check_every_rank_has_samples(self, count: int) -> list[int]:
        """Every rank's count of usable samples (a streamed rank reports whether it has one), or one error naming
        each rank left without any: such a rank would stop alone while the others wait in the first collective."""
        shares = self.dist.gather_objects((count, self.stats.summary()))
        if empty := [f"rank {rank}: {summary}" for rank, (n, summary) in enumerate(shares) if n == 0]:
            raise AsrError(f"{len(empty)} of {self.dist.world} ranks got no usable training samples from "
                           f"{self.recipe.data.train} ({'; '.join(empty)}); add data or use fewer processes")
        return [n for n, _ in shares]

    def layout(self) -> LayoutPolicy:
        """Cached teacher targets were made without a prompt, so under the cache prompts default to none
        (check_recipe refuses asking for them)."""
        d = self.recipe.data
        prompts = 0.0 if self.teacher_cache and d.condition_on_prev_probability is None else \
            d.condition_on_prev_probability
        return LayoutPolicy(d.timestamp_probability, prompts, self.recipe.train.seed)

    def place_teacher(self, student) -> None:
        """The live teacher on the run's device and dtype, or the output projection that turns cached teacher
        states into logits."""
        r = self.recipe
        if self.teacher is not None:
            self.teacher.to(self.dist.device, self.dtype)
        self.teacher_out = None
        targets = None if isinstance(self.batches, StreamingBatches) else self.batches.teacher_targets
        if targets and "states" in targets[0]:
            self.teacher_out = output_embedding(r.teacher).to(self.dist.device, self.dtype)
            check_compatible(student.config.vocab_size, self.teacher_out.shape[0], str(self.run_dir / "student"),
                             r.teacher)

    def train_mode(self) -> None:
        """Dropout and layerdrop from the student's config on (load_whisper returns eval mode), except in a frozen
        encoder, whose states must equal those cached and shared with the teacher. The checkpoint bench loads each
        saved student afresh, in eval mode."""
        self.engine.train()
        if self.recipe.train.freeze_encoder:
            self.engine.module.model.encoder.eval()

    def in_memory_batches(self, student, collator: WhisperCollator, text_column: str | None) -> TrainBatches:
        """This rank's shard encoded up front, with cached encoder states and teacher targets where configured."""
        r = self.recipe
        examples = load_shard(r.data.train, self.processor, student.generation_config, self.dist.rank,
                              self.dist.world, r.data.max_label_tokens, r.data.train_limit, r.data.fallback_language,
                              self.stats, text_column=text_column, layout=self.layout())
        self.layout_counts = {"examples": len(examples), "timestamped": sum(e.timestamped for e in examples),
                              "prompted": sum(e.prompted for e in examples)}
        counts = self.check_every_rank_has_samples(len(examples))  # the largest sets epochs
        targets = None
        if self.teacher_cache:
            targets = load_teacher_targets(examples, r.data.train, r.teacher, r.objective.temperature,
                                           r.objective.teacher_cache)
            if self.dist.is_main:
                what = ("final decoder states (exact)" if "states" in targets[0]
                        else f"top-K (k={targets[0]['ids'].shape[1]})")
                print(f"KD from the cached teacher {what} in {', '.join(r.data.train)}; teacher not loaded", flush=True)
        return TrainBatches(examples, collator, r.train.batch_size, r.train.seed, self.dist.rank,
                            teacher_targets=targets, group_by_length=r.train.group_by_length,
                            epoch_size=max(counts))

    def cache_encoder(self, student) -> None:
        """With a frozen encoder shared by both models and the data in memory, its states of every clip, computed
        once where the run computes: the encoder moves to the run's device and dtype first (the engine moves the
        rest), so the cached states are those the step would compute, at the device's speed."""
        r = self.recipe
        if not (isinstance(self.batches, TrainBatches) and r.train.cache_encoder and self.shared_encoder):
            return
        encoder = student.model.encoder.to(self.dist.device, self.dtype)
        self.encoder_key = encoder_states_key(self.batches.examples, encoder)
        self.batches.encoder_states = cache_encoder_states(self.batches.examples, encoder, self.encoder_key,
                                                           cache_dir() / "encoder-states",
                                                           show_progress=self.dist.is_main)
        for e in self.batches.examples:
            e.input_features = e.input_features[:, :0]  # features are no longer needed: free the memory

    def cache_teacher(self) -> None:
        """Live KD over cached encoder states: the teacher's final decoder states of every example, computed once
        here (an example's prompt and timestamps are fixed when it is encoded), so each step projects them instead
        of running the teacher's decoder: the same loss, the teacher's decoder run once per example instead of once
        per epoch. About a tenth of the encoder states, kept on disk beside them: a resume reads them back."""
        if not (self.teacher is not None and self.recipe.train.cache_teacher and isinstance(self.batches, TrainBatches)
                and self.batches.encoder_states is not None):
            return
        self.batches.teacher_targets = teacher_decoder_states(
            self.batches.examples, self.batches.encoder_states, self.encoder_key, self.teacher, self.batches.collator,
            cache_dir() / "teacher-states", show_progress=self.dist.is_main)
        self.teacher_out = self.teacher.proj_out.weight

    # --- one step --------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss parts for one micro-batch, from logits at the labelled positions only ([N, V]): prompt, prefix and
        padding positions carry no loss, and the projection onto the vocabulary is most of a small decoder's
        compute per token."""
        dtype, dev = self.dtype, self.dist.device
        decoder = {"decoder_input_ids": batch["decoder_input_ids"].to(dev),
                   "decoder_attention_mask": batch["decoder_attention_mask"].to(dev)}
        labels = batch["labels"].to(dev)
        mask = labels != IGNORE_INDEX
        with logits_only_at(self.engine.module, mask):
            if "encoder_states" in batch:
                encoder_states = batch["encoder_states"].to(dev, dtype)
                out = self.engine(encoder_outputs=(encoder_states,), **decoder)
            else:
                out = self.engine(input_features=batch["input_features"].to(dev, dtype), **decoder)
                encoder_states = out.encoder_last_hidden_state.detach()
        o, targets = self.recipe.objective, labels[mask]
        if "teacher_states" in batch:  # exact: the teacher's logits from its cached final states
            teacher_logits = batch["teacher_states"].to(dev, self.teacher_out.dtype) @ self.teacher_out.T
            return kd_loss(out.logits, teacher_logits, targets, o.temperature, o.alpha_kl, o.alpha_ce)
        if "topk_ids" in batch:
            return kd_loss_topk(out.logits, batch["topk_ids"].to(dev), batch["topk_logprobs"].to(dev),
                                targets, o.temperature, o.alpha_kl, o.alpha_ce)
        if self.teacher is None:
            ce = ce_loss(out.logits, targets)
            return {"loss": ce, "ce": ce}
        with torch.no_grad(), logits_only_at(self.teacher, mask):
            if self.shared_encoder:
                teacher_logits = self.teacher(encoder_outputs=(encoder_states,), **decoder).logits
            else:
                teacher_logits = self.teacher(input_features=batch["input_features"].to(dev, dtype), **decoder).logits
        return kd_loss(out.logits, teacher_logits, targets, o.temperature, o.alpha_kl, o.alpha_ce)

    def stop_requested(self) -> bool:
        """Preemption: SIGUSR1/SIGTERM on any rank, or RUN/PREEMPT written by a Slurm batch script."""
        return self.dist.all_reduce([1.0 if self._signalled or (self.run_dir / PREEMPT).exists() else 0.0]).item() > 0

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def all_finite(self, loss: torch.Tensor) -> bool:
        return self.dist.all_reduce([0.0 if torch.isfinite(loss.detach()).all() else 1.0]).item() == 0.0

    # --- the run ---------------------------------------------------------------------------------------
    def resume(self) -> tuple[int, list[dict]]:
        ckpt = latest_checkpoint(self.ckpt_root)
        if ckpt is None:
            return 0, []
        state = load_checkpoint(self.engine, ckpt, self.dist.world)
        if not self.bench.benched(state["step"]):  # saved at preemption: bench it now
            self.bench_checkpoint(ckpt, state["step"])
        mine = state["rng"][self.dist.rank]
        torch.set_rng_state(mine["torch"])
        if mine.get("cuda") is not None and self.dist.device.type == "cuda":  # dropout on a GPU draws from its own
            torch.cuda.set_rng_state(mine["cuda"], self.dist.device)
        np.random.set_state(mine["numpy"])
        random.setstate(mine["python"])
        if isinstance(self.batches, StreamingBatches):
            self.batches.restore(state["data"][self.dist.rank])
        if self.dist.is_main:
            print(f"resumed from {ckpt} at step {state['step']}", flush=True)
        return state["step"], state["history"]

    def rng_states(self) -> list[dict]:
        cuda = torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None
        return self.dist.gather_objects({"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(),
                                         "python": random.getstate()})

    def checkpoint(self, step: int, history: list[dict], bench: bool = True) -> None:
        """Save, then bench on every rank unless `bench` is off (both collective): a preemption checkpoint must fit
        Slurm's warning window, so it is benched after the resume."""
        started = time.perf_counter()
        streaming = isinstance(self.batches, StreamingBatches)  # in-memory batches are a function of the step
        client = {"step": step, "history": history, "rng": self.rng_states(),
                  "data": self.dist.gather_objects(self.batches.state()) if streaming else None}
        ckpt = save_checkpoint(self.engine, self.ckpt_root, step, client, self.recipe.train.zero_stage, self.processor,
                               fp32_source=self.run_dir / "student" if self.bf16 else None)
        if bench:
            self.bench_checkpoint(ckpt, step)
        dist.barrier()
        self.untimed += time.perf_counter() - started

    def bench_checkpoint(self, ckpt: Path, step: int) -> None:
        """Bench a saved checkpoint on every rank; rank 0 logs it and prunes the old ones (keeping the best)."""
        record = self.bench.checkpoint(ckpt / "hf", step)
        if record is None:
            return
        self.tracker.log({"eval/wer": record["wer"], "eval/cer": record["cer"],
                          "eval/repetition_rate": record["repetition_rate"],
                          "eval/decoder_ms_per_token": record["latency"]["decoder_ms_per_token_p50"],
                          **{f"eval/wer/{name}": wer for name, wer in record["wer_by_dataset"].items()}}, step)
        prune_checkpoints(self.ckpt_root, self.recipe.train.keep_last, self.bench.best_checkpoint(self.ckpt_root))

    def save_if_due(self, step: int, history: list[dict]) -> bool:
        """Checkpoint every save_every steps and at the end, or now if preemption is requested (then True: stop)."""
        t = self.recipe.train
        stop = step < t.max_steps and self.stop_requested()
        if stop or step % t.save_every == 0 or step == t.max_steps:
            self.checkpoint(step, history, bench=not stop)
        if not stop:
            return False
        if self.dist.is_main:
            (self.run_dir / PREEMPTED).write_text(str(step))
            print(f"preempted: checkpoint at step {step} saved (benched after the resume); re-run to resume",
                  flush=True)
        return True

    def train_step(self, step: int) -> tuple[dict[str, float] | None, int, int]:
        """One optimizer step over grad_accum micro-batches: (mean loss parts, or None when a loss was not finite
        on some rank and the gradients were dropped; samples; labelled tokens), counts over all ranks. With
        grad_accum > 1 a non-finite loss stops the run instead (every rank at once)."""
        t = self.recipe.train
        parts_sum: dict[str, float] = {}
        samples, tokens = 0, 0
        for micro in range(t.grad_accum):
            batch = self.batches.batch(step * t.grad_accum + micro)
            samples += len(batch["labels"]) * self.dist.world
            tokens += int((batch["labels"] != IGNORE_INDEX).sum()) * self.dist.world
            parts = self.losses(batch)
            if not self.all_finite(parts["loss"]):
                if t.grad_accum > 1:  # DeepSpeed holds this window's earlier micro-batches: no clean skip
                    raise AsrError(f"non-finite loss at step {step + 1} (micro-batch {micro + 1} of {t.grad_accum}); "
                                   "with train.grad_accum > 1 it cannot be skipped: re-run to resume from the last "
                                   "checkpoint with a lower optim.lr, or set train.grad_accum=1 to skip such steps")
                self.engine.optimizer.zero_grad()
                return None, samples, tokens
            self.engine.backward(parts["loss"])
            self.engine.step()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.item() / t.grad_accum
        return parts_sum, samples, tokens

    def run(self) -> list[dict]:
        """Train to max_steps, or until preempted (then checkpoint and return; the job requeues and resumes)."""
        t = self.recipe.train
        self._signalled = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        start, history = self.resume()
        metrics_file = self.run_dir / "metrics.jsonl"
        if self.dist.is_main:  # the loss curve up to the checkpoint we resumed from, then appended per step
            metrics_file.write_text("".join(json.dumps(row) + "\n" for row in history))
        if start == 0:
            self.bench.baselines()
        # every step either appends a history row or was skipped, so the count survives a resume
        bad_in_row, skipped, samples, tokens = 0, start - len(history), 0, 0
        last_log = time.perf_counter()
        for step in range(start, t.max_steps):
            lr = self.engine.get_lr()[0]  # the LR this step trains with (the scheduler moves it after the step)
            parts_sum, step_samples, step_tokens = self.train_step(step)
            samples, tokens = samples + step_samples, tokens + step_tokens
            if parts_sum is None:  # the weights are still those of the last good step: checkpoints stay on schedule
                bad_in_row, skipped = bad_in_row + 1, skipped + 1
                if self.dist.is_main:
                    print(f"step {step + 1}/{t.max_steps} skipped: non-finite loss ({bad_in_row} in a row, "
                          f"{skipped} in total)", flush=True)
                if bad_in_row >= t.max_bad_steps:
                    raise AsrError(f"{bad_in_row} non-finite losses in a row at step {step + 1}; lower optim.lr or "
                                   "check the data (train.max_bad_steps sets the limit)")
                if self.save_if_due(step + 1, history):
                    return history
                continue
            bad_in_row = 0
            mean = self.dist.all_reduce([parts_sum[k] for k in sorted(parts_sum)])
            row = {"step": step + 1, **{k: v / self.dist.world for k, v in zip(sorted(parts_sum), mean.tolist())},
                   "lr": lr}
            history.append(row)
            if self.dist.is_main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if (step + 1) % t.log_every == 0 or step + 1 == t.max_steps:
                elapsed = time.perf_counter() - last_log - self.untimed
                last_log, self.untimed = time.perf_counter(), 0.0
                grad_norm = self.engine.get_global_grad_norm()
                metrics = {**{f"train/{k}": v for k, v in row.items() if k != "step"},
                           "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "train/samples_per_s": samples / elapsed, "train/tokens_per_s": tokens / elapsed,
                           "train/skipped_steps": skipped}
                self.tracker.log(metrics, step + 1)
                if self.dist.is_main:
                    print(f"step {step + 1}/{t.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                                        if k != "step")
                          + f" {samples / elapsed:.2f} samples/s", flush=True)
                samples, tokens = 0, 0
            if self.save_if_due(step + 1, history):
                return history
        if self.dist.is_main:
            (self.run_dir / PREEMPTED).unlink(missing_ok=True)
        self.finish(history, skipped)
        return history

    def finish(self, history: list[dict], skipped: int) -> None:
        devices = self.dist.gather_objects(str(self.dist.device))  # where each rank ran: its own GPU, or the CPU
        if self.dist.is_main:
            summary = {"steps": len(history), "skipped_nonfinite_steps": skipped,
                       "skipped_samples_rank0": dict(self.stats.counts), "final_loss": history[-1] if history else None,
                       "label_layout_rank0": self.layout_counts, "backend": dist.get_backend(), "devices": devices,
                       "dtype": str(self.dtype).removeprefix("torch.")}
            (self.run_dir / "train-summary.json").write_text(json.dumps(summary, indent=2))
            self.bench.finalize(self.ckpt_root)
            self.tracker.log_artifact(self.run_dir / "bench", "bench")
            self.tracker.finish()
        dist.barrier()
