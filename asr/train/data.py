"""Training data per rank: a shard of the datasets, encoded once, optionally with cached encoder states.

The order is a pure function of (seed, rank, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen. With a frozen encoder shared by teacher and student, encoder states are
computed once per clip (fp16, on disk in the run directory) and reused every epoch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from asr.data.features import IGNORE_INDEX, Encoded, LayoutPolicy, WhisperCollator, encode_sample
from asr.data.loading import DatasetRef, Sample, SkipStats, iter_samples, open_dataset
from asr.label.targets import TIMESTAMPED, read_teacher_targets, settings_of
from asr.errors import AsrError
from asr.models.loading import weights_fingerprint


def load_shard(datasets: Sequence[str], processor, generation_config, rank: int, world: int,
               max_label_tokens: int, limit: int | None, language: str, stats: SkipStats,
               text_column: str | None = None, layout: LayoutPolicy | None = None) -> list[Encoded]:
    """This rank's share of every training dataset, as encoded examples (bad samples skipped and counted);
    `text_column` picks the target transcript (e.g. 'pseudo_label'), default the dataset's reference."""
    from datasets.distributed import split_dataset_by_node

    examples: list[Encoded] = []
    for ref in datasets:
        ds = split_dataset_by_node(open_dataset(DatasetRef.parse(ref)), rank=rank, world_size=world)
        per_rank = None if limit is None else -(-limit // world)
        samples = tqdm(iter_samples(ds, stats, default_language=language, limit=per_rank, text_column=text_column),
                       desc=f"rank {rank}: encoding {DatasetRef.parse(ref).label}", unit="clip", disable=rank != 0)
        examples.extend(encode_samples(samples, processor, generation_config, max_label_tokens, stats, layout))
    return examples


def encode_samples(samples: Iterable[Sample], processor, generation_config, max_label_tokens: int,
                   stats: SkipStats, layout: LayoutPolicy | None = None) -> Iterator[Encoded]:
    """Training examples of decoded samples; transcripts over max_label_tokens are skipped and counted.
    `layout` picks timestamped targets and previous-text prompts (the prompt is the timed sentences read before
    the clip where the data has them, else the text of the previous sample in the same language); None: plain
    transcripts."""
    previous: dict[str, str] = {}
    for sample in samples:
        earlier = sample.previous or previous.get(sample.language)
        timestamped, prompt = layout.draw(sample, earlier) if layout else (False, None)
        previous[sample.language] = sample.text
        encoded = encode_sample(sample, processor, generation_config, max_label_tokens, timestamped, prompt)
        if encoded is None:
            stats.skip("transcript too long", sample.id)
        else:
            yield encoded


@dataclass
class BatchOrder:
    """Indices of this rank's batch at any step: epochs are fresh permutations, deterministic per (seed, rank).
    An epoch is `epoch_size` examples (the largest rank's count; a smaller rank repeats a few of its own, as torch's
    DistributedSampler pads), so every rank's epoch starts at the same step. With `lengths` (train.group_by_length)
    each batch holds examples of similar length, and every rank's batch of one step is of similar length too: a
    step waits for its slowest rank. The epochs a batch can span (the current one and the next) are kept, not
    recomputed per step."""

    n: int
    batch_size: int
    seed: int
    rank: int
    lengths: Sequence[int] | None = None
    epoch_size: int | None = None  # default n

    def __post_init__(self) -> None:
        self._orders: dict[int, np.ndarray] = {}
        self.epoch_size = max(self.epoch_size or self.n, self.n)

    def indices(self, step: int) -> list[int]:
        start = step * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.epoch_size)
            out.extend(self._epoch(epoch)[offset:offset + self.batch_size - len(out)].tolist())
        return out

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch]

    def _order(self, epoch: int) -> np.ndarray:
        """One epoch's example order. Grouped by length: transformers' grouping of this rank's examples (a random
        permutation cut into mega-batches of 50 batches, each sorted by length), then the batches ranked by length
        and played in an order drawn alike on every rank (seeded without the rank), so the ranks' k-th batches are
        of similar rank in length: padding shrinks, no rank waits long for another (2 ranks ordered independently
        lost 16% of the quickstart's step time), and no mega-batch runs from long to short labels."""
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        examples = rng.permutation(self.n)
        examples = np.concatenate([examples, np.resize(rng.permutation(self.n), self.epoch_size - self.n)])  # repeats
        if self.lengths is None:
            return examples
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        grouped = examples[get_length_grouped_indices([self.lengths[i] for i in examples], self.batch_size,
                                                      generator=generator)]
        batches = np.array_split(grouped, range(self.batch_size, self.epoch_size, self.batch_size))
        by_length = sorted(batches, key=lambda b: sum(self.lengths[i] for i in b))
        # the j-th batch played is the one whose length ranks where the j-th of draws shared by the ranks ranks
        draws = np.random.default_rng([self.seed, epoch]).random(len(batches))
        return np.concatenate([by_length[r] for r in np.argsort(np.argsort(draws))])


BATCH_KEYS = {"ids": "topk_ids", "logprobs": "topk_logprobs", "states": "teacher_states"}


@dataclass
class TrainBatches:
    """Collated batches for any step, with `encoder_states` in place of features when cached, and the cached
    teacher targets when given: `topk_ids` and `topk_logprobs` [N, K], or `teacher_states` [N, d], one row per
    labelled position of the batch (row-major, as `labels[labels != IGNORE_INDEX]` orders them)."""

    examples: list[Encoded]
    collator: WhisperCollator
    batch_size: int
    seed: int
    rank: int
    encoder_states: torch.Tensor | None = None  # [N, frames, d_model] fp16
    teacher_targets: list[dict[str, torch.Tensor]] | None = None  # per example: kind -> [P, K or d]
    group_by_length: bool = False  # batches of similar decoder-sequence length (train.group_by_length)
    epoch_size: int | None = None  # the largest rank's example count (BatchOrder)

    def __post_init__(self) -> None:
        lengths = [len(e.decoder_input_ids) for e in self.examples] if self.group_by_length else None
        self.order = BatchOrder(len(self.examples), self.batch_size, self.seed, self.rank, lengths, self.epoch_size)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = self.order.indices(step)
        batch = self.collator([self.examples[i] for i in idx])
        if self.encoder_states is not None:
            del batch["input_features"]
            batch["encoder_states"] = self.encoder_states[idx]
        if self.teacher_targets is not None:  # rows in the order of labels[labels != IGNORE_INDEX]
            for kind in self.teacher_targets[0]:
                dtype = torch.long if kind == "ids" else torch.float32
                batch[BATCH_KEYS[kind]] = torch.cat([self.teacher_targets[i][kind] for i in idx]).to(dtype)
        return batch


def load_teacher_targets(examples: Sequence[Encoded], datasets: Sequence[str], teacher: str, temperature: float,
                         kind: bool | str = True) -> list[dict[str, torch.Tensor]]:
    """The cached teacher targets of every example (same order) from `asr pseudo-label` folders: `kind` "states"
    (final decoder states, exact), "top_k" (made at the objective's `temperature`), or True: the states where
    every folder has them, else the top-K. A timestamped example takes the targets stored for its timestamped
    layout (`asr pseudo-label --timestamps`)."""
    settings = {ref: settings_of(Path(ref)) or {} for ref in datasets}
    use_states = kind == "states" or (kind is True and all(made.get("teacher_states") for made in settings.values()))
    for ref, made in settings.items():
        if not made.get("teacher_states" if use_states else "top_k"):
            raise AsrError(f"{ref}: no cached teacher {'states' if use_states else 'top-K'}; make the folder with "
                           f"`asr pseudo-label --teacher {teacher} --data SOURCE --out DIR "
                           f"{'--teacher-states' if use_states else '--top-k 32'}`, or set objective.teacher_cache "
                           "to what the folder holds (false: the live teacher)")
        if made["teacher"] != teacher:
            raise AsrError(f"{ref}: its targets came from teacher {made['teacher']} but the recipe's teacher is "
                           f"{teacher}; set teacher: {made['teacher']} or re-run `asr pseudo-label` with {teacher}")
        if not use_states and made.get("temperature") != temperature:
            was = (f"at temperature {made['temperature']}" if made.get("temperature") is not None
                   else "by an older asr-distill, without the mass outside the top K")
            raise AsrError(f"{ref}: its top-K was stored {was} but objective.temperature is {temperature}; re-run "
                           f"`asr pseudo-label --top-k {made['top_k']} --temperature {temperature}` into a new --out")
    kinds = ("states",) if use_states else ("ids", "logprobs")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for ref in datasets:
        found.update(read_teacher_targets(Path(ref), {e.id for e in examples}))
    out = []
    for e in examples:
        prefix = TIMESTAMPED if e.timestamped else ""
        if e.id not in found or any(prefix + k not in found[e.id] for k in kinds):
            fix = ("re-run `asr pseudo-label --timestamps` into a new --out, or set data.timestamp_probability=0"
                   if e.timestamped else "re-run `asr pseudo-label` on its folder to finish it")
            raise AsrError(f"{e.id}: no cached teacher targets{' for its timestamped layout' * e.timestamped} in "
                           f"{', '.join(datasets)}; {fix}")
        positions = sum(label != IGNORE_INDEX for label in e.labels)
        stored = found[e.id][prefix + kinds[0]].shape[0]
        if stored != positions:
            raise AsrError(f"{e.id}: cached teacher targets cover {stored} label positions but the transcript has "
                           f"{positions}; train on the pseudo-labels (data.labels=pseudo)")
        out.append({k: found[e.id][prefix + k] for k in kinds})
    return out


@torch.inference_mode()
def teacher_decoder_states(examples: Sequence[Encoded], encoder_states: torch.Tensor, states_key: str, teacher,
                           collator: WhisperCollator, cache_root: Path, batch_size: int = 8,
                           show_progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """The teacher's final decoder states at each example's labelled positions ({"states": [P, d]}, on the CPU in
    the teacher's dtype), from the cached encoder states (`states_key`: their cache key), in batches of similar
    length: with them a step gets the live teacher's logits from one projection instead of running its decoder
    every epoch. Kept on disk like the encoder states, keyed on those, the teacher's decoder weights (the encoder's
    are in `states_key`) and every example's decoder sequence, so a resume or another run over the same layout reads
    them back."""
    weight = next(teacher.parameters())
    h = hashlib.sha256(f"{states_key} {weights_fingerprint(teacher.model.decoder)} {weight.device.type} "
                       f"{weight.dtype}".encode())
    for e in examples:
        h.update(np.asarray(e.decoder_input_ids + [-1] + e.labels, dtype=np.int64).tobytes())

    def compute() -> dict[str, torch.Tensor]:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].decoder_input_ids))
        out: dict[int, torch.Tensor] = {}
        for start in tqdm(range(0, len(order), batch_size), desc="caching the teacher's decoder states",
                          unit="batch", disable=not show_progress):
            idx = order[start:start + batch_size]
            batch = collator([examples[i] for i in idx])
            hidden = teacher.model(encoder_outputs=(encoder_states[idx].to(weight.device, weight.dtype),),
                                   decoder_input_ids=batch["decoder_input_ids"].to(weight.device),
                                   decoder_attention_mask=batch["decoder_attention_mask"].to(weight.device)
                                   ).last_hidden_state
            for row, i in enumerate(idx):
                out[i] = hidden[row][batch["labels"][row] != IGNORE_INDEX].cpu()
        rows = [out[i] for i in range(len(examples))]
        return {"states": torch.cat(rows), "lengths": torch.tensor([len(t) for t in rows])}

    saved = _kept_on_disk(cache_root / f"{h.hexdigest()[:24]}.safetensors", compute)
    return [{"states": t} for t in torch.split(saved["states"], saved["lengths"].tolist())]


def encoder_states_key(examples: Sequence[Encoded], encoder) -> str:
    """What the encoder states of `examples` depend on: the clips, the encoder weights, device type and dtype.
    Every frame of every clip is hashed (~1 s for 1,000 clips): a clip that changes only after its first half
    second (a later sentence, a different channel) keeps its id, and must not get its old states back."""
    weight = next(encoder.parameters())
    h = hashlib.sha256(f"{weights_fingerprint(encoder)} {weight.device.type} {weight.dtype}".encode())
    for e in examples:
        h.update(e.id.encode())
        h.update(np.ascontiguousarray(e.input_features))  # the array's buffer: no copy of it
    return h.hexdigest()[:24]


def _kept_on_disk(path: Path, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`compute()`'s tensors, read back from `path` when a run already wrote them there (written under another
    name and renamed, so a run killed mid-write leaves no half file to read)."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(path)
    tensors = {name: t.contiguous() for name, t in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp)
    tmp.rename(path)
    return tensors


@torch.inference_mode()
def cache_encoder_states(examples: Sequence[Encoded], encoder, key: str, cache_root: Path, batch_size: int = 8,
                         show_progress: bool = True) -> torch.Tensor:
    """Encoder states of every example, computed on the encoder's device and in its dtype once and kept on disk
    (fp16) under `key` (`encoder_states_key`), so every run over the same data and teacher (and every resume)
    reuses them."""
    weight = next(encoder.parameters())

    def compute() -> dict[str, torch.Tensor]:
        chunks = []
        for start in tqdm(range(0, len(examples), batch_size), desc="caching encoder states", unit="batch",
                          disable=not show_progress):
            feats = torch.from_numpy(np.stack([e.input_features for e in examples[start:start + batch_size]]))
            chunks.append(encoder(feats.to(weight.device, weight.dtype)).last_hidden_state.to("cpu", torch.float16))
        return {"states": torch.cat(chunks)}

    return _kept_on_disk(cache_root / f"{key}.safetensors", compute)["states"]
