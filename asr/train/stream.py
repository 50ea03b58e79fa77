"""Streaming training data (`data.streaming: true`): batches read, decoded and encoded as training goes, for
datasets too large to hold in memory (the hub-scale recipes).

Each rank reads its part of the training sets (`split_dataset_by_node`), interleaved when there are several,
through a seeded shuffle buffer that is reseeded every epoch. Batches must be asked for in step order. The
position (epoch, raw rows consumed in it) goes into every checkpoint; a resume replays the same shuffled
stream and drops the consumed rows without decoding them, so the batches after a resume are exactly those of
the uninterrupted run. Bad samples are skipped and counted in the first epoch (later epochs meet them again
and do not recount them).
"""
from __future__ import annotations

from itertools import islice
from typing import Iterator, Sequence

import torch

from asr.data.features import Encoded, LayoutPolicy, WhisperCollator
from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset
from asr.errors import AsrError
from asr.train.data import encode_samples


class StreamingBatches:
    """Collated batches in step order from a streamed, shuffled, per-rank view of the training sets."""

    def __init__(self, datasets: Sequence[str], processor, generation_config, collator: WhisperCollator,
                 batch_size: int, seed: int, rank: int, world: int, max_label_tokens: int, language: str,
                 stats: SkipStats, text_column: str | None = None, limit: int | None = None,
                 shuffle_buffer: int = 1000, layout: LayoutPolicy | None = None):
        from datasets import interleave_datasets
        from datasets.distributed import split_dataset_by_node

        streams = [open_dataset(DatasetRef.parse(ref), streaming=True) for ref in datasets]
        ds = streams[0] if len(streams) == 1 else interleave_datasets(streams, seed=seed,
                                                                     stopping_strategy="all_exhausted")
        if limit is not None:
            ds = ds.take(limit)
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world).shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.processor, self.generation_config, self.collator = processor, generation_config, collator
        self.batch_size, self.max_label_tokens, self.language = batch_size, max_label_tokens, language
        self.stats, self.text_column, self.rank, self.layout = stats, text_column, rank, layout
        self.epoch, self.rows, self.next_step = 0, 0, 0
        self._examples: Iterator[Encoded] | None = None

    def state(self) -> dict:
        """Where the next batch starts: a resume continues from here."""
        return {"epoch": self.epoch, "rows": self.rows, "step": self.next_step}

    def restore(self, state: dict) -> None:
        self.epoch, self.rows, self.next_step = state["epoch"], state["rows"], state["step"]
        self._examples = None

    def _rows(self, skip: int) -> Iterator[dict]:
        self.ds.set_epoch(self.epoch)
        for row in islice(iter(self.ds), skip, None):
            self.rows += 1
            yield row

    def _epoch_examples(self, skip: int) -> Iterator[Encoded]:
        stats = self.stats if self.epoch == 0 else SkipStats()  # each bad sample is counted once
        samples = iter_samples(self._rows(skip), stats, default_language=self.language, text_column=self.text_column)
        return encode_samples(samples, self.processor, self.generation_config, self.max_label_tokens, stats,
                              self.layout)

    def _next_example(self) -> Encoded:
        for _ in range(2):  # the current epoch, then a fresh one
            if self._examples is None:
                self._examples = self._epoch_examples(skip=self.rows)
            example = next(self._examples, None)
            if example is not None:
                return example
            if self.rows == 0:
                raise AsrError(f"rank {self.rank} got no usable training samples ({self.stats.summary()}); "
                               "add data or use fewer processes")
            self.epoch, self.rows, self._examples = self.epoch + 1, 0, None
        raise AsrError(f"rank {self.rank}: an epoch of the training data yielded no usable samples "
                       f"({self.stats.summary()})")

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        if step != self.next_step:
            raise RuntimeError(f"streaming batches are read in order: asked for {step}, next is {self.next_step}")
        self.next_step += 1
        return self.collator([self._next_example() for _ in range(self.batch_size)])
