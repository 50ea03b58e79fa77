"""Streaming training data: epochs reshuffle, ranks read disjoint parts, and a restored position replays exactly
the batches of the uninterrupted stream."""
from __future__ import annotations

from transformers import GenerationConfig

from asr.data.features import WhisperCollator
from asr.data.loading import SkipStats
from asr.models.loading import load_processor
from asr.models.registry import resolve_model
from asr.train.stream import StreamingBatches

TEACHER = "whisper-tiny.en"


def stream(folder, rank: int = 0, world: int = 1) -> StreamingBatches:
    config = GenerationConfig.from_pretrained(resolve_model(TEACHER))
    return StreamingBatches([str(folder)], load_processor(TEACHER), config, WhisperCollator(config.pad_token_id),
                            batch_size=2, seed=3, rank=rank, world=world, max_label_tokens=96, language="en",
                            stats=SkipStats(), shuffle_buffer=4)


def labels_of(batch: dict) -> list[tuple[int, ...]]:
    return [tuple(row[row != -100].tolist()) for row in batch["labels"]]


def test_epochs_reshuffle_and_a_restored_position_replays_the_same_batches(speech_folder):
    first = stream(speech_folder)
    batches = [labels_of(first.batch(step)) for step in range(7)]  # 6 clips, batch 2: epochs 0, 1, part of 2
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:6], [])
    assert len(set(epoch0)) == 6 and sorted(epoch0) == sorted(epoch1)  # every clip once per epoch
    assert epoch0 != epoch1  # in a new order
    second = stream(speech_folder)
    for step in range(4):
        second.batch(step)
    state = second.state()
    assert state == {"epoch": 1, "rows": 2, "step": 4}
    resumed = stream(speech_folder)
    resumed.restore(state)
    assert [labels_of(resumed.batch(step)) for step in range(4, 7)] == batches[4:7]
    assert resumed.batch(7)["input_features"].shape == (2, 80, 3000)


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
