"""`asr plan`: exact parameter counts on the meta device, DeepSpeed's ZeRO-2/3 model states across GPU counts, a
verdict that flips with the GPU's memory and changes that make it fit, and the CLI's errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asr.config import load_recipe
from asr.models.architecture import meta_whisper, whisper_config
from asr.models.loading import load_whisper
from asr.models.prune import count_parameters, prune_whisper
from asr.recipes import recipe_path
from asr.train.engine import freeze_parts
from asr.train.resource_plan import (GIB, Allocation, ParamCounts, count_params, model_state_bytes, plan_resources,
                                     with_overrides)


def test_counts_match_a_real_pruned_whisper_base():
    recipe = load_recipe(recipe_path("quickstart"), ["prune.num_layers=2"])  # 6 -> 2, live KD, embeddings frozen
    teacher = load_whisper("whisper-base")
    student = freeze_parts(prune_whisper(teacher, [0, 5]), recipe.train)
    counts = count_params(recipe, whisper_config("whisper-base"))
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert counts.trainable == trainable == 2 * 4_203_008 + 1024  # 2 layers at d 512, FFN 2048; final norm
    assert counts.trainable + counts.frozen == count_parameters(student)
    assert counts.teacher == count_parameters(teacher) == 72_593_920
    # the shipped dimensions of the hub id give the same teacher as the registry's weights
    assert count_parameters(meta_whisper(whisper_config("openai/whisper-base"))) == count_parameters(teacher)
    ce = count_params(with_overrides(recipe, ["objective.method=ce", "train.freeze_embeddings=false"]),
                      whisper_config("whisper-base"))
    assert ce.teacher == 0 and ce.trainable == trainable + 51865 * 512 + 448 * 512  # token and position embeddings


def test_frozen_cross_attention_keys_and_values_are_counted_as_the_loop_freezes_them():
    """train.freeze_cross_attention_kv: each kept layer's k_proj (no bias) and v_proj leave the trainable count."""
    recipe = load_recipe(recipe_path("quickstart"), ["train.freeze_cross_attention_kv=true"])
    student = freeze_parts(prune_whisper(load_whisper("whisper-base"), [0, 2, 5]), recipe.train)
    counts = count_params(recipe, whisper_config("whisper-base"))
    assert counts.trainable == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert count_params(load_recipe(recipe_path("quickstart")), whisper_config("whisper-base")).trainable \
        - counts.trainable == 3 * (2 * 512 * 512 + 512)


def test_zero2_and_zero3_states_shrink_with_gpus_as_deepspeed_says():
    params = ParamCounts(trainable=800_000_000, frozen=0, largest_trainable_layer=66_000_000, teacher=0)
    p, largest = params.trainable, params.largest_trainable_layer
    totals = {}
    for stage in (2, 3):
        for nodes in (1, 8):
            rows = model_state_bytes(params, stage, True, Allocation(nodes, 8, 80))
            totals[stage, nodes] = sum(rows.values())
            if stage == 2:  # 16-bit weights on every GPU, gradients and optimizer states partitioned
                assert rows == {"weights": 2 * p, "gradients": 6 * p // (8 * nodes), "optimizer": 12 * p // (8 * nodes)}
    assert totals[2, 1] == 2 * p + 18 * p // 8 and totals[3, 1] == 4 * largest + 18 * p // 8
    assert totals[2, 8] == 2 * p + 18 * p // 64 and totals[3, 8] == 4 * largest + 18 * p // 64
    assert totals[3, 8] < totals[3, 1] < totals[2, 1] and totals[3, 8] < totals[2, 8] < totals[2, 1]
    fp32 = model_state_bytes(params, 0, False, Allocation(1, 8, 80))
    assert fp32 == {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p}


def test_verdict_flips_with_gpu_memory_and_the_changes_fit():
    recipe = load_recipe(recipe_path("large-v3-turbo"))  # openai/whisper-large-v3: shipped dimensions, no download
    roomy = plan_resources(recipe, Allocation(8, 8, 80), hours=72)
    assert roomy.fits and not roomy.changes and 60 * GIB < roomy.total < 80 * GIB
    assert roomy.params.trainable + roomy.params.frozen == 1_543_490_560 - 28 * 26_236_160  # 28 layers cut
    assert roomy.throughput["samples_per_s"] == pytest.approx(32 * 64 * 100_000 / (72 * 3600))
    assert roomy.throughput["tokens_per_s"] == pytest.approx(roomy.throughput["samples_per_s"] * 440)
    tight = plan_resources(recipe, Allocation(8, 8, 40))
    assert not tight.fits and tight.total == roomy.total
    fitting = [c for c in tight.changes if c.fits]
    assert fitting and all(c.total <= 40 * GIB for c in fitting)
    batch = next(c for c in fitting if "train.batch_size=16" in c.overrides)
    assert batch.overrides == ["train.batch_size=16", "train.grad_accum=2"]
    replanned = plan_resources(with_overrides(recipe, batch.overrides), Allocation(8, 8, 40))
    assert replanned.fits and replanned.total == batch.total


def test_cli_prints_the_plan_as_json_and_one_line_errors(tmp_path):
    out = tmp_path / "plan.json"
    ok = subprocess.run([sys.executable, "-m", "asr", "plan", "distil-large-v3", "--nodes", "1", "--gpus-per-node",
                         "8", "--gpu-mem", "8", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "does not fit" in ok.stdout and "objective.teacher_cache=states" in ok.stdout
    plan = json.loads(out.read_text())
    assert plan["params"]["teacher"] == 1_543_490_560 and plan["fits"] is False
    assert plan["total"] == sum(plan["memory"].values())
    bad = subprocess.run([sys.executable, "-m", "asr", "plan", "quickstart", "train.bacth_size=4", "--gpu-mem", "80"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: train.bacth_size: unknown key; allowed:")
