"""Streaming training data: epochs reshuffle, ranks read disjoint parts (whole shards where they divide),
loading workers decode ahead without moving the position, and a restored position replays exactly the batches of
the uninterrupted stream."""
from __future__ import annotations

import multiprocessing

import pytest
from transformers import GenerationConfig

from asr.data.features import WhisperCollator
from asr.data.loading import SkipStats
from asr.errors import AsrError
from asr.models.loading import load_processor
from asr.models.registry import resolve_model
from asr.train.stream import StreamingBatches, rank_stream

TEACHER = "whisper-tiny.en"


def stream(folder, rank: int = 0, world: int = 1, num_workers: int = 0) -> StreamingBatches:
    config = GenerationConfig.from_pretrained(resolve_model(TEACHER))
    return StreamingBatches([str(folder)], load_processor(TEACHER), config, WhisperCollator(config.pad_token_id),
                            batch_size=2, seed=3, rank=rank, world=world, max_label_tokens=96, language="en",
                            stats=SkipStats(), shuffle_buffer=4, num_workers=num_workers)


def labels_of(batch: dict) -> list[tuple[int, ...]]:
    return [tuple(row[row != -100].tolist()) for row in batch["labels"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_reshuffle_and_a_restored_position_replays_the_same_batches(speech_folder, num_workers):
    first = stream(speech_folder, num_workers=num_workers)
    batches = [labels_of(first.batch(step)) for step in range(7)]  # 6 clips, batch 2: epochs 0, 1, part of 2
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:6], [])
    assert len(set(epoch0)) == 6 and sorted(epoch0) == sorted(epoch1)  # every clip once per epoch
    assert epoch0 != epoch1  # in a new order
    second = stream(speech_folder, num_workers=num_workers)
    for step in range(4):
        second.batch(step)
    state = second.state()
    assert state == {"epoch": 1, "rows": 2, "step": 4}  # rows the trainer took, not those the workers read ahead
    resumed = stream(speech_folder, num_workers=num_workers)
    resumed.restore(state)
    assert [labels_of(resumed.batch(step)) for step in range(4, 7)] == batches[4:7]
    assert resumed.batch(7)["input_features"].shape == (2, 80, 3000)


@pytest.mark.slow  # 33 s
def test_loading_workers_decode_in_other_processes_and_give_the_same_batches(speech_folder):
    """data.num_workers: the audio is decoded and its log-mel computed in DataLoader worker processes, ahead of the
    step, and the batches are those of loading in the training process."""
    inline, ahead = stream(speech_folder), stream(speech_folder, num_workers=2)
    before = set(multiprocessing.active_children())
    assert labels_of(ahead.batch(0)) == labels_of(inline.batch(0))
    assert len(set(multiprocessing.active_children()) - before) == 2
    for step in range(1, 5):
        a, b = ahead.batch(step), inline.batch(step)
        assert labels_of(a) == labels_of(b) and a["input_features"].equal(b["input_features"])
    assert ahead.state() == inline.state()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_missing_text_column_is_one_line_from_the_workers_too(speech_folder, num_workers):
    """A loading worker's error reaches the user as its own sentence, not inside the DataLoader's traceback."""
    batches = stream(speech_folder, num_workers=num_workers)
    batches.text_column = "pseudo_label"
    with pytest.raises(AsrError) as caught:
        batches.batch(0)
    message = str(caught.value)
    assert message.startswith("dataset has no 'pseudo_label' column") and "\n" not in message


def test_a_rank_opens_only_its_own_shards_where_they_divide():
    """A set of 4 shards on 2 ranks: each rank opens 2 of them; a set of 3 shards interleaved with it: each rank
    reads all 3 and keeps every other row (before, the interleaved stream had min(4, 3) = 3 shards, so each rank
    read every shard of both sets)."""
    from datasets import IterableDataset

    opened: dict[int, set[str]] = {0: set(), 1: set()}
    reading = {"rank": 0}

    def rows(shards: list[str]):
        for shard in shards:
            opened[reading["rank"]].add(shard)
            yield from ({"id": f"{shard}-{i}"} for i in range(4))

    four = IterableDataset.from_generator(rows, gen_kwargs={"shards": ["a0", "a1", "a2", "a3"]})
    three = IterableDataset.from_generator(rows, gen_kwargs={"shards": ["b0", "b1", "b2"]})
    seen = {}
    for rank in (0, 1):  # the smaller share restarts until both are read (stopping_strategy all_exhausted)
        reading["rank"] = rank
        seen[rank] = {row["id"] for row in rank_stream([four, three], rank, world=2, seed=0, shuffle_buffer=4)}
    assert opened == {0: {"a0", "a2", "b0", "b1", "b2"}, 1: {"a1", "a3", "b0", "b1", "b2"}}
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"{s}-{i}" for s in ("a0", "a1", "a2", "a3", "b0", "b1", "b2") for i in range(4)}


def test_ranks_split_every_epoch_between_them(speech_folder):
    """6 clips, 2 ranks: each epoch gives each rank 3 different clips (which 3 changes with the epoch's shuffle)."""
    epochs = []
    for rank in (0, 1):
        batches = stream(speech_folder, rank, world=2)
        clips = sum((labels_of(batches.batch(step)) for step in range(3)), [])
        epochs.append((set(clips[:3]), set(clips[3:])))
    for epoch in (0, 1):
        mine, theirs = epochs[0][epoch], epochs[1][epoch]
        assert len(mine) == len(theirs) == 3 and not mine & theirs
