"""Start the per-rank processes of a recovery run on this machine (torchrun, one process per device).

`python -m asr.train.torchrun ARGS` is torchrun itself (the Slurm script launches each node's ranks with it too),
except that a failed rank ends it with one line, not the elastic agent's traceback: each rank has printed its own
error (or, for a bug, its traceback) above, and `asr run` adds what to do next."""
from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

CPU_ALLOCATOR = "tcmalloc_minimal"  # Debian libtcmalloc-minimal4


def training_env() -> dict[str, str]:
    """Environment for ranks: compiled DeepSpeed ops cached in the venv; the hub online or offline as the user set
    it (offline, hub datasets and models load from the local caches)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # the venv's ninja first: a different ninja changes the build command and recompiles DeepSpeed's ops
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_SILENT", "true")
    return {**env, **cpu_allocator(env)}


def cpu_allocator(env: dict[str, str]) -> dict[str, str]:
    """On a machine without a GPU, ranks preloaded with tcmalloc where it is installed: glibc's malloc maps and unmaps
    every step's large logits and activations afresh (tens of thousands of page faults per second, a fifth of the
    CPU in the kernel), and the same training steps ran 1.25-1.3x faster with tcmalloc (jemalloc: no gain). A GPU
    run and a user's own LD_PRELOAD are left alone."""
    import torch

    library = ctypes.util.find_library(CPU_ALLOCATOR)
    if torch.cuda.is_available() or library is None or env.get("LD_PRELOAD"):
        return {}
    # tcmalloc reports every allocation over 1 GiB on stderr: the encoder states of a run's clips are one such
    return {"LD_PRELOAD": library, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def launch_training(run_dir: Path, nproc: int, module: str = "asr.train.main", args: tuple[str, ...] = ()) -> int:
    """Run `module RUN_DIR [args]` (default the recovery run) on `nproc` local processes; returns the exit code."""
    for stale in ("PREEMPT", "PREEMPTED", "ERROR"):  # a new attempt starts afresh (Slurm's train.sbatch does the same)
        (run_dir / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "asr.train.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, str(run_dir), *args]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=training_env()).returncode


def main(argv: list[str] | None = None) -> int:
    """torchrun with `argv` (default the command line); 1 when a rank failed, naming each failed rank's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as failed:
        codes = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(failed.failures.items()))
        print(f"{failed.name} failed: {codes}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
