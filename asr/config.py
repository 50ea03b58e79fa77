"""The recipe schema: typed dataclasses, safe YAML loading, dotted `key=value` overrides, and validation.

One schema, one loader. Unknown keys and wrong types fail with the key's dotted path and what is allowed;
nothing in a recipe executes code (yaml.safe_load, and values are only ever data).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from asr.errors import AsrError


# `asr bench --long-form` and data.long_eval.algorithms (asr.bench.longform)
LONG_FORM_ALGORITHMS = ("sequential", "sequential-fallback", "sequential-independent", "chunked", "short-form")

@dataclass
class PruneConfig:
    """Which teacher decoder layers the student keeps (`keep` wins over `num_layers`)."""

    keep: list[int] | None = None
    num_layers: int | None = 2
    strategy: Literal["spaced", "first", "importance"] = "spaced"
    encoder_keep: list[int] | None = None
    calibration: str | None = None  # dataset for --strategy importance
    calibration_limit: int = 32


@dataclass
class SynthConfig:
    """A synthetic split to build into the run directory when the recipe has no real data."""

    split: Literal["train", "test"] = "train"
    num: int = 100
    seed: int = 0
    languages: list[str] = field(default_factory=lambda: ["en"])
    # a language's share of the clips relative to the others (1 unless named), e.g. {ru: 2}: more of a hard one
    language_weights: dict[str, float] = field(default_factory=dict)
    # sentences per clip [low, high], one voice with pauses: several sentences share one 30 s encoder window
    sentences: list[int] = field(default_factory=lambda: [1, 1])
    long: list[float] | None = None  # [low, high] s: long-form files of consecutive sentences (`--long`)
    windows: float = 0.0  # share of clips that are 30 s windows cut from a reading (`--windows`), for long-form
    # per-effect overrides of data/synthetic.yaml's augmentation, e.g. {telephone: {p: 1.0}}: every augmented clip
    # through the telephone channel (the other effects drawn as before)
    augment: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LongEvalConfig:
    """Long-form sets (longer than one 30 s window) benchmarked at every checkpoint with Whisper's long-form
    decoding and reported in their own columns; never used to choose the final checkpoint."""

    sets: list[str] = field(default_factory=list)  # audiofolders or hub ids of long files
    synth: SynthConfig | None = None  # a synthetic set to build, e.g. {split: test, num: 4, seed: 1, long: [60, 180]}
    algorithms: list[Literal[LONG_FORM_ALGORITHMS]] = field(
        default_factory=lambda: ["sequential", "chunked"])
    limit: int | None = None  # files per set


@dataclass
class PseudoLabelConfig:
    """Label data.train with the teacher before training (distil-whisper's first stage, as `asr pseudo-label`);
    the labelled folders are cached and replace data.train, and training uses their `pseudo_label` column."""

    wer_threshold: float = 10.0  # percent: drop clips whose teacher transcript is further from the reference
    top_k: int | None = None  # also store the teacher's top-K log-probs, for objective.teacher_cache (approximate)
    teacher_states: bool = False  # also store its final decoder states, for objective.teacher_cache (exact)
    timestamps: bool = False  # label with timestamps too (teaches them, the long-form algorithm needs them)
    max_new_tokens: int = 224
    batch_size: int = 8


@dataclass
class DataConfig:
    """Training and evaluation data: audiofolder directories or hub ids (`name[:config][@split]`)."""

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    synth_train: SynthConfig | None = None
    synth_eval: SynthConfig | None = None
    # real human recordings evaluated at every checkpoint, by language (`asr data real`: it, ru); never trained on
    real_eval: list[str] = field(default_factory=list)
    # the sets that choose `final/` (lowest mean WER), so the test sets above report numbers nobody chose on;
    # without any, the choice falls back to the non-real eval sets and the report says so
    dev: list[str] = field(default_factory=list)
    synth_dev: SynthConfig | None = None
    long_eval: LongEvalConfig | None = None
    train_limit: int | None = None
    # the language of datasets whose rows do not say theirs (no language column, no `;language=`); unset, such a
    # dataset is English for an English-only teacher and stops the run before any work for a multilingual one
    language: str | None = None
    max_label_tokens: int = 200
    # share of training samples with timestamped targets / a previous-text prompt (Whisper's long-form needs
    # both); unset: distil-whisper's 0.2 where a clip's sentences are timed (`asr data synth` writes them), else 0
    timestamp_probability: float | None = None
    condition_on_prev_probability: float | None = None
    # train reading the data as it goes, checkpoints keeping the position; unset: when a training set is on the hub
    streaming: bool | None = None
    # streaming: processes per rank that decode audio and compute log-mels ahead of the step (0: in the step)
    num_workers: int = 2
    labels: Literal["gold", "pseudo"] = "gold"  # pseudo: train on the `pseudo_label` column (`asr pseudo-label`)
    pseudo_label: PseudoLabelConfig | None = None  # set: pseudo-label data.train first (implies labels: pseudo)

    @property
    def fallback_language(self) -> str:
        """The language of rows that do not say theirs (check_inputs has refused them where English is a guess)."""
        return self.language or "en"


@dataclass
class ObjectiveConfig:
    """Recovery method. KD defaults are the distil-whisper paper's (α_kl=0.8, α_ce=1.0, T=2)."""

    method: Literal["kd", "ce"] = "kd"
    alpha_kl: float = 0.8
    alpha_ce: float = 1.0
    temperature: float = 2.0
    # KD from the teacher's targets stored by `asr pseudo-label` (no teacher loaded): "states" (exact), "top_k"
    # (approximate), or true = the states where stored, else the top-K
    teacher_cache: bool | Literal["states", "top_k"] = False


@dataclass
class OptimConfig:
    """torch AdamW with linear warm-up then constant or linearly decaying LR (the turbo schedule)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 0
    schedule: Literal["constant", "linear"] = "constant"
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """The engine: steps, batch, DeepSpeed ZeRO stage, precision, checkpoints, processes."""

    max_steps: int = 100
    batch_size: int = 8  # per process
    grad_accum: int = 1
    seed: int = 0
    freeze_encoder: bool = True
    # decoder token and position embeddings (the token matrix is also the tied output projection: 26.5M of
    # a 2-layer whisper-base student's 35.2M decoder weights) stay the teacher's: fewer gradients and optimizer states
    freeze_embeddings: bool = False
    # each decoder layer's cross-attention key and value projections stay the teacher's: they read the 1500 encoder
    # frames of every clip, so with a frozen encoder their backward (weight gradients over every frame) is skipped
    freeze_cross_attention_kv: bool = False
    cache_encoder: bool = True  # frozen encoder: compute its states once per clip and reuse them every epoch
    share_encoder: bool = True  # frozen identical encoders run once for teacher and student (false: each runs its own)
    # live KD over cached encoder states: the teacher's final decoder states of every example computed once, not every
    # epoch (exact: an example's layout is fixed when it is encoded); each step projects them onto the vocabulary
    cache_teacher: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool | Literal["auto"] = False  # auto = on where the hardware has native bf16 (CUDA, or AVX512-BF16/AMX CPUs)
    # batches of examples of similar label length (transformers' grouping, batches in random order): less padding
    # where lengths vary, e.g. synthetic clips of 1-4 sentences; in-memory training sets only
    group_by_length: bool = False
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    nproc: int = 1
    threads_per_proc: int | None = None
    max_bad_steps: int = 5  # consecutive NaN/inf losses skipped before the run stops (grad_accum > 1: none)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config


@dataclass
class EvalConfig:
    """The per-checkpoint benchmark."""

    limit: int | None = 60
    real_limit: int | None = None  # clips per real-recordings set (first in file-name order); None: `limit`
    batch_size: int = 8
    max_new_tokens: int = 96
    latency_clips: int = 8
    warmup: int = 1


@dataclass
class TrackingConfig:
    """Weights & Biases: offline into the run directory unless the user sets WANDB_MODE/WANDB_API_KEY."""

    wandb: bool = True
    project: str = "asr-distill"
    mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class Recipe:
    """One file that says teacher, pruning, recovery method, data, engine, evaluation and tracking."""

    name: str = "recipe"
    description: str = ""
    cost: str = ""  # measured wall-clock of a whole run: the one figure `asr ls` and the README's table both show
    teacher: str = "whisper-base"
    prune: PruneConfig = field(default_factory=PruneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; returns the typed value or raises naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error names the exact key
            return _coerce(value, options[0], path)
        for arg in options:
            try:
                return _coerce(value, arg, path)
            except AsrError:
                continue
        raise AsrError(f"{path}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise AsrError(f"{path}: {value!r} is not {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            hint = f"; write a list, e.g. [{value}]" if not isinstance(value, (dict, bool)) else ""
            raise AsrError(f"{path}: {value!r} is not {_type_name(tp)}{hint}")
        return [_coerce(v, typing.get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise AsrError(f"{path}: {value!r} is not a mapping")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise AsrError(f"{path}: {value!r} is not {_type_name(tp)}")
    return value


def build(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        raise AsrError(f"{path or 'recipe'}: expected a mapping with keys {keys}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise AsrError(f"{path + '.' if path else ''}{key}: unknown key; allowed: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], f"{path + '.' if path else ''}{k}") for k, v in data.items()})


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted `key=value` overrides (values parsed as YAML: 3e-5, [0,31], true) to a raw recipe mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AsrError(f"override '{item}' is not key=value (e.g. optim.lr=3e-5)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AsrError(f"override '{item}': {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML safely, apply overrides, validate, and return the typed Recipe."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AsrError(f"{path}: cannot read recipe ({exc.__class__.__name__}); check the path") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise AsrError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return build(Recipe, apply_overrides(data, list(overrides or [])))


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain mapping of a recipe (the resolved recipe written into every run directory)."""
    return dataclasses.asdict(recipe)


def changed_keys(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every leaf where two recipes differ."""
    def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}

    a, b = leaves(recipe_to_dict(old)), leaves(recipe_to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
