"""Plan before spending: what one GPU holds for a recipe on an allocation, whether it fits, what change makes it
fit, and the throughput the recipe's steps need in a given time (`asr plan`, and `asr submit --dry-run`).

Parameters are counted exactly on the meta device (no weights). Model states come from DeepSpeed's estimators,
activations from a stated formula (`activation_bytes`); the figures are estimates, without the CUDA context or
allocator fragmentation, so keep a margin.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from asr.config import Recipe, apply_overrides, build, recipe_to_dict
from asr.data.loading import streaming_of
from asr.errors import AsrError
from asr.models.architecture import meta_whisper, whisper_config
from asr.models.prune import check_keep, count_parameters, student_config
from asr.train.engine import freeze_parts

GIB = 2 ** 30
# bytes per trained parameter under AdamW, mixed 16-bit / fp32: (weights, gradients, optimizer states). 16-bit
# follows DeepSpeed's estimator comments (deepspeed 0.19 stage_1_and_2.py and stage3.py): 16-bit weights; 16- and
# 32-bit gradients (32-bit only at ZeRO-3); fp32 master weights, momentum and variance. fp32 training needs no
# master copy (Rajbhandari et al. 2020, ZeRO, section 3).
STATE_BYTES = {True: (2, 6, 12), False: (4, 4, 8)}


@dataclass(frozen=True)
class Allocation:
    """The GPUs a run gets: one rank per GPU."""

    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def holds(self, nbytes: int) -> bool:
        return nbytes <= self.gpu_mem_gib * GIB


@dataclass(frozen=True)
class ParamCounts:
    """Parameters one rank holds: the student's by whether they train, and the teacher's share."""

    trainable: int
    frozen: int
    largest_trainable_layer: int  # ZeRO-3 gathers one module's weights at a time (DeepSpeed's largest_layer_params)
    teacher: int  # live KD: the whole teacher; cached decoder states: its output projection; else 0


def bf16_of(recipe: Recipe) -> bool:
    """bf16 as the GPUs would run it: `auto` is on (A100, H100 and later have native bf16)."""
    return recipe.train.bf16 in (True, "auto")


def full_teacher_logits(recipe: Recipe) -> bool:
    """KD against the teacher's full-vocabulary logits (live, or from cached decoder states) rather than top-K."""
    return recipe.objective.method == "kd" and recipe.objective.teacher_cache != "top_k"


def student_layers(recipe: Recipe, config) -> tuple[int, int]:
    """(decoder, encoder) layers the recipe's student keeps of the teacher's."""
    p = recipe.prune
    if p.keep is not None:
        decoder = len(check_keep(p.keep, config.decoder_layers, "prune.keep: decoder"))
    elif p.num_layers is None or not 1 <= p.num_layers <= config.decoder_layers:
        raise AsrError(f"prune.num_layers={p.num_layers}: choose 1..{config.decoder_layers} for {recipe.teacher}")
    else:
        decoder = p.num_layers
    if p.encoder_keep is None:
        return decoder, config.encoder_layers
    return decoder, len(check_keep(p.encoder_keep, config.encoder_layers, "prune.encoder_keep: encoder"))


def teacher_role(recipe: Recipe) -> str:
    """What of the teacher a rank holds: all of it, its output projection (cached states), or nothing."""
    o = recipe.objective
    if o.method != "kd":
        return "no teacher"
    return {False: "live teacher", "top_k": "cached top-K, no teacher"}.get(
        o.teacher_cache, "cached teacher states, its output projection")


def count_params(recipe: Recipe, config) -> ParamCounts:
    """Exact parameter counts of the recipe's student (trainable as the loop freezes it) and teacher."""
    student = freeze_parts(meta_whisper(student_config(config, *student_layers(recipe, config))), recipe.train)
    trainable = sum(q.numel() for q in student.parameters() if q.requires_grad)
    largest = max(sum(q.numel() for q in m.parameters(recurse=False) if q.requires_grad) for m in student.modules())
    o = recipe.objective
    if o.method == "kd" and not o.teacher_cache:
        teacher = count_parameters(meta_whisper(config))
    else:
        teacher = config.vocab_size * config.d_model if full_teacher_logits(recipe) else 0
    return ParamCounts(trainable, count_parameters(student) - trainable, largest, teacher)


def model_state_bytes(params: ParamCounts, stage: int, bf16: bool, alloc: Allocation) -> dict[str, int]:
    """Per-GPU weights, gradients and optimizer states of the trained parameters under AdamW.

    16-bit at ZeRO-2/3 is DeepSpeed's own estimate (no offload): 2·P + 18·P/N and 4·L + 18·P/N; the gradient and
    optimizer shares are split out by STATE_BYTES and the weights row is the rest. ZeRO-0/1 and fp32, which
    DeepSpeed does not estimate, partition STATE_BYTES: optimizer states from stage 1, gradients from 2, weights at 3.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, n, largest = params.trainable, alloc.gpus, params.largest_trainable_layer
    w, g, o = STATE_BYTES[bf16]
    g = 4 if bf16 and stage == 3 else g
    grads = g * p // n if stage >= 2 else g * p
    optimizer = o * p // n if stage >= 1 else o * p
    if bf16 and stage == 2:
        _, total = estimate_zero2_model_states_mem_needs(p, alloc.gpus_per_node, alloc.nodes, cpu_offload=False)
        weights = total - grads - optimizer
    elif bf16 and stage == 3:
        _, total, _ = estimate_zero3_model_states_mem_needs(p, largest, alloc.gpus_per_node, alloc.nodes,
                                                             cpu_offload=False, cpu_offload_params=False)
        weights = total - grads - optimizer
    else:
        weights = w * p // n + 4 * largest if stage == 3 else w * p
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def encoder_in_step(recipe: Recipe) -> bool:
    """The encoder runs in every step (its states are cached only when frozen, shared, and the data in memory)."""
    t = recipe.train
    return not (t.freeze_encoder and t.cache_encoder and t.share_encoder and not streaming_of(recipe))


def activation_bytes(recipe: Recipe, config) -> dict[str, int]:
    """Activations kept for the backward pass, per GPU, at train.batch_size b and data.max_label_tokens t.

    Korthikanti et al. 2022 (Reducing Activation Recomputation), eq. 2 at 16-bit, without its a·s² score terms,
    which SDPA's fused attention kernels do not keep; h = d_model, S = 1500 encoder frames, V = vocabulary:
    - decoder layer: 34·b·t·h (self-attention and MLP) + 11·b·t·h + 4·b·S·h (cross-attention: its inputs, and
      keys and values over the encoder states), plus the encoder states b·S·h once;
    - encoder layer, when the encoder trains: 34·b·S·h; a frozen encoder run in the step keeps one layer's worth;
    - fp32 training doubles these;
    - logits: 4·b·t·V per full-vocabulary fp32 tensor the loss holds: the student's, and the teacher's for KD.
    """
    b, t, h = recipe.train.batch_size, recipe.data.max_label_tokens, config.d_model
    s, v, width = config.max_source_positions, config.vocab_size, 2 if bf16_of(recipe) else 4
    decoder_layers, encoder_layers = student_layers(recipe, config)
    decoder = decoder_layers * (45 * b * t * h + 4 * b * s * h) * width // 2 + b * s * h * width
    if recipe.train.freeze_encoder:
        encoder_layers = int(encoder_in_step(recipe))
    encoder = encoder_layers * 34 * b * s * h * width // 2
    logits = 4 * b * t * v * (2 if full_teacher_logits(recipe) else 1)
    return {"decoder": decoder, "encoder": encoder, "logits": logits}


def memory_bytes(recipe: Recipe, config, params: ParamCounts, alloc: Allocation) -> dict[str, int]:
    """Every per-GPU row of the plan. Frozen student weights sit at the training dtype (ZeRO-3 partitions them
    too); the teacher is not a DeepSpeed module, so every rank holds all of it at that dtype."""
    bf16, stage = bf16_of(recipe), recipe.train.zero_stage
    width = 2 if bf16 else 4
    states, act = model_state_bytes(params, stage, bf16, alloc), activation_bytes(recipe, config)
    return {"weights": states["weights"], "frozen": params.frozen * width // (alloc.gpus if stage == 3 else 1),
            "gradients": states["gradients"], "optimizer": states["optimizer"],
            "activations": act["decoder"] + act["encoder"], "logits": act["logits"], "teacher": params.teacher * width}


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with `key=value` overrides applied and validated, as the command line would."""
    return build(Recipe, apply_overrides(recipe_to_dict(recipe), overrides))


@dataclass
class Change:
    """One computed way to fit: overrides (or more nodes) and the per-GPU total they give."""

    overrides: list[str]
    nodes: int
    total: int
    fits: bool


def change_with(recipe: Recipe, config, alloc: Allocation, overrides: list[str]) -> Change:
    """The per-GPU total of the recipe with `overrides`, recounted (a cached teacher changes what a rank holds)."""
    changed = with_overrides(recipe, overrides)
    total = sum(memory_bytes(changed, config, count_params(changed, config), alloc).values())
    return Change(overrides, alloc.nodes, total, alloc.holds(total))


def smaller_batch(recipe: Recipe, config, alloc: Allocation, base: list[str]) -> Change | None:
    """The largest train.batch_size below the recipe's that fits with grad_accum raised to keep the global batch
    (the smallest tried when none does)."""
    b, accum = recipe.train.batch_size, recipe.train.grad_accum
    change = None
    for size in (s for s in range(b - 1, 0, -1) if b % s == 0):
        change = change_with(recipe, config, alloc,
                             base + [f"train.batch_size={size}", f"train.grad_accum={accum * b // size}"])
        if change.fits:
            break
    return change


def more_nodes(recipe: Recipe, config, params: ParamCounts, alloc: Allocation, limit: int = 16) -> Change | None:
    """The fewest nodes (up to `limit` times the allocation) whose partitioned model states make the run fit."""
    if recipe.train.zero_stage == 0:
        return None
    for nodes in range(alloc.nodes + 1, alloc.nodes * limit + 1):
        total = sum(memory_bytes(recipe, config, params, dataclasses.replace(alloc, nodes=nodes)).values())
        if alloc.holds(total):
            return Change([], nodes, total, True)
    return None


def changes_to_fit(recipe: Recipe, config, params: ParamCounts, alloc: Allocation) -> list[Change]:
    """Changes that shrink the per-GPU total, each computed: a higher ZeRO stage, bf16, cached teacher decoder
    states instead of the live teacher, a smaller micro-batch with more accumulation, more nodes; when none fits
    alone, the highest stage, bf16 and the cached teacher together with the micro-batch search."""
    t, o = recipe.train, recipe.objective
    stages = [[f"train.zero_stage={s}"] for s in range(t.zero_stage + 1, 4)]
    others = [] if bf16_of(recipe) else [["train.bf16=true"]]
    if o.method == "kd" and not o.teacher_cache and recipe.data.streaming is not True:  # unset: yields to the cache
        others.append(["data.pseudo_label.teacher_states=true", "objective.teacher_cache=states"])
    found = [change_with(recipe, config, alloc, overrides) for overrides in stages + others]
    found += [c for c in (smaller_batch(recipe, config, alloc, []), more_nodes(recipe, config, params, alloc)) if c]
    combined = stages[-1:] + others
    if len(combined) > 1 and not any(c.fits for c in found):
        together = [x for overrides in combined for x in overrides]
        change = change_with(recipe, config, alloc, together)
        found.append(change if change.fits else smaller_batch(recipe, config, alloc, together) or change)
    return found


def throughput(recipe: Recipe, alloc: Allocation, hours: float) -> dict[str, float]:
    """What the whole allocation must sustain to finish train.max_steps in `hours`: samples/s, and label tokens/s
    at data.max_label_tokens (an upper bound: batches pad to their longest label)."""
    t = recipe.train
    samples = t.batch_size * t.grad_accum * alloc.gpus * t.max_steps
    per_s = samples / (hours * 3600)
    return {"hours": hours, "samples": samples, "samples_per_s": per_s,
            "tokens_per_s": per_s * recipe.data.max_label_tokens, "samples_per_s_per_gpu": per_s / alloc.gpus}


@dataclass
class ResourcePlan:
    """A recipe on an allocation: per-GPU bytes by row, the verdict, computed changes and the needed throughput."""

    recipe: str
    allocation: Allocation
    setting: dict[str, object]
    params: ParamCounts
    memory: dict[str, int]
    fits: bool
    changes: list[Change] = field(default_factory=list)
    throughput: dict[str, float] | None = None

    @property
    def total(self) -> int:
        return sum(self.memory.values())


def plan_resources(recipe: Recipe, alloc: Allocation, hours: float | None = None) -> ResourcePlan:
    """The plan of `asr plan`: counts on the meta device, memory per GPU, verdict, changes, throughput."""
    if alloc.nodes < 1 or alloc.gpus_per_node < 1 or alloc.gpu_mem_gib <= 0:
        raise AsrError("a plan needs --nodes and --gpus-per-node of at least 1 and a positive --gpu-mem")
    if hours is not None and hours <= 0:
        raise AsrError(f"--hours {hours}: give the wall-clock hours the run may take, e.g. --hours 48")
    config = whisper_config(recipe.teacher)
    params = count_params(recipe, config)
    memory = memory_bytes(recipe, config, params, alloc)
    t = recipe.train
    setting = {"teacher": f"{teacher_role(recipe)} ({recipe.teacher})", "zero_stage": t.zero_stage, "bf16": bf16_of(recipe),
               "batch_size": t.batch_size, "grad_accum": t.grad_accum, "label_tokens": recipe.data.max_label_tokens,
               "student_layers": list(student_layers(recipe, config)), "encoder_in_step": encoder_in_step(recipe)}
    fits = alloc.holds(sum(memory.values()))
    return ResourcePlan(recipe.name, alloc, setting, params, memory, fits,
                        [] if fits else changes_to_fit(recipe, config, params, alloc),
                        None if hours is None else throughput(recipe, alloc, hours))


ROW_NAMES = {"weights": "trained weights", "frozen": "frozen student weights", "gradients": "gradients",
             "optimizer": "optimizer states", "activations": "activations", "logits": "loss logits (fp32)",
             "teacher": "teacher"}


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(plan: ResourcePlan) -> str:
    """The plan as a plain-text table with the verdict, its changes and the throughput line."""
    a, s, p = plan.allocation, plan.setting, plan.params
    lines = [f"{plan.recipe} on {a.nodes} node(s) x {a.gpus_per_node} GPU(s) = {a.gpus} ranks, "
             f"{a.gpu_mem_gib:g} GiB each: ZeRO-{s['zero_stage']}, {'bf16' if s['bf16'] else 'fp32'}, "
             f"micro-batch {s['batch_size']} x {s['label_tokens']} label tokens, grad_accum {s['grad_accum']}",
             f"student {s['student_layers'][0]} decoder + {s['student_layers'][1]} encoder layers: "
             f"{p.trainable / 1e6:.1f}M trained, {p.frozen / 1e6:.1f}M frozen; {s['teacher']}"
             + (f": {p.teacher / 1e6:.1f}M params" if p.teacher else ""), "per GPU:"]
    lines += [f"  {ROW_NAMES[k]:22}{_gib(v)}" for k, v in plan.memory.items()]
    verdict = "fits" if plan.fits else "does not fit"
    lines.append(f"  {'total':22}{_gib(plan.total)}  of {a.gpu_mem_gib:g} GiB: {verdict}")
    for c in plan.changes:
        what = " ".join(c.overrides) if c.overrides else f"--nodes {c.nodes}"
        lines.append(f"  change: {what:60} -> {c.total / GIB:.2f} GiB{'' if c.fits else ' (still too much)'}")
    if plan.throughput:
        t = plan.throughput
        lines.append(f"{t['samples']:,} samples in {t['hours']:g} h: {t['samples_per_s']:,.1f} samples/s "
                     f"({t['samples_per_s_per_gpu']:.2f} per GPU), {t['tokens_per_s']:,.0f} label tokens/s")
    return "\n".join(lines)


def plan_to_dict(plan: ResourcePlan) -> dict:
    """JSON-ready plan (bytes, counts, verdict, changes, throughput)."""
    return {**dataclasses.asdict(plan), "total": plan.total}
