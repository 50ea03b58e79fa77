"""Streaming training data (`data.streaming`): batches read, decoded and encoded as training goes, for datasets
too large to hold in memory (hub datasets by default).

Each rank reads its part of every training set (whole shards where they divide among the ranks, else every
world-th row), interleaved when there are several, through a seeded shuffle buffer that is reseeded every epoch.
DataLoader workers decode the audio and compute the log-mels ahead of the step; the training process only labels
and collates. Batches must be asked for in step order. The position (epoch, rows consumed in it by the trainer,
not by the workers' read-ahead) goes into every checkpoint; a resume replays the same shuffled stream and drops
the consumed rows without decoding them, so the batches after a resume are exactly those of the uninterrupted
run. (`datasets`' own state_dict() refills its shuffle buffer on resume with other rows, so it is not used.)
Bad samples are skipped and counted in the first epoch (later epochs meet them again and do not recount them).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from itertools import islice
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from asr.data.features import Encoded, LayoutPolicy, WhisperCollator, log_mel
from asr.data.loading import DatasetRef, Sample, SkipStats, iter_samples, open_dataset
from asr.errors import AsrError
from asr.train.data import encode_samples
from asr.train.main import die_with_parent

# (row in the epoch, sample with features, skip, error): a worker's AsrError travels as data, since the DataLoader
# re-raises a worker's exception with the worker's traceback folded into its message
Decoded = tuple[int, Sample | None, tuple[str, str] | None, str | None]


def _owned(_row: dict, index: int, rank: int, world: int) -> bool:
    return index % world == rank


def rank_share(source, rank: int, world: int):
    """This rank's part of one stream: whole shards when they divide among the ranks, so a rank opens only its own
    files; else every world-th row, which every rank reads the whole stream to find."""
    if source.num_shards % world == 0:
        return source.shard(num_shards=world, index=rank, contiguous=False)
    return source.filter(partial(_owned, rank=rank, world=world), with_indices=True)


def rank_stream(sources: Sequence, rank: int, world: int, seed: int, limit: int | None = None,
                shuffle_buffer: int = 1000):
    """The shuffled stream of this rank: its share of each source (split per source, as the shard counts of
    interleaved sets differ), interleaved, at most ceil(limit / world) rows."""
    from datasets import interleave_datasets

    shares = [rank_share(source, rank, world) for source in sources]
    ds = shares[0] if len(shares) == 1 else interleave_datasets(shares, seed=seed, stopping_strategy="all_exhausted")
    if limit is not None:
        ds = ds.take(-(-limit // world))
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer)


class DecodedRows(IterableDataset):
    """One epoch of a rank's stream from row `skip` on, decoded, with log-mel features in place of the audio.
    DataLoader worker k of W decodes rows k, k+W, ... and yields one item per row it owns, so the loader's
    round-robin over workers returns the rows in stream order."""

    def __init__(self, ds, epoch: int, skip: int, feature_extractor, language: str, text_column: str | None):
        self.ds, self.epoch, self.skip, self.feature_extractor = ds, epoch, skip, feature_extractor
        self.language, self.text_column = language, text_column

    def rows(self) -> Iterator[dict]:
        self.ds.set_epoch(self.epoch)
        # `for row in ds` in a DataLoader worker reads only some of the shards (datasets 5.2 splits them among
        # workers); `iter()` reads the whole stream, which the workers split by row below
        return ({key: values[0] for key, values in batch.items()} for batch in self.ds.iter(batch_size=1))

    def __iter__(self) -> Iterator[Decoded]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # an fsspec event loop inherited through fork hangs (datasets resets it for its own)
            import fsspec.asyn

            fsspec.asyn.reset_lock()
        for offset, row in enumerate(islice(self.rows(), self.skip, None)):
            if offset % workers != worker:
                continue
            stats = SkipStats()
            try:
                sample = next(iter_samples([row], stats, default_language=self.language,
                                           text_column=self.text_column), None)
            except AsrError as exc:
                yield self.skip + offset, None, None, str(exc)
                return
            if sample is not None:
                features = log_mel(self.feature_extractor, sample.audio)[0].numpy()
                sample = dataclasses.replace(sample, audio=np.zeros(0, np.float32), features=features)
            skip = next(((reason, names[0]) for reason, names in stats.examples.items()), None)
            yield self.skip + offset, sample, skip, None


def _as_is(item: Decoded) -> Decoded:
    return item


def _start_worker(worker_id: int) -> None:
    """A rank ends with os._exit, which skips the DataLoader's shutdown of its workers."""
    die_with_parent()


class StreamingBatches:
    """Collated batches in step order from a streamed, shuffled, per-rank view of the training sets."""

    def __init__(self, datasets: Sequence[str], processor, generation_config, collator: WhisperCollator,
                 batch_size: int, seed: int, rank: int, world: int, max_label_tokens: int, language: str,
                 stats: SkipStats, text_column: str | None = None, limit: int | None = None,
                 shuffle_buffer: int = 1000, layout: LayoutPolicy | None = None, num_workers: int = 0):
        sources = [open_dataset(DatasetRef.parse(ref), streaming=True) for ref in datasets]
        self.ds = rank_stream(sources, rank, world, seed, limit, shuffle_buffer)
        self.processor, self.generation_config, self.collator = processor, generation_config, collator
        self.batch_size, self.max_label_tokens, self.language = batch_size, max_label_tokens, language
        self.stats, self.text_column, self.rank, self.layout = stats, text_column, rank, layout
        self.num_workers = num_workers
        self.epoch, self.rows, self.next_step = 0, 0, 0
        self._examples: Iterator[Encoded] | None = None
        self._first: Encoded | None = None  # read ahead by has_samples, trained first

    def state(self) -> dict:
        """Where the next batch starts: a resume continues from here."""
        return {"epoch": self.epoch, "rows": self.rows, "step": self.next_step}

    def restore(self, state: dict) -> None:
        self.epoch, self.rows, self.next_step = state["epoch"], state["rows"], state["step"]
        self._examples, self._first = None, None

    def has_samples(self) -> bool:
        """Whether this rank's stream yields a usable sample, read before the engine: a rank without one would
        otherwise stop alone at its first batch while the others wait in a collective."""
        if self._first is None:
            self._examples = self._epoch_examples(skip=self.rows)
            self._first = next(self._examples, None)
        return self._first is not None

    def _samples(self, skip: int, stats: SkipStats) -> Iterator[Sample]:
        """The epoch's decoded samples from row `skip` on; `rows` moves past a sample as the trainer takes it."""
        rows = DecodedRows(self.ds, self.epoch, skip, self.processor.feature_extractor, self.language,
                           self.text_column)
        workers = self.num_workers
        # per worker, rows for about two batches ahead of the step
        loader = DataLoader(rows, batch_size=None, collate_fn=_as_is, num_workers=workers, worker_init_fn=_start_worker,
                            prefetch_factor=-(-2 * self.batch_size // workers) if workers else None)
        for index, sample, skip, error in loader:
            if error is not None:
                raise AsrError(error)
            if skip is not None:
                stats.skip(*skip)
            if sample is not None:
                self.rows = index + 1
                yield sample

    def _epoch_examples(self, skip: int) -> Iterator[Encoded]:
        stats = self.stats if self.epoch == 0 else SkipStats()  # each bad sample is counted once
        return encode_samples(self._samples(skip, stats), self.processor, self.generation_config, self.max_label_tokens,
                              stats, self.layout)

    def _next_example(self) -> Encoded:
        if self._first is not None:
            example, self._first = self._first, None
            return example
        for _ in range(2):  # the current epoch, then a fresh one
            if self._examples is None:
                self._examples = self._epoch_examples(skip=self.rows)
            example = next(self._examples, None)
            if example is not None:
                return example
            self.epoch, self.rows, self._examples = self.epoch + 1, 0, None
        raise AsrError(f"rank {self.rank}: an epoch of the training data yielded no usable samples "
                       f"({self.stats.summary()})")

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        if step != self.next_step:
            raise RuntimeError(f"streaming batches are read in order: asked for {step}, next is {self.next_step}")
        self.next_step += 1
        return self.collator([self._next_example() for _ in range(self.batch_size)])
