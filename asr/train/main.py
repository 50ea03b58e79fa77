"""Per-rank entry point started by torchrun/deepspeed/srun: `python -m asr.train.main RUN_DIR`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from asr.errors import AsrError


ERROR = "ERROR"  # the first rank error of the last attempt, for `asr run` to report


def die_with_parent() -> None:
    """A process killed with its parent: ranks must not outlive a killed torchrun (they would race a re-run in the
    same run directory), nor loading workers their rank (they hold its output pipes open after it exits)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of a recovery run (normally started by `asr run`)")
    parser.add_argument("run_dir")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args()
    die_with_parent()
    from asr.config import load_recipe
    from asr.train.loop import Trainer

    code = 0
    try:
        trainer = Trainer(Path(args.run_dir), load_recipe(Path(args.run_dir) / "recipe.yaml"))
        trainer.run()
        trainer.engine.destroy()
    except AsrError as exc:
        print(f"error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr, flush=True)
        (Path(args.run_dir) / ERROR).write_text(str(exc))  # `asr run` shows it as its one-line error
        code = 2
    import torch.distributed as dist

    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # DeepSpeed ZeRO-3 can abort in interpreter teardown after a clean run (stack.md, gotcha 2)


if __name__ == "__main__":
    main()
