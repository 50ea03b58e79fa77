"""`python -m asr.slurm.env`: the environment `asr run` gives its processes, as shell exports for sbatch scripts.

The batch scripts run `eval "$(python -m asr.slurm.env)"`, so a Slurm job and a local run see the same
settings (one place decides them: `asr.train.torchrun.training_env`).
"""
from __future__ import annotations

import os
import shlex

from asr.train.torchrun import training_env


def shell_exports() -> str:
    """`export KEY=VALUE` lines for every variable training_env() adds or changes."""
    env = training_env()
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())
                     if os.environ.get(key) != value)


if __name__ == "__main__":
    print(shell_exports())
