"""The training data path: decoding (resampling, downmixing), skip-and-count of bad samples, labels, collation."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import write_metadata

from asr.data.features import IGNORE_INDEX, WhisperCollator, encode_sample
from asr.data.loading import DatasetRef, Sample, SkipStats, iter_samples, open_dataset, rows_say_language
from asr.errors import AsrError
from asr.models.loading import load_processor, load_whisper, prompt_ids


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """A real spoken sentence from flite at its native 16 kHz."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", "Please close the door when you leave.", "-o", str(path)],
                   check=True)
    return path


def _write_folder(root: Path, rows: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_metadata(root, rows)
    return root


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory, speech) -> Path:
    """One good clip and one of every kind of bad sample the loader must skip and count."""
    root = tmp_path_factory.mktemp("hostile")
    audio, sr = sf.read(speech, dtype="float32")
    shutil.copy(speech, root / "good.wav")
    t = np.arange(int(len(audio) * 8000 / sr)) / 8000
    sf.write(root / "stereo8k.wav", np.stack([np.interp(t, np.arange(len(audio)) / sr, audio)] * 2, axis=1), 8000)
    (root / "corrupt.wav").write_bytes(b"RIFF" + b"\x00" * 40 + b"not audio at all" * 10)
    sf.write(root / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    sf.write(root / "long.wav", np.tile(audio, math.ceil(31 * sr / len(audio))), sr)
    shutil.copy(speech, root / "notext.wav")
    return _write_folder(root, [("good.wav", "Please close the door when you leave."),
                                ("stereo8k.wav", "Please close the door when you leave."),
                                ("corrupt.wav", "broken"), ("empty.wav", "nothing"), ("long.wav", "too long"),
                                ("notext.wav", "  "), ("missing.wav", "gone")])


def test_bad_samples_are_skipped_and_counted_by_reason(hostile_folder):
    stats = SkipStats()
    samples = list(iter_samples(open_dataset(DatasetRef.parse(str(hostile_folder))), stats))
    assert [s.id for s in samples] == ["good.wav", "stereo8k.wav"]
    assert dict(stats.counts) == {"undecodable audio": 1, "empty or silent audio": 1, "audio over 30 s": 1,
                                  "empty transcript": 1, "missing audio file": 1}
    assert "missing.wav" in stats.summary() and "corrupt.wav" in stats.summary()


def test_a_reference_names_the_language_its_rows_lack(hostile_folder):
    """Multilingual LibriSpeech has no language column: `;language=` gives every row one, in memory and streamed."""
    ref = DatasetRef.parse(f"{hostile_folder};language=it")
    assert (ref.name, ref.language, ref.label) == (str(hostile_folder), "it", hostile_folder.name)
    assert rows_say_language(DatasetRef.parse(str(hostile_folder))) is False and rows_say_language(ref) is True
    for streaming in (False, True):
        assert [s.language for s in iter_samples(open_dataset(ref, streaming=streaming), SkipStats())] == ["it"] * 2
    with pytest.raises(AsrError, match=r";lang=it: the only suffix a dataset takes is ;language=<code>"):
        DatasetRef.parse(f"{hostile_folder};lang=it")


def test_8khz_stereo_is_resampled_and_downmixed(hostile_folder, speech):
    samples = {s.id: s for s in iter_samples(open_dataset(DatasetRef.parse(str(hostile_folder))), SkipStats())}
    good, low = samples["good.wav"].audio, samples["stereo8k.wav"].audio
    assert low.ndim == 1 and abs(len(low) - len(good)) <= 16  # same duration at 16 kHz
    # the 8 kHz copy keeps the speech band: correlation with the original stays high
    n = min(len(low), len(good))
    assert np.corrcoef(low[:n], good[:n])[0, 1] > 0.8


def test_streaming_yields_the_same_samples(hostile_folder):
    ref = DatasetRef.parse(str(hostile_folder))
    eager = [s.id for s in iter_samples(open_dataset(ref), SkipStats())]
    streamed = [s.id for s in iter_samples(open_dataset(ref, streaming=True), SkipStats())]
    assert streamed == eager


def test_non_utf8_bytes_transcript_is_skipped():
    rows = [{"audio": {"path": "x.wav", "bytes": None}, "transcription": b"\xff\xfe caf\xe9"}]
    stats = SkipStats()
    assert list(iter_samples(rows, stats)) == []
    assert stats.counts["non-UTF-8 transcript"] == 1


def test_not_an_audiofolder_is_a_clear_error(tmp_path):
    with pytest.raises(AsrError, match="not an audiofolder"):
        open_dataset(DatasetRef.parse(str(tmp_path)))
    (tmp_path / "metadata.csv").write_text("file_name,transcription\n")  # metadata, but no audio beside it
    with pytest.raises(AsrError, match="has metadata but no audio files"):
        open_dataset(DatasetRef.parse(str(tmp_path)))


@pytest.mark.parametrize("model, language, expected", [
    ("whisper-base", "en", ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]),
    ("whisper-base", "de", ["<|startoftranscript|>", "<|de|>", "<|transcribe|>", "<|notimestamps|>"]),
    ("whisper-tiny.en", "en", ["<|startoftranscript|>", "<|notimestamps|>"]),
])
def test_prompt_tokens_per_model_and_language(model, language, expected):
    processor = load_processor(model)
    gen = load_whisper(model).generation_config
    assert processor.tokenizer.convert_ids_to_tokens(prompt_ids(processor.tokenizer, gen, language)) == expected


def test_english_only_model_refuses_other_languages():
    processor = load_processor("whisper-tiny.en")
    with pytest.raises(AsrError, match="English-only"):
        prompt_ids(processor.tokenizer, load_whisper("whisper-tiny.en").generation_config, "de")


def test_labels_mask_prefix_and_padding_and_teacher_forcing_gives_low_loss(speech):
    """Labels are built right iff the real teacher, fed them, predicts the transcript with low loss."""
    processor, model = load_processor("whisper-base"), load_whisper("whisper-base")
    gen = model.generation_config
    audio = sf.read(speech, dtype="float32")[0]
    long = encode_sample(Sample("a", audio, "Please close the door when you leave.", "en"), processor, gen)
    short = encode_sample(Sample("b", audio, "Please close the door.", "en"), processor, gen)
    assert long.input_features.shape == (80, 3000)
    assert long.decoder_input_ids[:4] == prompt_ids(processor.tokenizer, gen, "en")
    assert long.labels[:3] == [IGNORE_INDEX] * 3 and long.labels[-1] == gen.eos_token_id
    assert processor.tokenizer.decode([t for t in long.labels if t >= 0], skip_special_tokens=True) \
        == " Please close the door when you leave."
    batch = WhisperCollator(pad_token_id=gen.pad_token_id)([long, short])
    n_short = len(short.decoder_input_ids)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (2, len(long.decoder_input_ids))
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()
    assert (batch["decoder_attention_mask"][1, n_short:] == 0).all()
    with torch.no_grad():
        logits = model(input_features=batch["input_features"][:1], decoder_input_ids=batch["decoder_input_ids"][:1],
                       decoder_attention_mask=batch["decoder_attention_mask"][:1]).logits[0]
    ce = lambda targets: torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).item()  # noqa: E731
    misaligned = batch["decoder_input_ids"][0].masked_fill(batch["labels"][0] == IGNORE_INDEX, IGNORE_INDEX)
    assert ce(batch["labels"][0]) < 0.5  # the real teacher on clean speech: labels line up with its predictions
    assert ce(misaligned) > 5.0  # an off-by-one layout would not


def test_timestamped_and_prompted_layout_masks_the_prompt_and_the_teacher_reads_it(speech):
    """The long-form layout (issue 16): timestamps around each timed sentence, no <|notimestamps|>, and a
    previous-text prompt that the loss never covers; the real teacher, teacher-forced, predicts it well."""
    from asr.data.features import label_layout, timestamp_token

    processor, model = load_processor("whisper-base"), load_whisper("whisper-base")
    tok, gen = processor.tokenizer, model.generation_config
    audio = sf.read(speech, dtype="float32")[0]
    text, duration = "Please close the door when you leave.", len(audio) / 16000
    sample = Sample("a", audio, text, "en", segments=[(0.0, round(duration, 2), text)])
    plain = encode_sample(sample, processor, gen)
    both = encode_sample(sample, processor, gen, timestamped=True, previous="It is cold outside today.")
    prev_ids = tok(" It is cold outside today.", add_special_tokens=False).input_ids
    head = [gen.prev_sot_token_id, *prev_ids, *prompt_ids(tok, gen, "en")[:-1]]
    assert both.decoder_input_ids[:len(head)] == head and gen.no_timestamps_token_id not in both.decoder_input_ids
    assert both.labels[:len(head) - 1] == [IGNORE_INDEX] * (len(head) - 1)
    supervised = [t for t in both.labels if t != IGNORE_INDEX]
    assert supervised[0] == timestamp_token(gen, 0.0) and supervised[-2] == timestamp_token(gen, duration)
    assert [t for t in supervised if t < gen.no_timestamps_token_id] == [t for t in plain.labels if t >= 0]
    assert timestamp_token(gen, 1.2) == gen.no_timestamps_token_id + 61 and timestamp_token(gen, 99) == \
        gen.no_timestamps_token_id + 1501
    prompted = label_layout(tok, gen, text, "en", previous="It is cold outside today.")[1]
    assert [t for t in prompted if t != IGNORE_INDEX] == [t for t in plain.labels if t != IGNORE_INDEX]
    with torch.no_grad():
        logits = model(input_features=torch.from_numpy(both.input_features)[None],
                       decoder_input_ids=torch.tensor([both.decoder_input_ids])).logits[0]
    labels = torch.tensor(both.labels)
    text_positions = (labels >= 0) & (labels < gen.no_timestamps_token_id)
    assert torch.nn.functional.cross_entropy(logits[text_positions], labels[text_positions]).item() < 0.5
    first = logits[labels == timestamp_token(gen, 0.0)][0, gen.no_timestamps_token_id + 1:]  # as generate does
    assert first.argmax().item() <= 50  # with <|notimestamps|> suppressed, it opens within the first second


def test_a_window_cut_inside_a_sentence_ends_on_its_start_time_and_reads_its_own_previous_text(speech):
    """Whisper's label for a sentence the window cuts: its start time alone, then eot (the next window starts
    there). Such a clip is always timestamped, and its prompt is the sentences read before it, timed as the window
    before saw them (as sequential decoding prompts), not another clip's text."""
    from asr.data.features import LayoutPolicy, label_layout, timed_ids, timestamp_token
    from asr.train.data import encode_samples

    processor, gen = load_processor("whisper-base"), load_whisper("whisper-base").generation_config
    tok = processor.tokenizer
    segments = [(0.5, 2.0, "Close the door."), (2.6, None, "Then open the window")]
    ids, labels = label_layout(tok, gen, "Close the door.", "en", segments)
    words = tok(" Close the door.", add_special_tokens=False).input_ids
    assert [t for t in labels if t != IGNORE_INDEX] == [timestamp_token(gen, 0.5), *words, timestamp_token(gen, 2.0),
                                                        timestamp_token(gen, 2.6), gen.eos_token_id]
    audio = sf.read(speech, dtype="float32")[0]
    earlier = [(24.0, 26.5, "It was late."), (27.1, 29.6, "Nobody came.")]
    cut = [Sample(f"w{i}", audio, "Close the door.", "en", segments=segments, previous=earlier) for i in range(40)]
    whole = Sample("plain", audio, "Close the door.", "en", segments=segments[:1])
    assert all(LayoutPolicy().draw(s, None)[0] for s in cut)  # the open segment needs the timestamped layout
    encoded = list(encode_samples([whole, *cut], processor, gen, 440, SkipStats(), LayoutPolicy(1.0, 1.0)))
    prompt = timed_ids(tok, gen, earlier)
    assert prompt[0] == timestamp_token(gen, 24.0) and prompt[-1] == timestamp_token(gen, 29.6)
    assert tok.decode([t for t in prompt if t < gen.no_timestamps_token_id]) == " It was late. Nobody came."
    assert all(e.prompted and e.decoder_input_ids[1:1 + len(prompt)] == prompt for e in encoded[1:])
    assert not encoded[0].prompted  # the first clip has no text before it
    plain = encode_sample(cut[0], processor, gen, timestamped=True)
    tight = encode_sample(cut[0], processor, gen, len(plain.labels) + 6, timestamped=True, previous=earlier)
    assert tight.prompted and tight.decoder_input_ids[:5] == [gen.prev_sot_token_id, *prompt[-4:]]  # cut, not skipped
    assert len(tight.decoder_input_ids) + 1 == len(plain.labels) + 6


def test_layout_policy_defaults_to_distil_whispers_rates_only_where_times_are_known():
    from asr.data.features import LayoutPolicy

    timed = [Sample(f"c{i}", np.zeros(1), "a b", "en", segments=[(0.0, 1.0, "a b")]) for i in range(2000)]
    untimed = [Sample(f"c{i}", np.zeros(1), "a b", "en") for i in range(2000)]
    draws = [LayoutPolicy().draw(s, "earlier text") for s in timed]
    assert 0.17 < np.mean([ts for ts, _ in draws]) < 0.23 and 0.17 < np.mean([p is not None for _, p in draws]) < 0.23
    assert not any(ts or p for ts, p in (LayoutPolicy().draw(s, "earlier text") for s in untimed))
    assert all(LayoutPolicy(1.0, 1.0).draw(s, "x") == (True, "x") for s in timed[:50])
    assert all(LayoutPolicy(1.0, 1.0).draw(s, "x") == (False, "x") for s in untimed[:50])  # no times, no stamps
    assert draws == [LayoutPolicy().draw(s, "earlier text") for s in timed]  # fixed per sample id


@pytest.mark.parametrize("value, ok", [
    ('[[0.1, 1.0, "a b"], [1.5, 2.0, "c"]]', True),
    ('[[0.1, 1.0, "a b"], [0.5, 2.0, "c"]]', False),  # overlapping
    ('[[0.1, 1.0, "a b"], [1.5, 9.0, "c"]]', False),  # past the audio
    ('[[0.1, 1.0, "a b"]]', False),  # does not spell the transcript
    ('[[0.1, 1.0, "a b"], [1.5, 2.0, "c"], [2.5, null, "d e"]]', True),  # the last one cut by the clip's end
    ('[[0.1, 1.0, "a b"], [1.5, null, "c"]]', False),  # an open segment's text is not in the transcript
    ('[[0.1, null, "a b"], [1.5, 2.0, "c"]]', False),  # only the last may be open
    ("not json", False), ("", False),
])
def test_segments_column_is_used_only_when_consistent(value, ok):
    from asr.data.loading import timed_segments

    assert (timed_segments(value, "a b c", 3.0) is not None) == ok


# --- hub datasets offline -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, speech_folder) -> Path:
    """A datasets cache holding `someone/tinyspeech` as a hub download leaves it (namespace___name/config/version/
    hash/{name}-{split}.arrow + dataset_info.json), prepared from the speech clips: no network here."""
    import datasets

    root = tmp_path_factory.mktemp("hub-cache")
    builder = datasets.load_dataset_builder("audiofolder", data_dir=str(speech_folder), cache_dir=str(root / "build"))
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    cached = root / "cache" / "someone___tinyspeech" / "default" / built.parent.name / built.name
    cached.mkdir(parents=True)
    shutil.copy(built / "audiofolder-train.arrow", cached / "tinyspeech-train.arrow")
    info = json.loads((built / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": "tinyspeech",
                                                          "config_name": "default"}))
    return root / "cache"


def _offline(hub_cache: Path, code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh process (`datasets` reads its settings at import) with the hub offline."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_hub_dataset_in_the_local_cache_loads_offline(hub_cache):
    proc = _offline(hub_cache, "from asr.data.loading import DatasetRef, SkipStats, iter_samples, open_dataset\n"
                               "ref = DatasetRef.parse('someone/tinyspeech@train')\n"
                               "for streaming in (False, True):\n"
                               "    ds = open_dataset(ref, streaming=streaming)\n"
                               "    print(sorted(s.id for s in iter_samples(ds, SkipStats())))\n"
                               "from asr.data.loading import rows_say_language\n"
                               "print(rows_say_language(ref))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [str([f"clip{i}.wav" for i in range(6)])] * 2 + ["True"]


def test_a_hub_dataset_missing_from_the_cache_offline_is_one_clear_error(hub_cache):
    proc = _offline(hub_cache, "from asr.data.loading import DatasetRef, check_dataset\n"
                               "check_dataset(DatasetRef.parse('someone/absent@train'))")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"asr.errors.AsrError: someone/absent: not a local directory, and not in the datasets cache ({hub_cache}) "
        "while the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); load it once where the hub is reachable, "
        "unset those, or pass an audiofolder directory")


def test_training_follows_the_users_hub_setting(monkeypatch):
    """The ranks see the hub as the user set it: not switched offline behind their back."""
    from asr.train.torchrun import training_env

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert "HF_HUB_OFFLINE" not in training_env() and "HF_DATASETS_OFFLINE" not in training_env()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert training_env()["HF_HUB_OFFLINE"] == "1"


def test_batches_grouped_by_length_pad_less_and_still_cover_every_example_once_per_epoch():
    """train.group_by_length: clips of 1-4 sentences batched at random pad their labels to the longest of four."""
    from asr.train.data import BatchOrder

    rng = np.random.default_rng(0)
    lengths = tuple(int(x) for x in rng.integers(1, 5, 240) * 20 + rng.integers(0, 10, 240))
    n, batch = len(lengths), 4

    def epoch(grouped: bool, seed: int = 3, number: int = 0) -> list[list[int]]:
        per_epoch = n // batch
        order = BatchOrder(n, batch, seed=seed, rank=1, lengths=lengths if grouped else None)
        return [order.indices(step) for step in range(number * per_epoch, (number + 1) * per_epoch)]

    def padded(batches: list[list[int]]) -> int:  # label positions computed, padding included
        return sum(batch * max(lengths[i] for i in b) for b in batches)

    grouped, shuffled = epoch(True), epoch(False)
    assert sorted(sum(grouped, [])) == list(range(n))  # every example once
    assert padded(grouped) < 0.8 * padded(shuffled)
    assert grouped == epoch(True) and grouped != epoch(True, number=1)  # deterministic, reshuffled per epoch
    widths = [max(lengths[i] for i in b) for b in grouped]
    assert widths != sorted(widths, reverse=True) and widths[:10] != sorted(widths[:10], reverse=True)  # no curriculum


def test_grouped_batches_of_one_step_are_of_similar_length_on_every_rank():
    """A step waits for its slowest rank: with group_by_length the ranks' batches of a step rank alike in length
    (ranks holding different examples, one rank three more), where independent orders pair long with short; every
    epoch starts at the same step on both, the smaller rank repeating a few of its own examples."""
    from asr.train.data import BatchOrder

    rng = np.random.default_rng(1)
    shards = [tuple(int(x) for x in rng.integers(1, 5, n) * 20 + rng.integers(0, 10, n)) for n in (200, 203)]
    orders = [BatchOrder(len(lengths), 4, seed=3, rank=rank, lengths=lengths, epoch_size=203)
              for rank, lengths in enumerate(shards)]

    def gap(steps: tuple[int, int]) -> int:
        widths = [sum(shards[r][i] for i in orders[r].indices(steps[r])) for r in (0, 1)]
        return abs(widths[0] - widths[1])

    steps = range(150)  # three epochs of 50.75 steps, each spanning into the next
    aligned = sum(gap((s, s)) for s in steps) / len(steps)
    unaligned = sum(gap((s, (s * 7 + 3) % 150)) for s in steps) / len(steps)  # rank 1 at another step
    assert aligned < 0.25 * unaligned, (aligned, unaligned)
    played = [sum((orders[0].indices(s) for s in range(s0, s0 + 50)), []) for s0 in (0, 51, 102)]
    for epoch in played:  # 200 of rank 0's examples per 50 steps, each at least once in any 203 in a row
        assert 195 <= len(set(epoch)) <= 200
    assert set(sum((orders[0].indices(s) for s in range(51)), [])[:203]) == set(range(200))
    few = BatchOrder(3, 4, seed=3, rank=1, lengths=(5, 9, 7), epoch_size=10)  # a rank left with 3 of 10 examples
    assert [len(few.indices(s)) for s in range(5)] == [4] * 5 and set(few.indices(0) + few.indices(1)) == {0, 1, 2}


def test_cpu_training_ranks_run_on_tcmalloc_unless_the_user_preloads(monkeypatch):
    """On a machine without a GPU the ranks' environment preloads tcmalloc (installed by `make setup`), and a process
    started with it really maps it; a user's own LD_PRELOAD wins."""
    from asr.train.torchrun import training_env

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = training_env()
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert "libtcmalloc_minimal.so.4" in maps
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert training_env()["LD_PRELOAD"] == "libjemalloc.so.2"
