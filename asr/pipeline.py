"""`asr run`: prune → recover (launching the distributed engine) → benchmark each checkpoint → report.

A run directory holds everything: the resolved recipe, versions and git commit, the pruned student,
checkpoints, bench results, the W&B folder, report.md/report.png and the final student in `final/`.
Re-running the same command resumes the newest unfinished run of the same resolved recipe.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

import yaml

from asr.config import Recipe, SynthConfig, changed_keys, load_recipe, recipe_to_dict
from asr.data.loading import streaming_of
from asr.errors import AsrError
from asr.models.registry import cache_dir

PACKAGES = ("asr-distill", "torch", "transformers", "deepspeed", "datasets", "jiwer", "wandb", "ctranslate2")


def synth_dataset(spec: SynthConfig) -> str:
    """Build (once, cached) a synthetic split and return its directory; the name carries the corpus yaml's
    hash and the builder's format, so editing voices, texts or augmentation builds afresh, not a stale set."""
    from asr.data.synth import build_corpus, corpus_digest, load_synth_config

    digest = corpus_digest(load_synth_config())
    packed = "" if spec.sentences == [1, 1] else f"-p{spec.sentences[0]}-{spec.sentences[1]}"
    packed += f"-L{spec.long[0]:g}-{spec.long[1]:g}" if spec.long else ""
    packed += f"-w{spec.windows:g}" if spec.windows else ""
    overrides = json.dumps(spec.augment, sort_keys=True).encode()
    packed += f"-a{hashlib.sha1(overrides).hexdigest()[:8]}" if spec.augment else ""
    weights = spec.language_weights
    languages = '-'.join(f"{lang}{weights[lang]:g}" if weights.get(lang, 1) != 1 else lang for lang in spec.languages)
    name = f"{spec.split}-n{spec.num}-s{spec.seed}-{languages}{packed}-c{digest}"
    out = cache_dir() / "synth" / name
    if not (out / "metadata.csv").is_file() or len((out / "metadata.csv").read_text().splitlines()) <= spec.num:
        build_corpus(out, split=spec.split, num=spec.num, seed=spec.seed, languages=tuple(spec.languages),
                     sentences=(spec.sentences[0], spec.sentences[1]),
                     long_s=(spec.long[0], spec.long[1]) if spec.long else None, windows=spec.windows,
                     language_weights=weights, augment=spec.augment)
    return str(out)


def real_dataset(language: str) -> str:
    """Build (once, cached) the real recordings of a language and return their directory."""
    from asr.data.real import MANIFEST, build_real

    out = cache_dir() / "real" / f"real-{language}"
    if not (out / MANIFEST).is_file():
        build_real(language, out)
    return str(out)


def pseudo_labelled(recipe: Recipe, data: str) -> str:
    """Label one training set with the teacher (once: cached, and resumed if stopped); returns the folder."""
    from asr.data.loading import DatasetRef
    from asr.label.allocation import allocation_tasks, label_across_allocation
    from asr.label.pseudo_label import PseudoLabelOptions, folder_settings, prepare_out, pseudo_label, summary_line
    from asr.label.targets import SUMMARY

    spec, d = recipe.data.pseudo_label, recipe.data
    opts = PseudoLabelOptions(wer_threshold=spec.wer_threshold, top_k=spec.top_k, max_new_tokens=spec.max_new_tokens,
                              language=d.fallback_language, nproc=recipe.train.nproc, batch_size=spec.batch_size,
                              limit=d.train_limit, temperature=recipe.objective.temperature,
                              teacher_states=spec.teacher_states, timestamps=spec.timestamps)
    settings = folder_settings(recipe.teacher, data, opts)  # the folder's identity, plus the rows it covers
    identity = json.dumps([settings, d.train_limit], sort_keys=True)
    out = cache_dir() / "pseudo" / f"{DatasetRef.parse(data).label}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"
    tasks = allocation_tasks()
    if tasks > 1 and not (out / SUMMARY).is_file():  # in a Slurm allocation: one task per GPU labels
        prepare_out(out, settings)  # before the tasks, which then only check it
        label_across_allocation(recipe.teacher, data, out, opts, tasks)
    print(summary_line(pseudo_label(recipe.teacher, data, out, opts)), flush=True)  # finishes the folder
    return str(out)


def check_recipe(recipe: Recipe) -> None:
    """Combinations of keys that cannot run, refused before any data is built or labelled."""
    data, cache = recipe.data, recipe.objective.teacher_cache
    if not (data.train or data.synth_train):
        raise AsrError("data.train is empty: name an audiofolder or hub dataset, or set data.synth_train")
    for key in ("timestamp_probability", "condition_on_prev_probability"):
        value = getattr(data, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise AsrError(f"data.{key} must be between 0 and 1, got {value}")
    prompts = data.condition_on_prev_probability
    if prompts and cache:
        raise AsrError(f"data.condition_on_prev_probability={prompts} changes what the teacher reads, but "
                       "objective.teacher_cache replays targets computed without a prompt; set it to 0 or "
                       "objective.teacher_cache=false")
    if data.timestamp_probability and cache and data.pseudo_label and not data.pseudo_label.timestamps:
        raise AsrError(f"data.timestamp_probability={data.timestamp_probability} with objective.teacher_cache needs "
                       "the teacher's targets on timestamped labels: set data.pseudo_label.timestamps=true, or "
                       "objective.teacher_cache=false")
    for key, spec in (("synth_train", data.synth_train), ("synth_eval", data.synth_eval), ("synth_dev", data.synth_dev)):
        if spec is not None and not (len(spec.sentences) == 2 and 1 <= spec.sentences[0] <= spec.sentences[1]):
            raise AsrError(f"data.{key}.sentences must be [low, high] with 1 <= low <= high, e.g. [1, 4]; "
                           f"got {spec.sentences}")
        if spec is not None and spec.language_weights:
            from asr.data.synth import mix_weights
            try:
                mix_weights(spec.languages, spec.language_weights)
            except AsrError as err:
                raise AsrError(f"data.{key}.language_weights: {err}") from None
        if spec is not None and spec.augment:
            from asr.data.synth import merged_policy
            try:
                merged_policy({}, spec.augment)
            except AsrError as err:
                raise AsrError(f"data.{key}.augment: {err}") from None
        if spec is not None and spec.long is not None:
            raise AsrError(f"data.{key}.long: long-form files do not fit a 30 s window; name them in "
                           "data.long_eval.synth instead")
        if spec is not None and not (0 <= spec.windows <= 1 and (key == "synth_train" or not spec.windows)):
            raise AsrError(f"data.{key}.windows={spec.windows}: the share of training clips cut from a reading is "
                           "in [0, 1], and only for synth_train (a cut clip's last words are in no transcript)")
    long = data.long_eval
    if long is not None:
        if not (long.sets or long.synth) or not long.algorithms:
            raise AsrError("data.long_eval needs sets or synth (e.g. {split: test, num: 4, seed: 1, long: [60, 180]}) "
                           "and at least one of algorithms: [sequential, chunked]")
        bounds = long.synth.long if long.synth else None
        if long.synth and (bounds is None or not (len(bounds) == 2 and 0 < bounds[0] <= bounds[1])
                           or long.synth.sentences != [1, 1]):
            raise AsrError(f"data.long_eval.synth.long must be [low, high] seconds with 0 < low <= high, e.g. "
                           f"[60, 180], and without sentences; got long={bounds}")
    if not (data.eval or data.synth_eval or data.real_eval):
        raise AsrError("data.eval is empty: name an audiofolder or hub dataset, or set data.synth_eval")
    if data.streaming and cache:
        raise AsrError("objective.teacher_cache reads every clip's teacher targets into memory; use "
                       "data.streaming=false with it, or the live teacher (objective.teacher_cache=false)")
    if recipe.train.group_by_length and streaming_of(recipe):
        raise AsrError("train.group_by_length sorts an in-memory training set; these sets stream (hub data, or "
                       "data.streaming=true): set data.streaming=false to hold them in memory, or drop group_by_length")
    if data.num_workers < 0:
        raise AsrError(f"data.num_workers must be 0 (load in the training process) or more, got {data.num_workers}")
    from asr.data.real import real_source, refuse_for_training

    for language in data.real_eval:
        real_source(language)
    for ref in data.train:
        refuse_for_training(ref, "training (data.train)")
    for ref in data.dev:
        refuse_for_training(ref, "choosing the final checkpoint (data.dev)")
    shared = sorted(set(data.dev) & set(data.eval))
    if shared or (data.synth_dev and data.synth_eval and data.synth_dev.seed == data.synth_eval.seed
                  and data.synth_dev.split == data.synth_eval.split):
        raise AsrError(f"data.dev and data.eval share {', '.join(shared) or 'synthetic clips (same split and seed)'}: "
                       "a set that chooses final/ cannot also report its WER; use another split or another "
                       "data.synth_dev.seed")
    if recipe.prune.calibration:
        refuse_for_training(recipe.prune.calibration, "layer selection (prune.calibration)")
    spec = data.pseudo_label
    if spec is not None and ((cache == "states" and not spec.teacher_states) or (cache == "top_k" and not spec.top_k)
                             or (cache is True and not (spec.top_k or spec.teacher_states))):
        raise AsrError(f"objective.teacher_cache={cache} needs those teacher targets stored: set "
                       "data.pseudo_label.teacher_states=true (exact) or data.pseudo_label.top_k (e.g. 32; "
                       "approximate, smaller)")
    if recipe.objective.method == "kd" and cache and spec is None and data.labels != "pseudo":
        raise AsrError("objective.teacher_cache: cached teacher targets belong to pseudo-labels; set "
                       "data.pseudo_label (e.g. {teacher_states: true}), or data.labels=pseudo on folders made by "
                       "`asr pseudo-label`")


def resolve_data(recipe: Recipe) -> Recipe:
    """Replace synthetic data specs by the directories they build, training sets by their pseudo-labelled
    folders when the recipe asks for pseudo-labels, and an unset data.streaming by what the named training sets
    imply, so the run directory names the real paths it trains on and how it reads them."""
    check_recipe(recipe)
    data = recipe.data
    train = data.train + ([synth_dataset(data.synth_train)] if data.synth_train else [])
    evals = data.eval + _synth_per_language(data.synth_eval) + [real_dataset(language) for language in data.real_eval]
    long = data.long_eval
    if long is not None and long.synth is not None:
        long = dataclasses.replace(long, sets=long.sets + [synth_dataset(long.synth)], synth=None)
    labels = data.labels
    if data.pseudo_label is not None:
        train, labels = [pseudo_labelled(recipe, t) for t in train], "pseudo"
    return dataclasses.replace(recipe, data=dataclasses.replace(
        data, train=train, eval=evals, dev=data.dev + _synth_per_language(data.synth_dev), labels=labels,
        streaming=streaming_of(recipe),
        synth_train=None, synth_eval=None, synth_dev=None, real_eval=[], pseudo_label=None, long_eval=long))


def _synth_per_language(spec: SynthConfig | None) -> list[str]:
    """One synthetic set per language, so each has its own WER column."""
    return [synth_dataset(dataclasses.replace(spec, languages=[lang], language_weights={}))
            for lang in spec.languages] if spec else []


def validate_recipe(recipe_path: Path, overrides: list[str]) -> Recipe:
    """Every check `asr run` makes before its work: the schema, the key combinations, the teacher and the datasets
    named (synthetic sets are built by the run, so only their specs are checked)."""
    recipe = load_recipe(recipe_path, overrides)
    check_recipe(recipe)
    check_inputs(recipe)
    return recipe


def check_inputs(recipe: Recipe) -> None:
    """A teacher or dataset that cannot load stops the run before its directory exists; errors name the key."""
    from asr.data.loading import DatasetRef, check_dataset, rows_say_language
    from asr.models.registry import resolve_model

    try:
        teacher = resolve_model(recipe.teacher)
    except AsrError as exc:
        raise AsrError(f"teacher: {exc}") from None
    from transformers import GenerationConfig

    languages = getattr(GenerationConfig.from_pretrained(teacher), "lang_to_id", None) or {}
    unknown = [lang for lang in recipe.data.real_eval if f"<|{lang}|>" not in languages]
    if unknown:
        raise AsrError(f"data.real_eval: {recipe.teacher} does not transcribe {', '.join(unknown)} (English-only "
                       "or without that language); drop them from data.real_eval or use a multilingual teacher")
    refs = [(f"data.{key}[{i}]", ref) for key in ("train", "eval", "dev")
            for i, ref in enumerate(getattr(recipe.data, key))]
    long_sets = recipe.data.long_eval.sets if recipe.data.long_eval else []
    refs += [(f"data.long_eval.sets[{i}]", ref) for i, ref in enumerate(long_sets)]
    for key, ref in refs + ([("prune.calibration", recipe.prune.calibration)] if recipe.prune.calibration else []):
        try:
            parsed = DatasetRef.parse(ref)
            check_dataset(parsed)
            says_language = rows_say_language(parsed)
        except AsrError as exc:
            raise AsrError(f"{key}: {exc}") from None
        if says_language is False and len(languages) > 1 and recipe.data.language is None:
            raise AsrError(f"{key}: {ref} does not say its language (no language column) and {recipe.teacher} "
                           f"speaks {len(languages)}; name it, e.g. {ref.split(';')[0]};language=de, or set "
                           "data.language for every such dataset")


def versions() -> dict:
    """Package versions and the git commit of the code that ran."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        root = Path(__file__).resolve().parent.parent
        out["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def find_resumable(recipe: Recipe, runs_root: Path) -> Path | None:
    """The newest unfinished run directory of this exact resolved recipe."""
    wanted = recipe_to_dict(recipe)
    for candidate in sorted(runs_root.glob(f"{recipe.name}-*"), reverse=True):
        stored = candidate / "recipe.yaml"
        if stored.is_file() and not (candidate / "report.md").is_file():
            if recipe_to_dict(load_recipe(stored)) == wanted:
                return candidate
    return None


def prepare_run(recipe_path: Path, overrides: list[str], run_dir: Path | None) -> tuple[Recipe, Path]:
    """Validate the recipe (before any work), pick or create the run directory, write recipe and versions."""
    recipe = load_recipe(recipe_path, overrides)
    if run_dir is not None and (run_dir / "recipe.yaml").is_file():
        stored = load_recipe(run_dir / "recipe.yaml")
        if overrides or recipe_path != run_dir / "recipe.yaml":
            changed = changed_keys(stored, resolve_data(recipe))
            if changed:
                keys = ", ".join(f"{k} ({old!r} there, {new!r} here)" for k, (old, new) in changed.items())
                raise AsrError(f"{run_dir} holds a run of a different recipe: {keys}; resume it with `asr run "
                               f"{run_dir / 'recipe.yaml'} --run-dir {run_dir}`, or give this recipe a new --run-dir")
        return stored, run_dir
    check_recipe(recipe)
    check_inputs(recipe)  # what the user named, before synthetic sets are built or training sets labelled
    recipe = resolve_data(recipe)
    if run_dir is None:
        run_dir = find_resumable(recipe, Path("runs"))
        if run_dir is not None:
            print(f"resuming {run_dir}")
            return recipe, run_dir
        run_dir = Path("runs") / f"{recipe.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2))
    return recipe, run_dir


def prune_student(recipe: Recipe, run_dir: Path) -> None:
    """Write RUN/student (once)."""
    from asr.models.prune import prune_to_directory

    if (run_dir / "student" / "pruning.json").is_file():
        return
    p = recipe.prune
    keep, scores = p.keep, None
    if keep is None and p.strategy == "importance":
        from asr.train.layer_importance import select_by_importance

        if p.calibration is None:
            raise AsrError("prune.strategy importance needs prune.calibration (a dataset)")
        keep, scores = select_by_importance(recipe.teacher, p.calibration, p.num_layers, p.calibration_limit)
    report = prune_to_directory(recipe.teacher, run_dir / "student", decoder_keep=keep, num_layers=p.num_layers,
                                strategy=p.strategy, encoder_keep=p.encoder_keep, scores=scores)
    print(f"pruned {recipe.teacher}: decoder layers {report['decoder_keep']} "
          f"({report['student_params'] / 1e6:.1f}M params)")


STAGES = ("all", "prepare", "train", "report")


def run_pipeline(recipe_path: Path, overrides: list[str], run_dir: Path | None, nproc: int | None,
                 stage: str = "all") -> Path:
    """The whole pipeline, or one stage of it (Slurm runs them as dependent jobs); finished work is skipped."""
    from asr.run_report import write_report
    from asr.train.torchrun import launch_training
    from asr.train.loop import PREEMPTED

    recipe, run_dir = prepare_run(recipe_path, overrides, run_dir)
    print(f"run directory: {run_dir}")
    if stage in ("all", "prepare"):
        prune_student(recipe, run_dir)
    if stage in ("all", "train"):
        code = launch_training(run_dir, nproc or recipe.train.nproc)
        if code != 0:
            if (run_dir / "ERROR").is_file():  # a rank stopped on a user-facing problem: say that, not "crashed"
                raise AsrError((run_dir / "ERROR").read_text().strip())
            raise AsrError(f"training failed (exit code {code}); see the log above, then re-run the same command "
                           "to resume from the last checkpoint")
        if (run_dir / PREEMPTED).is_file():
            raise AsrError(f"preempted at step {(run_dir / PREEMPTED).read_text()}; a checkpoint was saved, re-run "
                           "the same command to resume")
    if stage in ("all", "report"):
        print(write_report(run_dir))
    return run_dir
