"""Weights & Biases on rank 0: offline into the run directory by default, online only when the user asks.

Online needs WANDB_MODE=online (or tracking.mode: online) and a key in the environment; the key is never
logged, and only the resolved recipe goes into the run config.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


class Tracker:
    """Thin wrapper so the loop can log unconditionally; does nothing when disabled or not on rank 0."""

    def __init__(self, run_dir: Path, config: dict, project: str, mode: str, enabled: bool, name: str):
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb

        mode = os.environ.get("WANDB_MODE", mode)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        run_id_file = run_dir / "wandb" / "run-id"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
        run_id_file.write_text(run_id)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), mode=mode,
                              config=config, settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_artifact(self, path: Path, name: str, kind: str = "report") -> None:
        if self.run is not None and path.exists():
            import wandb

            artifact = wandb.Artifact(name, type=kind)
            artifact.add_dir(str(path)) if path.is_dir() else artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
