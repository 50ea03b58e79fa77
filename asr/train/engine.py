"""DeepSpeed set-up: process group (NCCL on GPUs, gloo on CPU), the ZeRO config from the recipe, torch AdamW.

Every tensor collective of the package goes through `Dist.all_reduce`, which runs it on the run's device: NCCL
has no CPU tensors, so one CPU tensor handed to it stops a GPU run (`tests/test_engine.py` scans the source).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from asr.config import OptimConfig, TrainConfig
from asr.errors import AsrError
from asr.models.loading import local_device
from asr.train.objectives import turbo_lr_factor


@dataclass
class Dist:
    """Where this process sits: global rank, world size, local rank, device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: torch.Tensor | Sequence[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """`values` reduced over every rank, on the run's device: numbers are placed there, and a tensor anywhere
        else is refused here rather than by NCCL at the first collective of a GPU run."""
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, device=self.device)
        if tensor.device != self.device:
            raise AsrError(f"asr/train/engine.py: a collective was handed a tensor on {tensor.device} but the run's "
                           f"device is {self.device}; pass numbers to Dist.all_reduce, or a tensor on {self.device}")
        dist.all_reduce(tensor, op=op)
        return tensor

    def gather_objects(self, mine: object) -> list:
        """Every rank's picklable `mine`, in rank order, on every rank (torch pickles it onto the current device,
        which `init_distributed` sets)."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered


def init_distributed(threads_per_proc: int | None = None) -> Dist:
    """Join the process group started by torchrun/deepspeed (or a world of one) and pick the device."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    device = local_device(local_rank)
    if cuda:
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(threads_per_proc or max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


def use_bf16(setting: bool | str) -> bool:
    """bf16 'auto' = on where the hardware computes bf16 natively: a CUDA device that supports it, or, where torch
    sees none, a CPU with AVX512-BF16 or AMX, where oneDNN's bf16 kernels ran the quickstart's encoder 1.6x and its
    training steps about 1.7x faster than fp32 (README, *bf16 on the CPU*). Elsewhere bf16 is emulated: off."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.cuda.is_bf16_supported()
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(setting)


def freeze_parts(student, train: TrainConfig):
    """Stop gradients where the recipe keeps the teacher's weights: the optimizer and ZeRO's partitions hold only
    what trains (the resource plan counts its memory the same way)."""
    if train.freeze_encoder:
        student.model.encoder.requires_grad_(False)
    if train.freeze_embeddings:
        student.model.decoder.embed_tokens.requires_grad_(False)
        student.model.decoder.embed_positions.requires_grad_(False)
    if train.freeze_cross_attention_kv:
        for layer in student.model.decoder.layers:
            layer.encoder_attn.k_proj.requires_grad_(False)
            layer.encoder_attn.v_proj.requires_grad_(False)
    return student


def deepspeed_config(train: TrainConfig, optim: OptimConfig, bf16: bool) -> dict:
    """The DeepSpeed JSON config a recipe implies, with bf16 as the ranks agreed it; `train.deepspeed` is merged in
    last (it wins)."""
    config = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(config, train.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_engine(student, train: TrainConfig, optim: OptimConfig, bf16: bool):
    """Wrap the student in a DeepSpeed engine with torch AdamW (no op compilation) on trainable params only."""
    import deepspeed

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: turbo_lr_factor(step, optim.warmup_steps, train.max_steps, optim.schedule))
    config = deepspeed_config(train, optim, bf16)
    engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config)
    return engine
