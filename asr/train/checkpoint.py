"""Checkpoints that are never half-written: DeepSpeed state for exact resume plus a consolidated HF student.

Layout: `RUN/checkpoints/step-000050/{ds/, hf/, state.json, COMPLETE}` and `RUN/checkpoints/latest` (a file
naming the newest complete checkpoint). Everything is written under `step-000050.tmp` and renamed after
`COMPLETE` (file list and sizes) is fsynced; a checkpoint without a matching COMPLETE is never loaded.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from asr.errors import AsrError
from asr.models.loading import read_weights, save_whisper

COMPLETE = "COMPLETE"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _fsync_tree(path: Path) -> dict[str, int]:
    sizes = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        sizes[str(f.relative_to(path))] = f.stat().st_size
    return sizes


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def is_complete(ckpt: Path) -> bool:
    """True when every file listed in COMPLETE exists with its recorded size."""
    marker = ckpt / COMPLETE
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all((ckpt / name).is_file() and (ckpt / name).stat().st_size == size for name, size in sizes.items())


def consolidated_state_dict(engine, zero_stage: int, fp32_source: Path | None = None) -> dict[str, torch.Tensor] | None:
    """Full student weights in fp32 (frozen ones included) on rank 0; collective.

    With `fp32_source` (bf16 training, where the module holds bf16 copies), trainable weights come from the
    optimizer's fp32 master copy and frozen ones from `fp32_source`, the student as pruned: saving the module
    would round every weight to bf16, the frozen encoder included.
    """
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    if fp32_source is not None:
        return _fp32_master_state_dict(module, fp32_source)
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} \
                if dist.get_rank() == 0 else None
        return state
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _fp32_master_state_dict(module, fp32_source: Path) -> dict[str, torch.Tensor] | None:
    from deepspeed.utils import safe_get_full_fp32_param
    import torch.distributed as dist

    state, frozen = {}, []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            frozen.append(name)
            continue
        full = safe_get_full_fp32_param(param)  # collective: every rank calls it for every trainable weight
        state[name] = (param if full is None else full).detach().float().cpu().clone()
    if dist.get_rank() != 0:
        return None
    return {**state, **read_weights(fp32_source, frozen)}


LOW_SPACE = 16 * 2**20  # bytes free after a failed write that mean the disk filled up


def _disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or a disk left (almost) full by the failed write: torch.save
    reports ENOSPC as a RuntimeError ("unexpected pos ...") without an errno."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(where).free < LOW_SPACE
    except OSError:
        return False


def _checkpoint_bytes(ckpt: Path | None) -> int:
    try:
        return sum(json.loads((ckpt / COMPLETE).read_text()).values()) if ckpt is not None else 0
    except (OSError, ValueError):
        return 0


def save_checkpoint(engine, root: Path, step: int, client_state: dict, zero_stage: int, processor,
                    fp32_source: Path | None = None) -> Path:
    """Collective: every rank writes its DeepSpeed shard; rank 0 adds the HF student (fp32; see
    `consolidated_state_dict` for `fp32_source`), seals and renames.

    A full disk removes the partial `.tmp` and raises AsrError; `latest` still names the previous checkpoint.
    """
    import torch.distributed as dist

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp), tag="ds", client_state=client_state, save_latest=False)
        state = consolidated_state_dict(engine, zero_stage, fp32_source)
        if dist.get_rank() == 0:
            save_whisper(engine.module, tmp / "hf", processor, state_dict=state)
            (tmp / "state.json").write_text(json.dumps({"step": step, "processes": dist.get_world_size(),
                                                        **{k: v for k, v in client_state.items() if k in ("losses",)}}))
        dist.barrier()
        if dist.get_rank() == 0:
            _write_atomic(tmp / COMPLETE, json.dumps(_fsync_tree(tmp)))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _write_atomic(root / "latest", final.name)
    except Exception as exc:  # noqa: BLE001  (only a full disk is turned into an AsrError; the rest re-raise)
        if not _disk_full(exc, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        need = _checkpoint_bytes(previous)
        raise AsrError(f"no space left on the disk holding {root} while saving step {step}"
                       + (f" (a checkpoint takes {need / 2**20:.0f} MB)" if need else "")
                       + "; free space there or lower train.keep_last, then re-run the same command to resume from "
                       + (previous.name if previous is not None else "the start")) from None
    dist.barrier()
    return final


def _sealed(root: Path, path: Path) -> bool:
    """A complete `step-N` directory of `root`; a `.tmp` never is, even when a hand-edited pointer names it."""
    return path.parent == root and path.name.startswith("step-") and not path.name.endswith(".tmp") \
        and is_complete(path)


def latest_checkpoint(root: Path) -> Path | None:
    """Newest complete checkpoint: the `latest` pointer if valid, else the highest complete step."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _sealed(root, candidate):
            return candidate
    complete = sorted(p for p in root.glob("step-*") if _sealed(root, p))
    return complete[-1] if complete else None


def load_checkpoint(engine, ckpt: Path, processes: int) -> dict:
    """Restore engine, optimizer, scheduler and return the client state saved with them, on as many `processes`
    as saved it: ZeRO's optimizer shards, each rank's RNG and its data position belong to that world size."""
    if not is_complete(ckpt):
        raise AsrError(f"{ckpt}: checkpoint is incomplete or truncated; delete it to resume from an earlier one")
    saved = json.loads((ckpt / "state.json").read_text()).get("processes")  # None: saved before it was recorded
    if saved is not None and saved != processes:
        raise AsrError(f"{ckpt}: saved by {saved} processes but this run has {processes}; resume with {saved} "
                       f"(`asr run --nproc {saved}`, or nodes x processes per node = {saved} under Slurm)")
    _, client_state = engine.load_checkpoint(str(ckpt), tag="ds", load_module_strict=True)
    if client_state is None:
        raise AsrError(f"{ckpt}: DeepSpeed could not load this checkpoint; delete it to resume from an earlier one")
    return client_state


def prune_checkpoints(root: Path, keep_last: int, best: Path | None) -> None:
    """Delete old checkpoints, keeping the newest `keep_last` and the best by WER."""
    complete = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
    for old in complete[:-keep_last] if keep_last > 0 else complete:
        if best is None or old.resolve() != best.resolve():
            shutil.rmtree(old, ignore_errors=True)
