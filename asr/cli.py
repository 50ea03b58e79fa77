"""The `asr` command: parses arguments, calls library functions, prints results. No logic lives here."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from asr.config import LONG_FORM_ALGORITHMS
from asr.errors import AsrError


def _models_list(args: argparse.Namespace) -> None:
    from asr.models.registry import IMPORT_STAMP, REGISTRY, cache_dir

    for name, entry in REGISTRY.items():
        cached = (cache_dir() / "models" / name / IMPORT_STAMP).is_file()
        packages = " + ".join(f"{d}=={v}" for d, v in entry.packages)
        print(f"{name:18} {entry.description}\n{'':18} from {packages}{'  [imported]' if cached else ''}")


def _models_import(args: argparse.Namespace) -> None:
    from asr.models.registry import REGISTRY, import_ct2_dir, import_registry_model

    out = Path(args.out)
    if args.source in REGISTRY:
        path = import_registry_model(args.source, out)
    elif Path(args.source).is_dir():
        path = import_ct2_dir(Path(args.source), out)
    else:
        raise AsrError(f"{args.source}: neither a registry name ({', '.join(REGISTRY)}) nor a CTranslate2 directory")
    print(f"imported {args.source} -> {path}")


def _data_synth(args: argparse.Namespace) -> None:
    from asr.data.synth import build_corpus

    build_corpus(Path(args.out), split=args.split, num=args.num, seed=args.seed, workers=args.workers,
                 languages=tuple(args.languages.split(",")), sentences=_pair(args.sentences, int, "--sentences"),
                 long_s=None if args.long is None else _pair(args.long, float, "--long"),
                 windows=args.windows, language_weights=_weights(args.language_weights),
                 augment=_augment(args.augment))  # prints a summary


def _augment(text: str) -> dict[str, dict[str, float]]:
    """`telephone.p=1,noise.p=0.3` as {telephone: {p: 1.0}, noise: {p: 0.3}}."""
    out: dict[str, dict[str, float]] = {}
    try:
        for item in (i for i in text.split(",") if i):
            key, value = item.split("=")
            effect, setting = key.split(".")
            out.setdefault(effect, {})[setting] = float(value)
    except ValueError:
        raise AsrError(f"--augment takes EFFECT.SETTING=NUMBER,... (e.g. telephone.p=1), got {text!r}") from None
    return out


def _weights(text: str) -> dict[str, float]:
    try:
        return {lang: float(weight) for lang, weight in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise AsrError(f"--language-weights takes LANG=WEIGHT,... (e.g. ru=2,it=1.5), got {text!r}") from None


def _pair(text: str, kind: type, flag: str) -> tuple:
    try:
        low, high = (kind(x) for x in text.split(","))
    except ValueError:
        raise AsrError(f"{flag} takes LOW,HIGH (e.g. 1,4), got {text!r}") from None
    return low, high


def _data_real(args: argparse.Namespace) -> None:
    from asr.data.real import build_real

    build_real(args.lang, Path(args.out))  # prints its own summary line


def _pseudo_label(args: argparse.Namespace) -> None:
    from asr.label.allocation import slurm_task
    from asr.label.pseudo_label import PseudoLabelOptions, pseudo_label, summary_line

    opts = PseudoLabelOptions(wer_threshold=args.wer_threshold, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                              language=args.language, nproc=args.nproc, batch_size=args.batch_size, limit=args.limit,
                              temperature=args.temperature, teacher_states=args.teacher_states,
                              timestamps=args.timestamps, task=slurm_task() if args.slurm_task else None)
    print(summary_line(pseudo_label(args.teacher, args.data, Path(args.out), opts)))


def _bench_train(args: argparse.Namespace) -> None:
    from asr.config import load_recipe
    from asr.pipeline import prune_student, resolve_data
    from asr.recipes import recipe_path
    from asr.train.throughput_bench import bench_train, format_table, labelled_recipe

    out = Path(args.out)
    recipe = resolve_data(labelled_recipe(load_recipe(recipe_path(args.recipe), args.overrides), args.top_k, args.clips))
    prune_student(recipe, out)
    rows = bench_train(recipe, out / "student", out, steps=args.steps, warmup=args.warmup,
                       nprocs=[int(n) for n in args.nproc.split(",")], top_k=args.top_k, clips=args.clips)
    print(format_table(rows))
    print(f"results in {out / 'bench-train.json'}")


def _bench(args: argparse.Namespace) -> None:
    from asr.bench.run import BenchOptions, run_bench

    opts = BenchOptions(limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        engine=args.engine, latency_clips=args.latency_clips, warmup=args.warmup,
                        threads=args.threads, streaming=args.streaming, chunk_ms=args.chunk_ms,
                        overlap_ms=args.overlap_ms, assistant=args.assistant, fallback=args.fallback,
                        long_form=list(dict.fromkeys(args.long_form or [])))
    if opts.long_form:
        from asr.bench.longform import run_long_form_bench

        run_long_form_bench(args.model, args.data, Path(args.out), opts)
    else:
        run_bench(args.model, args.data, Path(args.out), opts)


def _layers(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def _prune(args: argparse.Namespace) -> None:
    from asr.models.output_dir import check_overwritable
    from asr.models.prune import PRUNING_REPORT, prune_to_directory

    check_overwritable(Path(args.out), PRUNING_REPORT, "asr prune")  # before an importance selection's work
    keep, scores = _layers(args.keep), None
    if args.strategy == "importance" and keep is None:
        from asr.train.layer_importance import select_by_importance

        if not args.calibration:
            raise AsrError("--strategy importance needs --calibration DATASET")
        keep, scores = select_by_importance(args.model, args.calibration, args.num_layers, args.calibration_limit)
    report = prune_to_directory(args.model, Path(args.out), decoder_keep=keep, num_layers=args.num_layers,
                                strategy=args.strategy, encoder_keep=_layers(args.encoder_keep), scores=scores)
    print(f"kept decoder layers {report['decoder_keep']} of {report['teacher_decoder_layers']} "
          f"({report['student_params'] / 1e6:.1f}M of {report['teacher_params'] / 1e6:.1f}M params) -> {args.out}")


def _export(args: argparse.Namespace) -> None:
    from asr.models.export import export_ct2

    path = export_ct2(args.model, Path(args.out), quantization=args.quantization)
    print(f"exported {args.model} to CTranslate2 -> {path}")


def _ls(args: argparse.Namespace) -> None:
    from asr.recipes import builtin_recipes, describe

    for name, path in builtin_recipes().items():
        print(f"{name:18} {describe(path)}")


def _cp(args: argparse.Namespace) -> None:
    from asr.recipes import copy_recipe

    print(f"copied {args.name} -> {copy_recipe(args.name, Path(args.dest))}")


def _validate(args: argparse.Namespace) -> None:
    from asr.pipeline import validate_recipe
    from asr.recipes import recipe_path

    recipe = validate_recipe(recipe_path(args.recipe), args.overrides)
    print(f"{args.recipe}: valid ({recipe.teacher}, {recipe.objective.method}, {recipe.train.max_steps} steps, "
          f"ZeRO-{recipe.train.zero_stage}, {recipe.train.nproc} process(es))")


def _run(args: argparse.Namespace) -> None:
    from asr.pipeline import run_pipeline
    from asr.recipes import recipe_path

    run_pipeline(recipe_path(args.recipe), args.overrides, Path(args.run_dir) if args.run_dir else None, args.nproc,
                 args.stage)


def _plan(args: argparse.Namespace) -> None:
    from asr.recipes import validate
    from asr.train.resource_plan import Allocation, format_plan, plan_resources, plan_to_dict

    plan = plan_resources(validate(args.recipe, args.overrides),
                          Allocation(args.nodes, args.gpus_per_node, args.gpu_mem), args.hours)
    _print_plan(format_plan(plan), plan_to_dict(plan), args.json)


def _print_plan(text: str, data: dict, json_path: str | None) -> None:
    """The table, and the JSON to a file (`--json PATH`) or after the table (`--json -`)."""
    import json

    print(text)
    if json_path == "-":
        print(json.dumps(data, indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"plan written to {json_path}")


def _submit(args: argparse.Namespace) -> None:
    from asr.slurm.render import Resources, plan_submission, render
    from asr.slurm.submit import dry_run, submit, summary
    from asr.recipes import recipe_path

    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                          cpus_per_rank=args.cpus_per_rank, partition=args.partition, time=args.time,
                          account=args.account)
    plan = render(plan_submission(recipe_path(args.recipe), args.overrides, args.sweep,
                                  Path(args.run_dir) if args.run_dir else None, resources))
    print(dry_run(plan, args.gpu_mem, args.hours) if args.dry_run else summary(plan, submit(plan)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr", description="Prune Whisper decoders and recover them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="teacher models shipped offline").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="registry names and where their weights come from").set_defaults(func=_models_list)
    imp = models.add_parser("import", help="convert CTranslate2 weights to a Hugging Face directory")
    imp.add_argument("source", help="registry name or CTranslate2 directory")
    imp.add_argument("--out", required=True)
    imp.set_defaults(func=_models_import)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    synth = data.add_parser("synth", help="synthesize a speech corpus with offline TTS voices")
    synth.add_argument("--out", required=True)
    synth.add_argument("--split", choices=["train", "test"], required=True)
    synth.add_argument("--num", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    synth.add_argument("--languages", default="en", help="comma-separated, e.g. en,de,es,fr,it")
    synth.add_argument("--language-weights", default="", metavar="LANG=W,...",
                       help="a language's share of the clips relative to the others (1 unless named), e.g. ru=2")
    synth.add_argument("--augment", default="", metavar="EFFECT.SETTING=X,...",
                       help="override data/synthetic.yaml's augmentation for this build, e.g. telephone.p=1: every "
                            "augmented clip also through the telephone channel (the other effects drawn as before)")
    synth.add_argument("--sentences", default="1,1",
                       help="sentences per clip LOW,HIGH (one voice, pauses between; each timed in `segments`)")
    synth.add_argument("--long", nargs="?", const="60,180", metavar="LOW,HIGH",
                       help="long-form files of LOW..HIGH seconds (default 60,180): consecutive sentences in one "
                            "voice with pauses, for `asr bench --long-form`")
    synth.add_argument("--windows", type=float, default=0.0, metavar="SHARE",
                       help="share of clips (0..1) that are the first 30 s of a reading, cut inside a sentence "
                            "(training for sequential long-form decoding: the open sentence's start time is the label)")
    synth.set_defaults(func=_data_synth)
    real = data.add_parser("real", help="real human recordings for evaluation (Debian packages, offline)")
    real.add_argument("--lang", required=True, help="a language of data/real.yaml: it or ru")
    real.add_argument("--out", required=True)
    real.set_defaults(func=_data_real)

    pseudo = sub.add_parser("pseudo-label", help="teacher transcripts as labels, WER-filtered, optional top-K")
    pseudo.add_argument("--teacher", required=True, help="registry name, HF dir or hub id")
    pseudo.add_argument("--data", required=True, help="audiofolder dir or hub dataset, with reference transcripts")
    pseudo.add_argument("--out", required=True, help="audiofolder to write (re-run the same command to resume)")
    pseudo.add_argument("--wer-threshold", type=float, default=10.0, help="drop clips above this normalized WER (%%)")
    pseudo.add_argument("--top-k", type=int, help="also store the teacher's top-K log-probs per label position")
    pseudo.add_argument("--temperature", type=float, default=2.0,
                        help="of the stored top-K log-probs; must equal the distilling recipe's objective.temperature")
    pseudo.add_argument("--teacher-states", action="store_true",
                        help="also store the teacher's final decoder states (2 bytes x d_model per token): exact KD")
    pseudo.add_argument("--timestamps", action="store_true",
                        help="decode with timestamps; store the segments (and timestamped teacher targets) too")
    pseudo.add_argument("--nproc", type=int, default=1, help="local processes, each labelling a stride of the rows")
    pseudo.add_argument("--slurm-task", action="store_true",
                        help="one task of an srun step: label the rows of index %% SLURM_NTASKS == SLURM_PROCID and "
                             "leave the folder's metadata to a call without it (`asr run` does this in an allocation)")
    pseudo.add_argument("--batch-size", type=int, default=8)
    pseudo.add_argument("--limit", type=int, help="only the first N rows")
    pseudo.add_argument("--max-new-tokens", type=int, default=224)
    pseudo.add_argument("--language", default="en", help="for datasets without a language column")
    pseudo.set_defaults(func=_pseudo_label)

    bench = sub.add_parser("bench", help="WER/CER of models on datasets")
    bench.add_argument("--model", action="append", required=True,
                       help="registry name, HF dir or hub id; latency ratios are against the first, unless a "
                            "model's pruning.json names another benchmarked teacher")
    bench.add_argument("--data", action="append", required=True, help="audiofolder dir or hub dataset")
    bench.add_argument("--out", required=True)
    bench.add_argument("--limit", type=int)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--max-new-tokens", type=int, default=128, help="cap so a collapsed student cannot run away")
    bench.add_argument("--engine", choices=["hf", "ct2"], default="hf")
    bench.add_argument("--latency-clips", type=int, default=24, help="clips timed at batch size 1")
    bench.add_argument("--warmup", type=int, default=2, help="untimed clips before timing")
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bench.add_argument("--streaming", action="store_true", help="also simulate streaming")
    bench.add_argument("--chunk-ms", type=int, default=300)
    bench.add_argument("--overlap-ms", type=int, default=0)
    bench.add_argument("--assistant", help="student model for speculative decoding of the teacher")
    bench.add_argument("--fallback", action="store_true",
                       help="also score with Whisper's temperature fallback (compression ratio > 2.4 or mean "
                            "log-prob < -1 re-decodes at T=0.2..1.0), beside plain greedy; HF engine")
    bench.add_argument("--long-form", action="append",
                       choices=LONG_FORM_ALGORITHMS,
                       help="long-form files (`asr data synth --long`) instead: Whisper's sequential algorithm on "
                            "the whole input (sequential-fallback: with its temperature fallback; "
                            "sequential-independent: no window prompted with the previous one's text), the HF "
                            "pipeline's 30 s chunks, or short-form (the files cut at the pauses between their "
                            "sentences, each piece a short clip: the reference on the same speech); repeat for "
                            "several")
    bench.set_defaults(func=_bench)

    bench_tr = sub.add_parser("bench-train", help="training throughput: separate vs shared encoder vs cached teacher")
    bench_tr.add_argument("recipe", help="recipe YAML or built-in name")
    bench_tr.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.batch_size=4")
    bench_tr.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    bench_tr.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench_tr.add_argument("--nproc", default="1,2", help="process counts to measure, e.g. 1,2")
    bench_tr.add_argument("--top-k", type=int, default=16)
    bench_tr.add_argument("--clips", type=int, default=32, help="training clips pseudo-labelled for the measurement")
    bench_tr.add_argument("--out", default="runs/bench-train")
    bench_tr.set_defaults(func=_bench_train)

    prune = sub.add_parser("prune", help="keep a subset of decoder (and encoder) layers")
    prune.add_argument("--model", required=True)
    group = prune.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", help="decoder layers to keep, e.g. 0,5")
    group.add_argument("--num-layers", type=int, help="number of decoder layers to keep")
    prune.add_argument("--strategy", default="spaced", choices=["spaced", "first", "importance"])
    prune.add_argument("--calibration", help="dataset for --strategy importance")
    prune.add_argument("--calibration-limit", type=int, default=32)
    prune.add_argument("--encoder-keep", help="encoder layers to keep (default: all)")
    prune.add_argument("--out", required=True)
    prune.set_defaults(func=_prune)

    export = sub.add_parser("export", help="export a model for another inference engine")
    export.add_argument("--model", required=True)
    export.add_argument("--format", choices=["ct2"], default="ct2")
    export.add_argument("--quantization", help="ctranslate2 quantization, e.g. int8, float16")
    export.add_argument("--out", required=True)
    export.set_defaults(func=_export)

    sub.add_parser("ls", help="built-in recipes").set_defaults(func=_ls)
    cp = sub.add_parser("cp", help="copy a built-in recipe to edit it")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.set_defaults(func=_cp)
    validate = sub.add_parser("validate", help="check a recipe (and overrides) without running it")
    validate.add_argument("recipe", help="recipe YAML or built-in name")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=_validate)

    plan = sub.add_parser("plan", help="per-GPU memory, fits or not (and what to change), throughput needed")
    plan.add_argument("recipe", help="recipe YAML or built-in name")
    plan.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.zero_stage=3")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU (an 80 GB A100/H100: 80)")
    plan.add_argument("--hours", type=float, help="wall-clock budget: the samples/s and tokens/s it needs")
    plan.add_argument("--json", nargs="?", const="-", metavar="PATH", help="also write the plan as JSON (no PATH: print it)")
    plan.set_defaults(func=_plan)

    run = sub.add_parser("run", help="prune -> recover -> benchmark every checkpoint -> report")
    run.add_argument("recipe", help="recipe YAML or built-in name")
    run.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=3e-5")
    run.add_argument("--nproc", type=int, help="processes on this machine (default: train.nproc)")
    run.add_argument("--run-dir", help="default: runs/<recipe>-<time>, or the unfinished run of the same recipe")
    run.add_argument("--stage", choices=["all", "prepare", "train", "report"], default="all",
                     help="run one stage only (Slurm jobs): prepare = data + prune, train, report")
    run.set_defaults(func=_run)

    submit = sub.add_parser("submit", help="the same pipeline as Slurm jobs: prepare -> train (multi-node) -> bench")
    submit.add_argument("recipe", help="recipe YAML or built-in name")
    submit.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=3e-5")
    submit.add_argument("--nodes", type=int, default=1, help="nodes for training (one torchrun per node)")
    submit.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank per GPU")
    submit.add_argument("--procs-per-node", type=int, help="ranks per node (default: GPUs, else train.nproc)")
    submit.add_argument("--cpus-per-rank", type=int, help="CPU cores per rank (default: train.threads_per_proc or 1, "
                        "plus data.num_workers when the data streams)")
    submit.add_argument("--partition")
    submit.add_argument("--time", help="time limit of each job, e.g. 1-00:00:00")
    submit.add_argument("--account")
    submit.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one run per value, as job arrays (repeat for a grid), e.g. optim.lr=1e-5,3e-5")
    submit.add_argument("--run-dir", help="run directory, or the parent of a sweep's (default: runs/<recipe>-<time>)")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the scripts, the sbatch commands and (with GPUs) the resource plan only")
    submit.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU, for the dry run's plan")
    submit.add_argument("--hours", type=float, help="wall-clock budget, for the dry run's throughput line")
    submit.set_defaults(func=_submit)

    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) \
            and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # key=value after an option (`asr run R --run-dir D k=v`) is an override too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.debug:  # generate() repeats config warnings per call; --debug shows them
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # inherited by training ranks, local or under Slurm
    try:
        args.func(args)
    except AsrError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
