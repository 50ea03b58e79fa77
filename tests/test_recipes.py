"""Recipes: schema errors name the key, overrides, ls/cp/validate, and the large recipes run scaled down."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from asr.config import load_recipe
from asr.errors import AsrError
from asr.recipes import builtin_recipes, copy_recipe, validate

FAST = ["train.max_steps=2", "train.batch_size=2", "train.save_every=2", "train.log_every=1", "train.nproc=2",
        "data.streaming=false", "eval.limit=2", "eval.batch_size=2", "eval.max_new_tokens=4",
        "eval.latency_clips=1", "eval.warmup=0", "tracking.wandb=false"]


def asr(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr", *args], capture_output=True, text=True, timeout=timeout)


def test_every_builtin_recipe_validates_and_says_what_it_reproduces():
    recipes = builtin_recipes()
    assert {"quickstart", "base-distil", "base-turbo", "large-v3-turbo", "distil-large-v3"} <= set(recipes)
    for name, path in recipes.items():
        recipe = validate(name)
        assert recipe.name == name and recipe.description
        header = path.read_text().splitlines()[:3]
        assert header[0].startswith(f"# {name}") and any("Reproduces" in line for line in path.read_text().splitlines()[:6])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-4", "optim.lrr: unknown key; allowed: betas, grad_clip, lr, schedule"),
    ("train.zero_stage=4", "train.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ("objective.method=dpo", "objective.method: 'dpo' is not one of 'kd', 'ce'"),
    ("prune.keep=[0,x]", "prune.keep[1]: 'x' is not int"),
    ("data.pseudo_label.topk=8", "data.pseudo_label.topk: unknown key; allowed: batch_size, max_new_tokens, teacher_states, timestamps, top_k"),
    ("train.max_steps=many", "train.max_steps: 'many' is not int"),
    ("train.freeze_encoder=maybe", "train.freeze_encoder: 'maybe' is not bool"),
    ("nonsense", "is not key=value"),
])
def test_schema_errors_name_the_key_and_the_allowed_values(override, message):
    with pytest.raises(AsrError) as err:
        validate("quickstart", [override])
    assert message in str(err.value)


def test_overrides_parse_yaml_values():
    r = validate("quickstart", ["optim.lr=3e-5", "prune.keep=[0,31]", "train.bf16=true", "data.eval=[a, b]"])
    assert r.optim.lr == 3e-5 and r.prune.keep == [0, 31] and r.train.bf16 is True and r.data.eval == ["a", "b"]


def test_recipes_load_safely_no_code_runs(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(AsrError, match="invalid YAML"):
        load_recipe(evil)
    assert not (tmp_path / "pwned").exists()


def test_cli_ls_cp_validate(tmp_path):
    listing = asr("ls")
    assert listing.returncode == 0 and "quickstart" in listing.stdout and "large-v3-turbo" in listing.stdout
    copied = asr("cp", "quickstart", str(tmp_path))
    assert copied.returncode == 0 and (tmp_path / "quickstart.yaml").is_file()
    again = asr("cp", "quickstart", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert asr("validate", str(tmp_path / "quickstart.yaml"), "optim.lr=1e-5").returncode == 0
    bad = asr("validate", "quickstart", "train.zero_stag=2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: train.zero_stag: unknown key")
    assert "Traceback" not in bad.stderr
    late = asr("run", "quickstart", "--run-dir", str(tmp_path / "r"), "train.zero_stag=2")  # override after an option
    assert late.returncode == 2 and late.stderr.startswith("error: train.zero_stag: unknown key")
    stray = asr("run", "quickstart", "--run-dir", str(tmp_path / "r"), "--bogus")
    assert stray.returncode == 2 and "unrecognized arguments: --bogus" in stray.stderr
    with pytest.raises(AsrError, match="no such recipe"):
        copy_recipe("nope", tmp_path)


def test_cli_validate_makes_the_input_checks_run_makes(tmp_path):
    """`asr validate` said "valid" for inputs `asr run` rejects; a bare path for a list key got no hint."""
    empty = tmp_path / "no-metadata"
    empty.mkdir()
    cases = {
        "teacher=whisper-nope": "error: teacher: whisper-nope: not a registry name",
        f"teacher={tmp_path / 'missing'}": f"error: teacher: {tmp_path / 'missing'}: not a registry name",
        f"data.eval=[{empty}]": f"error: data.eval[0]: {empty}: not an audiofolder (no metadata.csv)",
        "data.eval=/path": "error: data.eval: '/path' is not list of str; write a list, e.g. [/path]",
        "objective.teacher_cache=true": "error: data.condition_on_prev_probability=0.5 changes what the teacher reads",
        "data.streaming=true": "error: train.group_by_length sorts an in-memory training set; these sets stream",
    }
    for override, message in cases.items():
        proc = asr("validate", "quickstart", override)
        assert proc.returncode == 2 and proc.stderr.startswith(message), (override, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow  # a run (27 s)
def test_rerun_with_a_changed_override_names_the_keys_and_the_advice_works(tmp_path, micro_teacher, speech_folder):
    """It said only "already holds a different recipe; use ... no overrides", and no overrides failed the same way."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "teacher": str(micro_teacher), "prune": {"keep": [0, 1]},
                                      "data": {"train": [str(speech_folder)], "eval": [str(speech_folder)]}}))
    run = tmp_path / "run"
    first = asr("run", str(recipe), "optim.lr=3e-4", "--stage", "prepare", "--run-dir", str(run))
    assert first.returncode == 0, first.stderr[-2000:]
    for changed in (["optim.lr=3e-5"], []):
        proc = asr("run", str(recipe), *changed, "--stage", "prepare", "--run-dir", str(run))
        new = 3e-5 if changed else 1e-4  # the recipe file's own lr is the schema default
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"error: {run} holds a run of a different recipe: optim.lr (0.0003 there, {new!r} here); resume it with "
            f"`asr run {run / 'recipe.yaml'} --run-dir {run}`, or give this recipe a new --run-dir")
    advice = asr("run", str(run / "recipe.yaml"), "--stage", "prepare", "--run-dir", str(run))
    assert advice.returncode == 0, advice.stderr[-2000:]


@pytest.mark.parametrize("name, decoder_layers", [("large-v3-turbo", 4), ("distil-large-v3", 2)])
@pytest.mark.slow  # a run per recipe (60 s each)
def test_large_recipes_run_two_steps_scaled_down(tmp_path, name, decoder_layers, scaled_large_v3, speech_folder):
    """The real recipe file, with a same-structure tiny model and local data, trains two steps end to end."""
    run = tmp_path / name
    # a random-weight teacher's pseudo-labels would all be filtered out: the stage has its own test with tiny.en
    labels = ["data.pseudo_label=null", "data.labels=gold"] if name == "distil-large-v3" else []
    proc = asr("run", name, f"teacher={scaled_large_v3}", f"data.train=[{speech_folder}]",
               f"data.eval=[{speech_folder}]", "data.dev=[]", *labels, *FAST, "--run-dir", str(run))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["name"] == name and recipe["optim"]["schedule"] == "linear"
    pruning = json.loads((run / "student" / "pruning.json").read_text())
    assert pruning["teacher_decoder_layers"] == 32 and len(pruning["decoder_keep"]) == decoder_layers
    assert pruning["decoder_keep"][0] == 0 and pruning["decoder_keep"][-1] == 31
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert ("kl" in rows[0]) == (name == "distil-large-v3")
    final = json.loads((run / "final" / "config.json").read_text())
    assert (final["encoder_layers"], final["decoder_layers"], final["num_mel_bins"]) == (32, decoder_layers, 128)


def test_synthetic_eval_is_one_set_per_language_named_by_the_corpus_config(tmp_path, monkeypatch):
    """Each language gets its own WER column; a build made under another synthetic.yaml is not reused."""
    from asr.data.synth import corpus_digest, load_synth_config
    from asr.pipeline import resolve_data

    monkeypatch.setenv("ASR_CACHE", str(tmp_path))
    recipe = load_recipe("recipes/quickstart.yaml", [
        "data.synth_train={split: test, num: 1, seed: 1, languages: [de]}",
        "data.synth_eval={split: test, num: 2, seed: 1, languages: [de, fr]}", "data.synth_dev=null", "data.real_eval=[]"])
    data = resolve_data(recipe).data
    digest = corpus_digest(load_synth_config())
    assert [p.rsplit("/", 1)[1] for p in data.eval] == [f"test-n2-s1-de-c{digest}", f"test-n2-s1-fr-c{digest}"]
    assert data.train[0].endswith(f"test-n1-s1-de-c{digest}")
    languages = [{row["language"] for row in csv.DictReader(open(f"{p}/metadata.csv"))} for p in data.eval]
    assert languages == [{"de"}, {"fr"}]


def test_language_weights_name_the_training_build_and_must_name_its_languages(tmp_path, monkeypatch):
    """The weights are part of the build's name (another mix is another corpus); each eval language is its own
    set either way, and a weight for a language the build does not speak stops the run before any work."""
    from asr.data.synth import corpus_digest, load_synth_config
    from asr.pipeline import check_recipe, resolve_data

    monkeypatch.setenv("ASR_CACHE", str(tmp_path))
    spec = "{split: test, num: 2, seed: 1, languages: [de, fr], language_weights: {fr: 3}}"
    recipe = load_recipe("recipes/quickstart.yaml", [f"data.synth_train={spec}", f"data.synth_eval={spec}",
                                                     "data.synth_dev=null", "data.real_eval=[]"])
    data = resolve_data(recipe).data
    digest = corpus_digest(load_synth_config())
    assert data.train[0].endswith(f"test-n2-s1-de-fr3-c{digest}")
    assert [p.rsplit("/", 1)[1] for p in data.eval] == [f"test-n2-s1-de-c{digest}", f"test-n2-s1-fr-c{digest}"]
    bad = load_recipe("recipes/quickstart.yaml", ["data.synth_train.language_weights={ru: 2}"])
    with pytest.raises(AsrError, match=r"^data.synth_train.language_weights: .*languages of the build \(en\)"):
        check_recipe(bad)


@pytest.mark.slow  # 23 s
def test_a_multilingual_teacher_refuses_data_that_does_not_say_its_language(tmp_path, micro_multilingual_teacher,
                                                                            micro_teacher, speech_folder):
    """large-v3-turbo trained Multilingual LibriSpeech's German behind <|en|>: rows without a language now stop
    the run before any work unless the reference or data.language names it (an English-only teacher needs none)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    rows = list(csv.DictReader(open(speech_folder / "metadata.csv", encoding="utf-8")))
    with open(bare / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["file_name", "transcription"]] + [[r["file_name"], r["transcription"]] for r in rows])
    for r in rows:
        (bare / r["file_name"]).symlink_to(speech_folder / r["file_name"])
    base = ["quickstart", "data.synth_train=null", "data.synth_eval=null", "data.real_eval=[]",
            f"data.eval=[{speech_folder}]"]
    refused = asr("validate", *base, f"teacher={micro_multilingual_teacher}", f"data.train=[{bare}]")
    assert refused.returncode == 2 and refused.stderr.startswith(
        f"error: data.train[0]: {bare} does not say its language (no language column) and "
        f"{micro_multilingual_teacher} speaks ")
    assert f"name it, e.g. {bare};language=de, or set data.language" in refused.stderr
    for fix in ([f"data.train=[{bare};language=en]"], [f"data.train=[{bare}]", "data.language=en"]):
        ok = asr("validate", *base, f"teacher={micro_multilingual_teacher}", *fix)
        assert ok.returncode == 0, ok.stderr
    english_only = asr("validate", *base, f"teacher={micro_teacher}", f"data.train=[{bare}]")
    assert english_only.returncode == 0, english_only.stderr


@pytest.mark.parametrize("train, overrides, streams", [
    ("someone/tinyspeech@train", [], True),  # hub data: every clip's log-mel per rank would not fit in memory
    ("someone/tinyspeech@train", ["data.streaming=false"], False),  # the recipe's word wins
    ("someone/tinyspeech@train", ["data.labels=pseudo", "objective.teacher_cache=states"], False),  # needs memory
    ("LOCAL", [], False),  # a local audiofolder is encoded up front
    ("LOCAL", ["data.streaming=true"], True),
])
def test_hub_training_sets_stream_unless_the_recipe_says_otherwise(tmp_path, speech_folder, train, overrides,
                                                                   streams):
    from asr.data.loading import streaming_of
    from asr.pipeline import resolve_data

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": [str(speech_folder) if train == "LOCAL" else train],
                                             "eval": [str(speech_folder)]}}))
    recipe = load_recipe(path, overrides)
    assert streaming_of(recipe) is streams
    assert resolve_data(recipe).data.streaming is streams  # the run directory's recipe says it
