"""Start the per-rank processes of a recovery run on this machine (torchrun, one process per device)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def training_env() -> dict[str, str]:
    """Environment for ranks: compiled DeepSpeed ops cached in the venv; the hub online or offline as the user set
    it (offline, hub datasets and models load from the local caches)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # the venv's ninja first: a different ninja changes the build command and recompiles DeepSpeed's ops
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_SILENT", "true")
    return env


def launch_training(run_dir: Path, nproc: int, module: str = "asr.train.main", args: tuple[str, ...] = ()) -> int:
    """Run `module RUN_DIR [args]` (default the recovery run) on `nproc` local processes; returns the exit code."""
    for stale in ("PREEMPT", "PREEMPTED", "ERROR"):  # a new attempt starts afresh (Slurm's train.sbatch does the same)
        (run_dir / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, str(run_dir), *args]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=training_env()).returncode
